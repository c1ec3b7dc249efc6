import Foundation
import PipeKit

/// File-system helpers shared by the intake stages.
enum FS {
    static func errno_() -> String { String(cString: strerror(errno)) }

    /// The canonical absolute path of `path` (symlinks resolved), or nil.
    static func realPath(_ path: String) -> String? { realPath(Array(path.utf8CString)) }
    static func realPath(_ path: [CChar]) -> String? {
        guard let r = realpath(path, nil) else { return nil }
        defer { free(r) }
        return String(cString: r)
    }

    /// A path from a directory and a name given as raw bytes (names need not be UTF-8).
    static func join(_ dir: String, _ name: [UInt8]) -> [CChar] {
        var p = Array(dir.utf8CString.dropLast())
        if p.last != 0x2F { p.append(0x2F) }
        for b in name { p.append(CChar(bitPattern: b)) }
        p.append(0)
        return p
    }

    /// The file name bytes an envelope names: `filename_hex` when the name is not UTF-8.
    static func nameBytes(_ e: Envelope, nameAttr: String = "filename") -> [UInt8]? {
        if let h = e.attrs["filename_hex"]?.stringValue, let b = Hex.decode(h) { return b }
        return e.attrs[nameAttr]?.stringValue.map { Array($0.utf8) }
    }

    /// Lists a directory's entry names (raw bytes), without `.` and `..`.
    static func list(_ dir: String) -> [[UInt8]]? {
        guard let d = opendir(dir) else { return nil }
        defer { closedir(d) }
        var out: [[UInt8]] = []
        while let ent = readdir(d) {
            let name = withUnsafeBytes(of: ent.pointee.d_name) { raw -> [UInt8] in
                Array(raw.prefix { $0 != 0 })
            }
            if name == [0x2E] || name == [0x2E, 0x2E] { continue }
            out.append(name)
        }
        return out
    }

    /// A timespec in ns, saturating (a file dated past 2262 must not trap).
    static func ns(_ t: timespec) -> Int64 {
        let (v, o) = Int64(t.tv_sec).multipliedReportingOverflow(by: 1_000_000_000)
        if o { return t.tv_sec < 0 ? .min : .max }
        return v.addingReportingOverflow(Int64(t.tv_nsec)).overflow ? .max : v + Int64(t.tv_nsec)
    }

    /// The real path of an open descriptor (from /proc), or nil.
    static func pathOf(fd: Int32) -> String? {
        var buf = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/fd/\(fd)", &buf, buf.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buf.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func mkdirs(_ path: String) throws(StageError) {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
        catch { throw StageError.halt("cannot create directory \(path): \(error.localizedDescription)") }
    }
}

/// Which file an arrival was: device, inode, size and status-change time (ctime, which nobody
/// can set back). The sinks move a file only while it still is this one.
struct FileIdentity: Equatable {
    var dev: Int64, ino: Int64, size: Int64, ctimeNs: Int64

    init(_ st: stat) {
        dev = Int64(bitPattern: UInt64(st.st_dev)); ino = Int64(bitPattern: UInt64(st.st_ino))
        size = Int64(st.st_size); ctimeNs = FS.ns(st.st_ctim)
    }

    init?(attrs: [String: AttrValue]) {
        guard let d = attrs["file_dev"]?.intValue, let i = attrs["file_inode"]?.intValue,
              let s = attrs["file_size"]?.intValue, let c = attrs["file_ctime_ns"]?.intValue else { return nil }
        dev = d; ino = i; size = s; ctimeNs = c
    }

    func record(into attrs: inout [String: AttrValue]) {
        attrs["file_dev"] = .int(dev); attrs["file_inode"] = .int(ino); attrs["file_size"] = .int(size); attrs["file_ctime_ns"] = .int(ctimeNs)
    }

    /// Same inode on the same device (what survives a rename).
    func sameInode(_ st: stat) -> Bool { dev == Int64(bitPattern: UInt64(st.st_dev)) && ino == Int64(bitPattern: UInt64(st.st_ino)) }
}

/// `inbox`: watches a directory with inotify; each arrival (close-after-write or moved-in,
/// coalesced per name within `coalesce_ms`) becomes an envelope holding the file's bytes and the
/// attributes the intake sinks need to move it. Files present at start are picked up. Staging
/// names wait for their rename. Nothing is ever deleted here: a file that cannot be taken (too
/// large, unreadable, a symlink leaving the inbox, not a regular file) is dead-lettered as a
/// description (no payload) with its reason, and stays where it is.
public final class InboxStage: SourceStage {
    public static let descriptor = StageDescriptor(
        kind: "inbox",
        summary: "Watches a directory (inotify); each coalesced arrival becomes an envelope with the file's bytes.",
        role: .source,
        fields: [
            ConfigField("dir", .string, doc: "The inbox directory (created if missing); relative paths are resolved against the run directory."),
            ConfigField("coalesce_ms", .int(min: 0, max: 60_000), default: .int(100),
                        doc: "Filesystem events for one name within this window (from the first) are one arrival."),
            ConfigField("max_bytes", .int(min: 0, max: 960 * 1024), default: .int(900 * 1024),
                        doc: "Largest file taken; larger files are dead-lettered with the reason and never read whole."),
            ConfigField("low", .int(min: 1), default: .int(100), doc: "Inbox depth (files waiting) at which the state becomes `pressure-rising`."),
            ConfigField("high", .int(min: 1), default: .int(1000), doc: "Inbox depth at which the state becomes `overloaded`."),
            ConfigField("release", .int(min: 1), optional: true, doc: "Depth below which `overloaded` becomes `recovering` (default: midway between low and high)."),
            ConfigField("idle_exit_ms", .int(min: 0), default: .int(0),
                        doc: "End the source after this long without events or pending arrivals (0: watch until stopped)."),
            ConfigField("actor", .string, default: .string("inbox"), doc: "The `actor` header of arrivals."),
        ],
        check: { c in
            let low = c.int("low") ?? 100, high = c.int("high") ?? 1000
            var issues: [ConfigIssue] = []
            if low > high { issues.append(ConfigIssue(key: "low", message: "low (\(low)) must not exceed high (\(high))")) }
            if let r = c.int("release"), r < low || r >= high {
                issues.append(ConfigIssue(key: "release", message: "release (\(r)) must be at least low (\(low)) and below high (\(high))"))
            }
            return issues
        },
        make: { InboxStage(config: $0) })

    /// An arrival waiting for its coalescing window to close (`dueNs`).
    static let maxPending = 100_000
    struct Pending { var dueNs: UInt64; var events: Int; var atStart: Bool }

    let dirSpec: String
    let coalesceNs: UInt64
    let maxBytes: Int
    let idleExitNs: UInt64
    let actor: String
    var watermarks: Watermarks
    var dir = ""
    var canonicalDir = ""
    var fd: Int32 = -1
    var out = OutputHandle(index: 0, name: "out")
    /// Names present in the inbox (not staging), for the depth.
    var present = Set<[UInt8]>()
    var pending: [[UInt8]: Pending] = [:]
    /// Pending names in order of their due time (due times only grow: now, or an event's time +
    /// coalesce_ms), so the head is always the next due. An entry whose name was taken and
    /// pended again later is stale and skipped.
    var order: [(name: [UInt8], due: UInt64)] = []
    var orderHead = 0

    func addPending(_ name: [UInt8], _ p: Pending) {
        pending[name] = p
        order.append((name, p.dueNs))
    }
    var lastEventNs: UInt64 = 0
    var stopped = false
    var buffer = [UInt8](repeating: 0, count: 64 * 1024)
    var outcomes: [String: Int] = [:]

    init(config c: ConfigReader) {
        dirSpec = c.string("dir") ?? "inbox"
        coalesceNs = UInt64(c.int("coalesce_ms") ?? 100) * 1_000_000
        maxBytes = Int(c.int("max_bytes") ?? 900 * 1024)
        idleExitNs = UInt64(c.int("idle_exit_ms") ?? 0) * 1_000_000
        actor = c.string("actor") ?? "inbox"
        watermarks = Watermarks(low: Int(c.int("low") ?? 100), high: Int(c.int("high") ?? 1000), release: c.int("release").map { Int($0) })
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out")
        dir = context.resolvePath(dirSpec)
        try FS.mkdirs(dir)
        guard let canon = FS.realPath(dir) else { throw StageError.halt("cannot resolve \(dir): \(FS.errno_())") }
        canonicalDir = canon
        fd = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
        guard fd >= 0 else { throw StageError.halt("inotify_init1: \(FS.errno_())") }
        let mask = UInt32(IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF)
        guard inotify_add_watch(fd, canon, mask) >= 0 else { throw StageError.halt("cannot watch \(canon): \(FS.errno_())") }
        // After the watch is in place, so nothing written meanwhile is missed (at worst seen twice,
        // and coalesced).
        rescan(context: context, atStart: true)
        lastEventNs = context.now
        context.report("dir", .string(canon))
        reportDepth(context)
    }

    /// Takes every file present as an arrival (at start, and after an inotify queue overflow).
    func rescan(context: any StageContext, atStart: Bool) {
        guard let names = FS.list(canonicalDir) else { return }
        present.removeAll(keepingCapacity: true)
        for n in names.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
            var st = stat()
            let p = FS.join(canonicalDir, n)
            guard lstat(p, &st) == 0, st.st_mode & S_IFMT != S_IFDIR else { continue }
            let name = String(decoding: n, as: UTF8.self)
            if Sniff.isStaging(name) { continue }
            present.insert(n)
            if pending[n] == nil { addPending(n, Pending(dueNs: context.now, events: 0, atStart: atStart)) }
        }
    }

    public func requestStop() { stopped = true }

    /// Reads all queued inotify events; returns whether any arrived.
    func readEvents(context: any StageContext) throws -> Bool {
        var any = false
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EAGAIN || errno == EINTR { return any }
                throw StageError.halt("reading inotify events: \(FS.errno_())")
            }
            if n == 0 { return any }
            any = true
            var off = 0
            let header = MemoryLayout<inotify_event>.size
            while off + header <= n {
                let (mask, len) = buffer.withUnsafeBytes { raw -> (UInt32, Int) in
                    (raw.loadUnaligned(fromByteOffset: off + 4, as: UInt32.self), Int(raw.loadUnaligned(fromByteOffset: off + 12, as: UInt32.self)))
                }
                let name = Array(buffer[(off + header)..<min(n, off + header + len)].prefix { $0 != 0 })
                off += header + len
                try handle(mask: mask, name: name, context: context)
            }
        }
    }

    func handle(mask: UInt32, name: [UInt8], context: any StageContext) throws {
        if mask & UInt32(IN_Q_OVERFLOW) != 0 {
            context.logger.warning("inbox \(canonicalDir): inotify queue overflowed; rescanning the directory")
            outcomes["rescans", default: 0] += 1
            context.audit(AuditRecord(decision: "inbox-rescan", reason: "inotify queue overflow: every file present is taken as an arrival again",
                                      details: ["dir": .string(canonicalDir)]))
            rescan(context: context, atStart: false)
            return
        }
        if mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED) != 0 {
            throw StageError.halt("the inbox directory \(canonicalDir) was removed or moved away")
        }
        if mask & UInt32(IN_ISDIR) != 0 || name.isEmpty { return }
        let staging = Sniff.isStaging(String(decoding: name, as: UTF8.self))
        if mask & UInt32(IN_MOVED_FROM | IN_DELETE) != 0 {
            present.remove(name)
            // Gone before it was read: its queue entry becomes stale and is skipped.
            if pending.removeValue(forKey: name) != nil { _ = vanished(String(decoding: name, as: UTF8.self), context) }
            return
        }
        if staging {
            if mask & UInt32(IN_CLOSE_WRITE | IN_MOVED_TO) != 0 { outcomes["staging_waits", default: 0] += 1 }
            return
        }
        present.insert(name)
        var arrival = mask & UInt32(IN_CLOSE_WRITE | IN_MOVED_TO) != 0
        if !arrival, mask & UInt32(IN_CREATE) != 0 {
            // A symlink, FIFO, socket or device appears whole (no close-after-write follows); a regular
            // file waits for its close.
            var st = stat()
            // So does a regular file hard-linked in (`link()`: a second name, so st_nlink > 1).
            if lstat(FS.join(canonicalDir, name), &st) == 0 {
                let type = st.st_mode & S_IFMT
                arrival = (type != S_IFREG && type != S_IFDIR) || (type == S_IFREG && st.st_nlink > 1)
            }
        }
        if arrival {
            if var p = pending[name] { p.events += 1; pending[name] = p }
            else { addPending(name, Pending(dueNs: context.now &+ coalesceNs, events: 1, atStart: false)) }
        }
    }

    public func produce(budget: Int, context: any StageContext) throws -> SourceProgress {
        if stopped { return .exhausted }
        let now = context.now
        // Bounded memory: past the cap, events wait in the kernel queue (whose overflow is
        // answered by a rescan).
        if pending.count < Self.maxPending, try readEvents(context: context) { lastEventNs = now }
        observeDepth(context)
        guard !pending.isEmpty else {
            if idleExitNs > 0, now &- lastEventNs >= idleExitNs {
                context.logger.info("inbox \(canonicalDir): idle for \(idleExitNs / 1_000_000) ms; ending")
                return .exhausted
            }
            return .idle(afterNs: 5_000_000)
        }
        var emitted = 0
        while orderHead < order.count, emitted < budget {
            let (name, due) = order[orderHead]
            guard let p = pending[name], p.dueNs == due else { orderHead += 1; continue }   // stale
            guard due <= now else {
                if emitted == 0 { return .idle(afterNs: max(1_000_000, min(5_000_000, due &- now))) }
                break
            }
            guard context.isWritable(out) else { break }
            orderHead += 1
            pending.removeValue(forKey: name)
            if take(name, p, context: context) { emitted += 1 }
        }
        if orderHead > 4096 && orderHead * 2 > order.count {
            order.removeFirst(orderHead); orderHead = 0
        }
        lastEventNs = now
        return .active
    }

    /// Reads one arrival into an envelope; returns whether one was emitted.
    func take(_ name: [UInt8], _ p: Pending, context: any StageContext) -> Bool {
        let display = String(decoding: name, as: UTF8.self)
        let utf8OK = String(validating: name, as: UTF8.self) != nil
        var attrs: [String: AttrValue] = [
            "filename": .string(display), "inbox_dir": .string(canonicalDir),
            "arrival_events": .int(Int64(p.events)), "arrival": .string(p.atStart ? "present-at-start" : "event"),
        ]
        if !utf8OK { attrs["filename_hex"] = .string(Hex.encode(name)) }
        let path = FS.join(canonicalDir, name)
        var lst = stat()
        let haveLstat = lstat(path, &lst) == 0
        // Dead letters carry the identity of what is at the name, so a sink may move it (and only it).
        if haveLstat { FileIdentity(lst).record(into: &attrs) }
        func refuse(_ outcome: String, _ reason: String) -> Bool {
            outcomes[outcome, default: 0] += 1
            context.count(outcome)
            attrs["intake_error"] = .string(outcome)
            context.deadLetter(Envelope(actor: actor, intent: "intake.arrival", ingestNs: context.wallClockNs, attrs: attrs, payload: []),
                               reason: "\(display): \(reason); not taken in")
            return false
        }
        if !haveLstat && errno == ENOENT { return vanished(display, context) }
        var fd: Int32
        if haveLstat && lst.st_mode & S_IFMT == S_IFLNK {
            // A symlink: read through only when what was opened lies inside the inbox (checked on the
            // open descriptor, so swapping a directory on the way cannot lead outside).
            guard let t = FS.realPath(path) else { return refuse("refused_symlink", "a dangling symlink") }
            fd = open(t, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
            if fd >= 0 {
                guard let real = FS.pathOf(fd: fd), real.hasPrefix(canonicalDir + "/") else {
                    close(fd)
                    return refuse("refused_symlink", "a symlink leaving the inbox (to \(t))")
                }
                attrs["symlink_target"] = .string(real)
            } else if errno == ELOOP {
                return refuse("refused_symlink", "a symlink to a symlink")
            }
        } else {
            fd = open(path, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        }
        if fd < 0 {
            if errno == ENOENT { return vanished(display, context) }
            return refuse("unreadable", "cannot open: \(FS.errno_())")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return refuse("unreadable", "cannot stat: \(FS.errno_())") }
        guard st.st_mode & S_IFMT == S_IFREG else { return refuse("not_regular", "not a regular file") }
        attrs["size_bytes"] = .int(Int64(st.st_size))
        if Int(st.st_size) > maxBytes { return refuse("too_large", "\(st.st_size) bytes exceeds max_bytes \(maxBytes)") }
        // Read at most max_bytes + 1, so a file growing past the limit is caught without reading it whole.
        var data = [UInt8](repeating: 0, count: Int(st.st_size) + 1)
        var got = 0
        while true {
            if got == data.count {
                if got > maxBytes { break }
                data.append(contentsOf: repeatElement(0, count: min(64 * 1024, maxBytes + 1 - got)))
            }
            let n = data.withUnsafeMutableBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                return read(fd, base + got, raw.count - got)
            }
            if n < 0 { if errno == EINTR { continue }; return refuse("unreadable", "read failed: \(FS.errno_())") }
            if n == 0 { break }
            got += n
        }
        if got > maxBytes { return refuse("too_large", "grew past max_bytes \(maxBytes) while being read") }
        data.removeSubrange(got...)
        // Still being written (changed while we read it): wait for its next event, or a window.
        var after = stat()
        if fstat(fd, &after) == 0, FileIdentity(after) != FileIdentity(st) {
            outcomes["still_changing", default: 0] += 1
            addPending(name, Pending(dueNs: context.now &+ max(coalesceNs, 10_000_000), events: p.events, atStart: p.atStart))
            return false
        }
        if !(haveLstat && lst.st_mode & S_IFMT == S_IFLNK) { FileIdentity(st).record(into: &attrs) }
        attrs["size_bytes"] = .int(Int64(got))
        outcomes["arrivals", default: 0] += 1
        context.emit(Envelope(actor: actor, intent: "intake.arrival", ingestNs: context.wallClockNs, attrs: attrs, payload: data), to: out)
        return true
    }

    /// Gone between the event and the read (moved on, or deleted by its writer): nothing to take.
    func vanished(_ display: String, _ context: any StageContext) -> Bool {
        outcomes["vanished", default: 0] += 1
        context.count("vanished")
        context.audit(AuditRecord(decision: "inbox-vanished", actor: actor, stage: context.stageID, reason: "\(display): gone before it could be read",
                                  details: ["filename": .string(display), "dir": .string(canonicalDir)]))
        return false
    }

    func observeDepth(_ context: any StageContext) {
        let depth = present.count
        if let before = watermarks.observe(depth) {
            let after = watermarks.state
            context.logger.notice("inbox \(canonicalDir): \(before.rawValue) -> \(after.rawValue) at depth \(depth)")
            context.audit(AuditRecord(decision: "inbox-state", actor: actor, stage: context.stageID,
                                      reason: "\(before.rawValue) -> \(after.rawValue) at depth \(depth)",
                                      details: ["from": .string(before.rawValue), "to": .string(after.rawValue), "depth": .int(Int64(depth)),
                                                "low": .int(Int64(watermarks.low)), "high": .int(Int64(watermarks.high)),
                                                "release": .int(Int64(watermarks.release)), "dir": .string(canonicalDir)]))
        }
        reportDepth(context)
    }

    func reportDepth(_ context: any StageContext) {
        context.report("inbox_depth", .int(Int64(present.count)))
        context.report("inbox_state", .string(watermarks.state.rawValue))
        context.report("pending", .int(Int64(pending.count)))
        for (k, v) in outcomes { context.report(k, .int(Int64(v))) }
    }

    public func stop() { if fd >= 0 { close(fd); fd = -1 } }
}
