import Foundation
import PipeKit

/// Moving files without losing them: never overwrite (a taken name gets `.1`, `.2`, ...), link
/// then unlink on one file system, copy + fsync + unlink across file systems, and on any failure
/// leave the source where it was.
struct MoveFailure: Error, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

enum Mover {
    /// `dir/name`, then `dir/name.1`, `dir/name.2`, ... (made one at a time, as needed).
    static func candidates(_ dir: String, _ name: [UInt8]) -> LazyMapSequence<Range<Int>, [CChar]> {
        (0..<1000).lazy.map { i in
            if i == 0 { return FS.join(dir, name) }
            // Keep within NAME_MAX (255 bytes) when adding the suffix.
            let suffix = Array(".\(i)".utf8)
            return FS.join(dir, Array(name.prefix(255 - suffix.count)) + suffix)
        }
    }
    static func string(_ p: [CChar]) -> String { String(decoding: p.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }

    typealias Renameat2 = @convention(c) (Int32, UnsafePointer<CChar>, Int32, UnsafePointer<CChar>, UInt32) -> Int32
    /// glibc's renameat2 (not in Swift's Glibc module), looked up once.
    static let renameat2: Renameat2? = {
        guard let h = dlopen(nil, RTLD_NOW), let f = dlsym(h, "renameat2") else { return nil }
        return unsafeBitCast(f, to: Renameat2.self)
    }()
    static let renameNoReplace: UInt32 = 1

    /// Moves the file at `src`, which must still be `identity`, into `dir` as `name`; returns the
    /// destination path, or why not. Never overwrites, never deletes a file it did not move: on one
    /// file system an atomic rename that refuses to replace (then the moved inode is checked, and put
    /// back if someone swapped the name in between); across file systems a copy from the checked,
    /// open file, fsynced with its directory, before the source name is removed (only if it still
    /// names that file).
    static func move(_ src: [CChar], identity: FileIdentity, into dir: String, name: [UInt8]) -> Result<String, MoveFailure> {
        var st = stat()
        guard lstat(src, &st) == 0 else { return .failure(MoveFailure("gone (\(FS.errno_())); nothing to move")) }
        guard FileIdentity(st) == identity else {
            return .failure(MoveFailure("changed since it was read (its new content is a new arrival); left in place"))
        }
        for dst in candidates(dir, name) {
            let rc: Int32
            if let r = renameat2 { rc = r(AT_FDCWD, src, AT_FDCWD, dst, renameNoReplace) } else { rc = -1; errno = EINVAL }
            if rc == 0 {
                var moved = stat()
                if lstat(dst, &moved) == 0, !identity.sameInode(moved) {
                    // Swapped between our check and the rename: put it back and leave it for its own arrival.
                    let back = renameat2.map { $0(AT_FDCWD, dst, AT_FDCWD, src, renameNoReplace) } ?? -1
                    return .failure(MoveFailure(back == 0 ? "replaced just before the move; put back, left in place"
                                                          : "replaced just before the move; the newer file is at \(string(dst))"))
                }
                return .success(string(dst))
            }
            switch errno {
            case EEXIST: continue
            case EXDEV: return copyThenUnlink(src, identity: identity, dir: dir, name: name)
            case EINVAL, ENOSYS, ENOTSUP: return linkThenUnlink(src, identity: identity, dir: dir, name: name)
            default: return .failure(MoveFailure("cannot move to \(dir): \(FS.errno_())"))
            }
        }
        return .failure(MoveFailure("no free name for \(String(decoding: name, as: UTF8.self)) in \(dir)"))
    }

    /// For file systems without RENAME_NOREPLACE: link (fails on an existing name), then unlink the
    /// source only while it still names the moved inode.
    static func linkThenUnlink(_ src: [CChar], identity: FileIdentity, dir: String, name: [UInt8]) -> Result<String, MoveFailure> {
        for dst in candidates(dir, name) {
            if link(src, dst) == 0 {
                var now = stat()
                guard lstat(src, &now) == 0, identity.sameInode(now) else {
                    unlink(dst)
                    return .failure(MoveFailure("replaced during the move; left in place"))
                }
                if unlink(src) != 0 {
                    let why = FS.errno_()
                    unlink(dst)
                    return .failure(MoveFailure("cannot remove the source after linking: \(why)"))
                }
                return .success(string(dst))
            }
            switch errno {
            case EEXIST: continue
            case EXDEV, EPERM, EMLINK, ENOTSUP: return copyThenUnlink(src, identity: identity, dir: dir, name: name)
            default: return .failure(MoveFailure("cannot move to \(dir): \(FS.errno_())"))
            }
        }
        return .failure(MoveFailure("no free name for \(String(decoding: name, as: UTF8.self)) in \(dir)"))
    }

    static func copyThenUnlink(_ src: [CChar], identity: FileIdentity, dir: String, name: [UInt8]) -> Result<String, MoveFailure> {
        let sfd = open(src, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard sfd >= 0 else { return .failure(MoveFailure("cannot open the source to copy it: \(FS.errno_())")) }
        defer { close(sfd) }
        var st = stat()
        guard fstat(sfd, &st) == 0 else { return .failure(MoveFailure("cannot stat the source: \(FS.errno_())")) }
        guard st.st_mode & S_IFMT == S_IFREG else { return .failure(MoveFailure("not a regular file; not copied across file systems")) }
        guard FileIdentity(st) == identity else { return .failure(MoveFailure("changed since it was read; left in place")) }
        switch create(in: dir, name: name, mode: mode_t(st.st_mode & 0o777), fill: { dfd in
            var buf = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let n = buf.withUnsafeMutableBytes { read(sfd, $0.baseAddress, $0.count) }
                if n < 0 { if errno == EINTR { continue }; return "read failed: \(FS.errno_())" }
                if n == 0 { return nil }
                if let e = writeAll(dfd, buf, n) { return e }
            }
        }) {
        case .failure(let e): return .failure(e)
        case .success(let dst):
            syncDirectory(dir)
            var now = stat()
            // Remove the source name only while it still names the file we copied.
            if lstat(src, &now) == 0, identity.sameInode(now), unlink(src) != 0 {
                let why = FS.errno_()
                unlink(Array(dst.utf8CString))
                return .failure(MoveFailure("copied, but cannot remove the source: \(why); the copy was removed"))
            }
            return .success(dst)
        }
    }

    static func syncDirectory(_ dir: String) {
        let d = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if d >= 0 { fsync(d); close(d) }
    }

    static func writeAll(_ fd: Int32, _ buf: [UInt8], _ count: Int) -> String? {
        var done = 0
        while done < count {
            let n = buf.withUnsafeBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                return Glibc.write(fd, base + done, count - done)
            }
            if n < 0 { if errno == EINTR { continue }; return "write failed: \(FS.errno_())" }
            done += n
        }
        return nil
    }

    /// Creates a new file in `dir` (never overwriting), fills it, fsyncs it; removes it on failure.
    static func create(in dir: String, name: [UInt8], mode: mode_t = 0o644, fill: (Int32) -> String?) -> Result<String, MoveFailure> {
        for dst in candidates(dir, name) {
            let fd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
            if fd < 0 {
                if errno == EEXIST { continue }
                return .failure(MoveFailure("cannot create a file in \(dir): \(FS.errno_())"))
            }
            var err = fill(fd)
            if err == nil, fsync(fd) != 0 { err = "fsync failed: \(FS.errno_())" }
            if close(fd) != 0, err == nil { err = "close failed: \(FS.errno_())" }
            if let e = err { unlink(dst); return .failure(MoveFailure(e)) }
            return .success(string(dst))
        }
        return .failure(MoveFailure("no free name for \(String(decoding: name, as: UTF8.self)) in \(dir)"))
    }

    /// Writes `bytes` as a new file in `dir` (never overwriting).
    static func write(_ bytes: [UInt8], in dir: String, name: [UInt8]) -> Result<String, MoveFailure> {
        create(in: dir, name: name) { fd in writeAll(fd, bytes, bytes.count) }
    }
}

/// What a file-moving sink does with one envelope: move the inbox file it came from (checked to
/// be the same file that was read), or write its payload when it did not come from a file.
struct FileMoveAction {
    let dir: String

    enum Outcome { case moved(from: String, to: String), written(to: String), failed(String) }

    func apply(_ e: Envelope) -> Outcome {
        let name = FS.nameBytes(e) ?? Array(e.id.description.utf8)
        if let why = unsafeName(name) { return .failed("refusing file name '\(String(decoding: name, as: UTF8.self))': \(why)") }
        guard let inbox = e.attrs["inbox_dir"]?.stringValue else {
            let bytes = e.payload
            switch Mover.write(bytes, in: dir, name: name) {
            case .success(let to): return .written(to: to)
            case .failure(let why): return .failed(why.message)
            }
        }
        let src = FS.join(inbox, name)
        let from = Mover.string(src)
        guard let identity = FileIdentity(attrs: e.attrs) else {
            return .failed("\(from): the envelope carries no file identity, so it cannot prove which file it was; left in place")
        }
        switch Mover.move(src, identity: identity, into: dir, name: name) {
        case .success(let to): return .moved(from: from, to: to)
        case .failure(let why):
            let said = why.message.contains("left in place") || why.message.contains("the newer file is at")
            return .failed("\(from): \(why.message)" + (said ? "" : "; left where it was"))
        }
    }

    /// A file name a sink may use: one path component.
    func unsafeName(_ name: [UInt8]) -> String? {
        if name.isEmpty { return "empty" }
        if name.contains(0x2F) || name.contains(0) { return "contains '/' or NUL" }
        if name == [0x2E] || name == [0x2E, 0x2E] { return "'.' or '..'" }
        return nil
    }
}

/// The file-moving sinks: `quarantine-sink`, `triage-sink`, `reject-sink`. Each move is an audit
/// record (from, to, class, reason); a move that fails leaves the file where it was and says so
/// (audit `move-failed`, a warning, the `move_failed` count).
public final class MoveSinkStage: Stage {
    static func descriptor(kind: String, decision: String, defaultDir: String, what: String) -> StageDescriptor {
        StageDescriptor(
            kind: kind, summary: "Moves each envelope's inbox file into the \(what) directory (or writes its payload there), never overwriting.",
            role: .sink,
            inputs: [InputPort("in", doc: "classified arrivals to move")],
            fields: [ConfigField("dir", .string, default: .string(defaultDir), doc: "The \(what) directory (created if missing); relative to the run directory.")],
            make: { MoveSinkStage(decision: decision, dir: $0.string("dir") ?? defaultDir) })
    }
    public static let quarantine = descriptor(kind: "quarantine-sink", decision: "quarantine", defaultDir: "quarantine", what: "quarantine")
    public static let triage = descriptor(kind: "triage-sink", decision: "triage", defaultDir: "triage", what: "triage")
    public static let reject = descriptor(kind: "reject-sink", decision: "reject", defaultDir: "reject", what: "reject")

    let decision: String
    let dirSpec: String
    var action: FileMoveAction?
    var moved = 0, failed = 0
    init(decision: String, dir: String) { self.decision = decision; self.dirSpec = dir }

    public func start(context: any StageContext) throws {
        let d = context.resolvePath(dirSpec)
        try FS.mkdirs(d)
        action = FileMoveAction(dir: d)
        context.report("dir", .string(d))
    }

    public func process(_ e: Envelope, from arrival: Arrival, context: any StageContext) throws {
        guard let action else { return }
        IntakeAudit.record(action.apply(e), e, decision: decision, context: context, moved: &moved, failed: &failed)
    }
    public func drain(context: any StageContext) throws { report(context) }
    public var tickInterval: UInt64? { 1_000_000_000 }
    public func tick(context: any StageContext) throws { report(context) }
    func report(_ context: any StageContext) {
        context.report("moved", .int(Int64(moved))); context.report("move_failed", .int(Int64(failed)))
    }
}

enum IntakeAudit {
    /// Why the envelope got here, from what earlier stages attached.
    static func reason(_ e: Envelope) -> String {
        if let r = e.attrs["seal_reason"]?.stringValue { return r }
        if let r = e.attrs["dead_letter_reason"]?.stringValue { return r }
        let c = e.attrs["intake_class"]?.stringValue ?? "unclassified"
        return "\(c) -> \(e.attrs["disposition"]?.stringValue ?? "?")"
    }

    static func record(_ outcome: FileMoveAction.Outcome, _ e: Envelope, decision: String, context: any StageContext,
                       moved: inout Int, failed: inout Int) {
        var d: [String: AttrValue] = ["filename": e.attrs["filename"] ?? .string("")]
        for k in ["intake_class", "disposition", "seal_status"] { if let v = e.attrs[k] { d[k] = v } }
        switch outcome {
        case .moved(let from, let to):
            moved += 1; context.count("moved")
            d["from"] = .string(from); d["to"] = .string(to)
            context.audit(.about(e, decision: decision, reason: reason(e), details: d))
        case .written(let to):
            moved += 1; context.count("written")
            d["to"] = .string(to)
            context.audit(.about(e, decision: decision, reason: reason(e), details: d))
        case .failed(let why):
            failed += 1; context.count("move_failed")
            d["wanted"] = .string(decision)
            context.logger.warning("\(decision) of \(e.attrs["filename"]?.stringValue ?? e.id.description) failed: \(why)")
            context.audit(.about(e, decision: "move-failed", reason: why, details: d))
        }
    }
}
