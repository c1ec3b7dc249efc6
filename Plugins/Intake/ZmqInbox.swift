import Foundation
import Glibc
import PipeKit
import PipeSeal
import PipeZMQ

/// `zmq-inbox`: receives sealed containers from peer hosts (`pipehost send`) over ZeroMQ CURVE
/// and drops each into an inbox directory (staging name, then rename), where the `inbox` source
/// picks it up as an arrival like any other: the normal intake (sniff, verify, move) follows.
/// Emits one `intake.received` envelope per accepted delivery (sender, name, size, sha-256) and
/// audits every delivery and refusal.
///
/// Protocol (docs/intake.md, "Sealed send"): the sender's DEALER sends two parts, a file name and
/// the container bytes; the stage answers one part, `ok <name as stored>` or `refused: <reason>`.
/// Senders authenticate with CURVE; only keys in `senders` get in (the stage runs its own ZAP
/// handler in its own ZeroMQ context, so its allow-list is its own).
public final class ZmqInboxStage: SourceStage {
    public static let descriptor = StageDescriptor(
        kind: "zmq-inbox",
        summary: "Receives sealed containers from `pipehost send` over ZeroMQ CURVE and drops them into an inbox directory for the intake.",
        role: .source,
        fields: [
            ConfigField("listen", .string, doc: "tcp://HOST:PORT to bind (a CURVE server)."),
            ConfigField("key", .string, doc: "This host's CURVE secret key file (curve.key of `pipehost keygen`); relative: the run directory."),
            ConfigField("senders", .map(.string), doc: "Allowed senders: NAME -> CURVE public key (Z85) or a curve.pub path."),
            ConfigField("dir", .string, default: .string("inbox"), doc: "The inbox directory to drop into (relative: the run directory)."),
            ConfigField("max_bytes", .int(min: 1, max: 64 << 20), default: .int(900 * 1024),
                        doc: "Largest container accepted; a larger one is refused (ZeroMQ also cuts a connection sending far more)."),
            ConfigField("actor", .string, default: .string("zmq-inbox"), doc: "The `actor` header of receipts."),
        ],
        check: { r in
            var issues: [ConfigIssue] = []
            if let l = r.string("listen"), !l.hasPrefix("tcp://") { issues.append(ConfigIssue(key: "listen", message: "listen must be tcp://HOST:PORT")) }
            if case .map(let m)? = r.value("senders"), m.isEmpty { issues.append(ConfigIssue(key: "senders", message: "senders must list at least one sender")) }
            return issues
        },
        make: { ZmqInboxStage(config: $0) })

    let listen: String, keyPath: String, dirSpec: String, actor: String
    let maxBytes: Int
    let senderSpecs: [(String, String)]
    var zmq: ZMQContext?
    var router: ZMQSocket?
    var zap: ZMQSocket?
    var allowed: [String: String] = [:]
    var dir = ""
    var stopped = false
    var received = 0, refused = 0
    /// Refusal audit records: at most 20 per 10 s (a refused client retries every 100 ms).
    var auditWindow: (start: UInt64, count: Int) = (0, 0)
    func mayAudit(_ now: UInt64) -> Bool {
        if now &- auditWindow.start > 10_000_000_000 { auditWindow = (now, 0) }
        auditWindow.count += 1
        return auditWindow.count <= 20
    }
    var out = OutputHandle(index: 0, name: "out")

    init(config c: ConfigReader) {
        listen = c.string("listen") ?? ""
        keyPath = c.string("key") ?? ""
        dirSpec = c.string("dir") ?? "inbox"
        actor = c.string("actor") ?? "zmq-inbox"
        maxBytes = Int(c.int("max_bytes") ?? 900 * 1024)
        if case .map(let m)? = c.value("senders") { senderSpecs = m.compactMap { e in e.value.stringValue.map { (e.key, $0) } } } else { senderSpecs = [] }
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out")
        dir = context.resolvePath(dirSpec)
        mkdir(dir, 0o700)
        let secret: String
        do {
            secret = try CurveKeyFiles.loadSecret(context.resolvePath(keyPath)).secretKey
            for (name, spec) in senderSpecs { allowed[try CurveKeyFiles.loadPublic(spec, base: context.runDirectory)] = name }
        } catch { throw StageError.halt("zmq-inbox: \(error)") }
        do {
            let ctx = try ZMQContext()
            // Its own context, so its own ZAP handler: bound before the CURVE listener.
            let z = try ctx.socket(.router)
            try z.bind("inproc://zeromq.zap.01")
            let r = try ctx.socket(.router)
            try r.setMaxMessageSize(Int64(maxBytes) + 65_536)
            try r.makeCurveServer(secretKey: secret, domain: "zmq-inbox")
            try r.bind(listen)
            zmq = ctx; zap = z; router = r
        } catch { throw StageError.halt("zmq-inbox: cannot listen on \(listen): \(error)") }
        context.report("listen", .string(listen))
        context.report("dir", .string(dir))
    }

    public func requestStop() { stopped = true }

    public func produce(budget: Int, context: any StageContext) throws -> SourceProgress {
        if stopped { closeSockets(); return .exhausted }
        guard let r = router, let z = zap else { return .exhausted }
        while let parts = try? z.receiveParts(dontWait: true), let req = ZAPRequest.parse(parts) {
            let name = req.clientKey.flatMap { allowed[$0] }
            _ = try? z.send(parts: req.reply(allow: name, reason: name == nil ? "unknown sender key" : "OK"))
            if name == nil {
                refused += 1
                context.report("refused", .int(Int64(refused)))
                if mayAudit(context.now) { context.audit(AuditRecord(decision: "send-refused", intent: "intake.send", reason: "unknown sender key",
                                          details: ["key": .string(req.clientKey ?? ""), "address": .string(req.address)])) }
            }
        }
        var n = 0
        while n < budget, let first = try? r.receiveMessage(dontWait: true) {
            var parts = [first]
            while parts[parts.count - 1].hasMore, let m = try? r.receiveMessage() { parts.append(m) }
            n += 1
            let routing = first.bytes
            let sender = parts.last?.property("User-Id") ?? "?"
            let answer = accept(parts, sender: sender, context: context)
            _ = try? r.send(parts: [routing, Array(answer.utf8)], dontWait: true)
        }
        return n > 0 ? .active : .idle(afterNs: 5_000_000)
    }

    /// Checks one delivery and drops it into the inbox; returns the answer for the sender.
    func accept(_ parts: [ZMQMessage], sender: String, context: any StageContext) -> String {
        func refuse(_ why: String, _ name: String = "") -> String {
            refused += 1
            context.report("refused", .int(Int64(refused)))
            if mayAudit(context.now) { context.audit(AuditRecord(decision: "send-refused", actor: sender, intent: "intake.send", reason: why,
                                      details: ["sender": .string(sender), "filename": .string(name)])) }
            return "refused: " + why
        }
        guard parts.count == 3 else { return refuse("expected two parts (file name, container), got \(parts.count - 1)") }
        let name = String(decoding: parts[1].bytes, as: UTF8.self)
        guard !name.isEmpty, name.utf8.count <= 200, !name.hasPrefix("."), !name.contains("/"), !name.contains("\0"), !Sniff.isStaging(name) else {
            return refuse("bad file name (empty, hidden, a path, a staging name, or over 200 bytes)", name)
        }
        let size = parts[2].count
        guard size <= maxBytes else { return refuse("container of \(size) bytes is over max_bytes \(maxBytes)", name) }
        let data = parts[2].bytes
        // Never over an existing file: a second delivery of one name gets a suffix.
        var stored = name
        var k = 1
        while FileManager.default.fileExists(atPath: dir + "/" + stored) { stored = "\(name).\(k)"; k += 1 }
        let staging = dir + "/.\(stored).\(getpid()).part"
        let fd = open(staging, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return refuse("cannot write into the inbox: \(String(cString: strerror(errno)))", name) }
        let written = data.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        Glibc.close(fd)
        // A rename that never replaces an existing name (renameat2 RENAME_NOREPLACE): a name taken
        // meanwhile gets the next suffix. The inbox sees the file moved in, whole.
        var moved = written == data.count && synced
        while moved, Self.renameNoReplace(staging, dir + "/" + stored) != 0 {
            if errno == EEXIST && k < 10_000 { stored = "\(name).\(k)"; k += 1 } else { moved = false }
        }
        guard moved else {
            let why = String(cString: strerror(errno))
            unlink(staging)
            return refuse("cannot write into the inbox: \(why)", name)
        }
        received += 1
        context.report("received", .int(Int64(received)))
        let sha = Hex.encode(Digest.sha256(data))
        let attrs: [String: AttrValue] = ["sender": .string(sender), "filename": .string(stored), "size_bytes": .int(Int64(size)), "sha256": .string(sha)]
        context.audit(AuditRecord(decision: "received", actor: sender, intent: "intake.send",
                                  reason: "\(size) bytes from '\(sender)' stored as \(stored)", details: attrs))
        context.emit(Envelope(actor: actor, intent: "intake.received", ingestNs: context.wallClockNs, attrs: attrs, payload: []), to: out)
        return "ok " + stored
    }

    typealias RenameAt2 = @convention(c) (Int32, UnsafePointer<CChar>, Int32, UnsafePointer<CChar>, UInt32) -> Int32
    /// glibc's renameat2 (not in Swift's Glibc module); nil where the C library lacks it.
    static let renameat2: RenameAt2? = {
        guard let h = dlopen(nil, RTLD_NOW), let f = dlsym(h, "renameat2") else { return nil }
        return unsafeBitCast(f, to: RenameAt2.self)
    }()

    /// rename(2) that fails with EEXIST instead of replacing `to`; where the kernel or file system
    /// cannot, an existence check and a plain rename (racy only against other local writers).
    static func renameNoReplace(_ from: String, _ to: String) -> Int32 {
        if let r = renameat2 {
            let rc = r(-100, from, -100, to, 1)  // AT_FDCWD, RENAME_NOREPLACE
            if rc == 0 || (errno != EINVAL && errno != ENOSYS) { return rc }
        }
        if access(to, F_OK) == 0 { errno = EEXIST; return -1 }
        return rename(from, to)
    }

    func closeSockets() {
        router?.close(); zap?.close(); router = nil; zap = nil
        zmq?.terminate(); zmq = nil
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {}
    public func stop() { closeSockets() }
}
