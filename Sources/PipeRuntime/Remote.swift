import Foundation
import Glibc
import Logging
import PipeConfig
import PipeKit
import PipeSeal
import PipeZMQ
import Synchronization

/// CURVE keys on disk (PipeZMQ's CurveKeyFiles), with the runtime's error type.
public enum CurveKeys {
    public static func loadSecret(_ path: String) throws(RuntimeError) -> CurveKeyPair {
        do { let k = try CurveKeyFiles.loadSecret(path); return CurveKeyPair(publicKey: k.publicKey, secretKey: k.secretKey) }
        catch { throw .io(error.description) }
    }

    public static func loadPublic(_ keyOrPath: String, base: String) throws(RuntimeError) -> String {
        do { return try CurveKeyFiles.loadPublic(keyOrPath, base: base) } catch { throw .io(error.description) }
    }
}

/// Why a grant was refused (the text goes to the log and the audit record).
struct GrantRefusal: Error, ExpressibleByStringInterpolation, CustomStringConvertible {
    let description: String
    init(_ s: String) { description = s }
    init(stringLiteral s: String) { description = s }
}

/// Free tcp ports on one host, picked by the kernel. Each stays bound (so the kernel cannot pick
/// it twice) until ``releaseAll()``, just before the runners bind them (ZeroMQ listeners set
/// SO_REUSEADDR); only another process could take one in between.
public final class PortReserver {
    let host: String
    var fds: [Int32] = []
    public init(host: String) { self.host = host }
    deinit { releaseAll() }

    public func reserve() throws(RuntimeError) -> Int {
        var hints = addrinfo()
        hints.ai_family = AF_INET
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var res: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, "0", &hints, &res) == 0, let ai = res else { throw .io("cannot resolve remote.listen host '\(host)' (IPv4)") }
        defer { freeaddrinfo(res) }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw .io("socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var addr = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        guard bind(fd, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0,
              withUnsafeMutablePointer(to: &addr, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) } }) == 0 else {
            let why = String(cString: strerror(errno))
            close(fd)
            throw .io("cannot reserve a tcp port on \(host): \(why)")
        }
        fds.append(fd)
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    public func releaseAll() {
        for fd in fds { close(fd) }
        fds.removeAll()
    }
}

/// One free tcp port on `host` (released at once; for tests and benchmarks).
public func reserveTCPPort(host: String) throws(RuntimeError) -> Int {
    try PortReserver(host: host).reserve()
}

/// The host's side of remote workers (docs/operations.md, "Remote workers"): the registration
/// ROUTER on `remote.listen`, the ZAP handler that authenticates every tcp connection of the
/// host's context against `remote.workers`, and which connection runs which stage.
/// Confined to the host thread, like the host.
final class RemoteHost {
    struct Worker {
        var name: String
        var key: String
        var connected = false
        var lastSeenNs: UInt64 = 0
        var address = ""
        var registrations = 0
        var badFrames = 0
        var cutOff = false
    }

    let spec: RemoteSpec
    let router: ZMQSocket
    let zap: ZMQSocket?
    let monitor: ZMQSocket?
    let layout: RemoteLayout
    /// Public key -> worker name (the allow-list).
    let names: [String: String]
    /// Owners whose grants admit workers (32-byte Ed25519 public keys), and what they admitted:
    /// worker key -> its name, granted stages and epoch (until revoked).
    var owners: [[UInt8]] = []
    var granted: [String: (name: String, stages: Set<String>, epoch: UInt64, expires: Int64)] = [:]
    var epochs: GrantEpochs?
    /// The remote control endpoint (`remote.control`) and its operators: public key -> name.
    var control: ZMQSocket?
    /// Forwards the lanes between two remote stages (nil: there are none).
    var relay: LaneRelay?
    var operators: [String: String] = [:]
    static let controlDomain = "pipehost-control"
    var workers: [String: Worker] = [:]
    /// stage -> routing id of its runner's connection, and back.
    var routes: [String: [UInt8]] = [:]
    var stageOf: [[UInt8]: String] = [:]
    /// stage -> monotonic time of its last frame.
    var lastFrame: [String: UInt64] = [:]
    var refused = 0
    var handshakeFailures = 0
    /// Well-formed frames from an admitted worker on a connection that has no stage (any more).
    var staleFrames = 0
    /// The peer address of the message being handled (for refusal records).
    var currentAddress = ""
    /// Log lines and audit records about refusals: at most `auditBurst` per 10 s for each kind of
    /// refusal and key (a refused client retries every 100 ms; a flood stays counted, not written).
    var auditWindows: [String: (start: UInt64, count: Int)] = [:]
    var totalWindow: (start: UInt64, count: Int) = (0, 0)
    static let auditBurst = 5
    static let auditTotal = 40
    let startedNs = monotonicNs()

    init(spec: RemoteSpec, router: ZMQSocket, zap: ZMQSocket?, monitor: ZMQSocket?, layout: RemoteLayout, names: [String: String]) {
        self.spec = spec; self.router = router; self.zap = zap; self.monitor = monitor; self.layout = layout; self.names = names
        for (k, n) in names { workers[n] = Worker(name: n, key: k) }
        for w in spec.workers where workers[w.name] == nil { workers[w.name] = Worker(name: w.name, key: "") }
    }

    /// The ZAP domain of the registration endpoint: with owners, any CURVE key may connect there
    /// to present a grant (and nothing else); lane endpoints admit only known keys.
    static let registerDomain = "pipehost-register"

    /// The worker name of an admitted key: listed, or granted and not revoked.
    func name(ofKey key: String) -> String? { names[key] ?? granted[key]?.name }
    /// The key behind an authenticated User-Id (a name, or `key:<Z85>` for a not yet granted key).
    func key(ofUser user: String) -> String? {
        if user.hasPrefix("key:") { return String(user.dropFirst(4)) }
        return names.first { $0.value == user }?.key ?? granted.first { $0.value.name == user }?.key
    }

    /// Whether worker `name` may run `stage`: listed by key, or granted that stage (and not revoked).
    func mayRun(_ stage: String, worker name: String) -> Bool {
        if names.values.contains(name) { return true }
        // At most one granted key per name (a newer grant replaces the key before it).
        return granted.values.contains { $0.name == name && $0.stages.contains(stage) }
    }

    func mayAudit(_ now: UInt64, _ what: String) -> Bool {
        // Overall, at most `auditTotal` per 10 s, whatever the kinds (a flood of fresh keys cannot
        // write more than that, nor reset anyone's window).
        if now - totalWindow.start > 10_000_000_000 { totalWindow = (now, 0) }
        guard totalWindow.count < Self.auditTotal else { return false }
        if auditWindows.count > 1000 { auditWindows.removeAll() }
        var w = auditWindows[what] ?? (now, 0)
        if now - w.start > 10_000_000_000 { w = (now, 0) }
        w.count += 1
        auditWindows[what] = w
        if w.count <= Self.auditBurst { totalWindow.count += 1; return true }
        return false
    }
}

extension PipelineHost {
    /// Opens the remote side when some stage runs on a remote worker: the ZAP handler first (a
    /// CURVE listener without one would let every client in), then the registration ROUTER, and
    /// the tcp ports of every lane that crosses to a worker.
    func openRemote() throws(RuntimeError) {
        // Nothing left over from an earlier host of this run directory in this process.
        _ = RemoteRefusals.shared.take(run: options.runDirectory)
        _ = LaneHandshakes.shared.take(run: options.runDirectory)
        let hasWorkers = plan.stages.contains(where: { $0.placement.isRemote })
        guard hasWorkers || plan.spec.remote?.control != nil else { return }
        guard let r = plan.spec.remote else { throw .plan("stages are placed on remote workers but the pipeline has no `remote:` section") }
        let base = (plan.spec.file as NSString).deletingLastPathComponent.isEmpty ? "." : (plan.spec.file as NSString).deletingLastPathComponent
        var names: [String: String] = [:]
        for w in r.workers where !w.key.isEmpty {
            let key = try CurveKeys.loadPublic(w.key, base: base)
            if let other = names[key] { throw .plan("workers '\(other)' and '\(w.name)' have the same key") }
            names[key] = w.name
        }
        var owners: [[UInt8]] = []
        for o in r.owners {
            var text = o
            if Hex.decode(o)?.count != 32 {
                let path = o.hasPrefix("/") ? o : base + "/" + o
                do { text = try KeyFiles.read(path).trimmingCharacters(in: .whitespacesAndNewlines) } catch { throw .io("remote.owners: \(error)") }
            }
            guard let k = Hex.decode(text), k.count == 32 else { throw .io("remote.owners: '\(o)' is not an Ed25519 public key (hex) or a signing.pub file") }
            owners.append(k)
        }
        var security = TCPSecurity(curve: false, serverPublicKey: "", serverSecretKey: nil)
        if !r.insecure {
            guard let kp = r.key else { throw .plan("remote needs key: (the host's curve.key) unless insecure: true") }
            let keys = try CurveKeys.loadSecret(kp.hasPrefix("/") ? kp : base + "/" + kp)
            security = TCPSecurity(curve: true, serverPublicKey: keys.publicKey, serverSecretKey: keys.secretKey)
        } else {
            log.warning("remote.insecure: true: workers connect over plaintext tcp on \(r.listen), with no authentication and no encryption; anyone who can reach the port can run a stage or read its lanes")
        }
        do {
            var zap: ZMQSocket?
            if security.curve {
                let z = try zmq.socket(.router)
                try z.bind("inproc://zeromq.zap.01")
                zap = z
            }
            let router = try zmq.socket(.router)
            try router.setRouterMandatory(false)
            // A runner that reconnects (same random routing id) takes its route over.
            try router.setInt(ZMQ_ROUTER_HANDOVER_OPT, 1)
            try router.setReceiveHWM(10_000); try router.setSendHWM(0)
            // HELLO, STATS and AUDIT frames only; AUDIT frames are capped at 4 MiB.
            try router.setMaxMessageSize(Int64(4 << 20) + 64)
            try TCPLinks.prepare(router)
            let monitorEndpoint = "inproc://\(runTag)/remote-monitor"
            try router.monitorHandshakes(monitorEndpoint)
            let mon = try zmq.socket(.pair)
            // Unbounded: a flood of bad handshakes between two passes of the host loop must not
            // make libzmq's I/O thread wait on this pipe.
            try mon.setReceiveHWM(0)
            try mon.connect(monitorEndpoint)
            if let secret = security.serverSecretKey { try router.makeCurveServer(secretKey: secret, domain: RemoteHost.registerDomain) }
            try router.bind(r.listen)
            let ports = PortReserver(host: r.listenHost)
            defer { ports.releaseAll() }
            let layout = try RemoteLayout.make(plan: plan, bindHost: r.listenHost, connectHost: r.laneHost, security: security) { () throws(RuntimeError) -> Int in
                try ports.reserve()
            }
            let rm = RemoteHost(spec: r, router: router, zap: zap, monitor: mon, layout: layout, names: names)
            rm.owners = owners
            if let ce = r.control {
                for o in r.operators { rm.operators[try CurveKeys.loadPublic(o.key, base: base)] = o.name }
                let c = try zmq.socket(.router)
                try c.setRouterMandatory(false)
                try c.setMaxMessageSize(65_536)
                try TCPLinks.prepare(c)
                if let secret = security.serverSecretKey { try c.makeCurveServer(secretKey: secret, domain: RemoteHost.controlDomain) }
                try c.bind(ce)
                rm.control = c
                log.info("remote control on \(ce) (\(security.curve ? "CURVE; operators: \(r.operators.map(\.name).joined(separator: ", "))" : "plaintext, read-only")); stop and grant stay local")
            }
            if !owners.isEmpty {
                let path = r.grantEpochs.hasPrefix("/") ? r.grantEpochs : options.runDirectory + "/" + r.grantEpochs
                do { rm.epochs = try GrantEpochs(path: path) } catch { throw RuntimeError.io("cannot open the grant epochs \(path): \(error)") }
            }
            remote = rm
        } catch let e as RuntimeError { throw e } catch {
            throw .io("cannot open the remote endpoint \(r.listen): \(error)")
        }
        if let rm = remote, !rm.layout.relayed.isEmpty {
            // After the reserved ports were let go (they are these ports).
            do {
                let relay = try LaneRelay(context: zmq, plan: plan, layout: rm.layout, runDir: options.runDirectory)
                relay.start()
                rm.relay = relay
                log.info("relaying \(rm.layout.relayed.count) lane(s) whose ends both run outside this host process")
            } catch {
                closeRemote()
                remote = nil
                throw .io("cannot open the relay of the lanes with no end in the host process: \(error)")
            }
        }
        let placed = plan.stages.filter { $0.placement.isRemote }.map { "\($0.id) on \($0.placement.workerName ?? "")" }
        log.info("remote workers connect to \(r.listen) (\(security.curve ? "CURVE, server key \(security.serverPublicKey)" : "plaintext")); waiting for: \(placed.joined(separator: ", "))")
    }

    /// Takes what arrived on the remote side: ZAP requests, handshake events, runner frames.
    func pollRemote() {
        guard let rm = remote else { return }
        if let z = rm.zap { while let parts = try? z.receiveParts(dontWait: true) { handleZAP(parts, rm) } }
        if let relay = rm.relay {
            let (refusals, dropped) = relay.takeRefusals()
            takeRefusals(refusals, dropped: dropped, rm, intent: "remote.relay")
        }
        for t in RemoteRefusals.shared.take(run: options.runDirectory) {
            takeRefusals(t.samples, dropped: 0, rm, intent: "remote.lane")
            // Beyond the samples: counted against the worker (garbage) or as refused, not audited one by one.
            let g = t.garbage - t.samples.filter(\.garbage).count, b = t.banned - t.samples.filter { !$0.garbage }.count
            if g > 0 {
                remoteGarbage([], rm, t.samples.first(where: \.garbage)?.why ?? "frames on its lane ports that are not the protocol",
                              worker: t.worker.isEmpty ? nil : t.worker, count: g)
            }
            rm.refused += max(0, b)
        }
        for t in LaneHandshakes.shared.take(run: options.runDirectory) {
            rm.handshakeFailures += t.count
            if rm.mayAudit(monotonicNs(), "lane handshake \(t.endpoint) \(t.event) \(t.value)") {
                log.warning("remote: \(t.count) connection(s) to lane port \(t.endpoint) failed the handshake: \(t.reason) (\(rm.handshakeFailures) so far)")
                auditWriter?.submit(AuditRecord(decision: "worker-refused", stage: "host", intent: "remote.lane-handshake",
                                                reason: "handshake failed on lane port \(t.endpoint): \(t.reason)",
                                                details: ["endpoint": .string(t.endpoint), "event": .int(Int64(t.event)), "value": .int(Int64(t.value)),
                                                          "failures": .int(Int64(t.count)), "failures_so_far": .int(Int64(rm.handshakeFailures))]))
            }
        }
        if let m = rm.monitor {
            while let ev = ZMQMonitorEvent.receive(from: m) {
                guard ev.isHandshakeFailure else { continue }
                rm.handshakeFailures += 1
                // Refused authentications are the ZAP handler's to report.
                if ev.event == 0x4000 { continue }
                if rm.mayAudit(monotonicNs(), "handshake \(ev.value)") {
                    log.warning("remote: a connection to \(rm.spec.listen) failed its handshake: \(ev.reason) (\(rm.handshakeFailures) so far)")
                    auditWriter?.submit(AuditRecord(decision: "worker-refused", stage: "host", intent: "remote.handshake",
                                                    reason: "handshake failed on \(rm.spec.listen): \(ev.reason)",
                                                    details: ["event": .int(Int64(ev.event)), "value": .int(Int64(ev.value)),
                                                              "failures_so_far": .int(Int64(rm.handshakeFailures))]))
                }
            }
        }
        if let c = rm.control {
            while let first = try? c.receiveMessage(dontWait: true) {
                var parts = [first.bytes]
                var last = first
                while last.hasMore, let m = try? c.receiveMessage() { parts.append(m.bytes); last = m }
                let user = last.property("User-Id") ?? ""
                let op = user.hasPrefix("operator:") ? String(user.dropFirst(9)) : (rm.layout.security.curve ? nil : "insecure")
                guard let op else { continue }
                handleControl(parts, operator: op)
            }
        }
        // A budget per pass: a flood waits in ZeroMQ's queues instead of stalling the host loop.
        var budget = 512
        while budget > 0, let first = try? rm.router.receiveMessage(dontWait: true) {
            budget -= 1
            let routing = first.bytes
            var body: ZMQMessage?
            var extra = false
            while (body.map(\.hasMore) ?? first.hasMore), let m = try? rm.router.receiveMessage() {
                if body != nil { extra = true }
                body = m
            }
            guard let body, !extra else { remoteGarbage(routing, rm, "a message of more than two parts", worker: body.flatMap(remoteWorker)); continue }
            // Before a HELLO is accepted, nothing legitimate is bigger than a HELLO with a grant.
            if rm.stageOf[routing] == nil && body.count > 70_000 {
                remoteGarbage(routing, rm, "a \(body.count)-byte message before HELLO", worker: remoteWorker(body)); continue
            }
            handleRemote(routing: routing, body, rm)
        }
    }

    /// ZAP (RFC 27): a CURVE client is let in only with a key on the allow-list; the worker's
    /// name becomes the connection's User-Id, which every frame from it then carries.
    func handleZAP(_ parts: [[UInt8]], _ rm: RemoteHost) {
        guard let req = ZAPRequest.parse(parts) else { return }
        var name: String?
        var reason = "OK"
        if req.domain == RemoteHost.controlDomain {
            // The control endpoint admits operators only, never a worker key (and the worker
            // endpoints never admit an operator key).
            if req.mechanism == "CURVE", let key = req.clientKey, let op = rm.operators[key] { name = "operator:" + op } else { reason = "unknown operator key" }
        } else if req.mechanism != "CURVE" {
            reason = "mechanism \(req.mechanism) is not allowed (CURVE only)"
        } else if let key = req.clientKey, let n = rm.name(ofKey: key) {
            if rm.workers[n]?.cutOff == true { reason = "worker '\(n)' was cut off for sending garbage" }
            else if req.domain.hasPrefix("pipehost-port:") {
                // A lane port admits only the workers at the far end of its lanes.
                let port = Int(req.domain.dropFirst("pipehost-port:".count)) ?? -1
                if rm.layout.admits[port]?.contains(n) == true { name = n } else { reason = "worker '\(n)' has no lane on port \(port)" }
            } else if req.domain == RemoteHost.registerDomain { name = n }
            else { reason = "unknown ZAP domain '\(req.domain)'" }
        } else if let key = req.clientKey, !rm.owners.isEmpty, req.domain == RemoteHost.registerDomain {
            // May present a grant on the registration endpoint, and do nothing else until it is accepted.
            name = "key:" + key
        } else {
            reason = rm.owners.isEmpty ? "unknown worker key" : "unknown worker key and no accepted grant"
        }
        _ = try? rm.zap?.send(parts: req.reply(allow: name, reason: reason))
        guard name == nil else { return }
        rm.refused += 1
        let key = req.clientKey ?? ""
        if rm.mayAudit(monotonicNs(), "zap \(key)") {
            log.warning("remote: refused a connection from \(req.address) (key \(key.isEmpty ? "none" : key)): \(reason) (\(rm.refused) so far)")
            auditWriter?.submit(AuditRecord(decision: req.domain == RemoteHost.controlDomain ? "operator-refused" : "worker-refused", stage: "host",
                                            intent: req.domain == RemoteHost.controlDomain ? "control.authenticate" : "remote.authenticate", reason: reason,
                                            details: ["address": .string(req.address), "key": .string(key), "mechanism": .string(req.mechanism),
                                                      "refused_so_far": .int(Int64(rm.refused))]))
        }
    }

    /// The worker an authenticated connection belongs to: its ZAP User-Id (CURVE). Plaintext
    /// connections (`insecure`) carry none; their HELLO's name is taken on trust.
    func remoteWorker(_ msg: ZMQMessage) -> String? {
        guard let u = msg.property("User-Id"), !u.isEmpty else { return nil }
        return u
    }

    func handleRemote(routing: [UInt8], _ msg: ZMQMessage, _ rm: RemoteHost) {
        let user = remoteWorker(msg)
        // Where the message came from, for the audit record if it is refused.
        rm.currentAddress = msg.property("Peer-Address") ?? ""
        if let u = user { rm.workers[u]?.lastSeenNs = monotonicNs(); if let a = msg.property("Peer-Address") { rm.workers[u]?.address = a } }
        // A frame from a known runner connection.
        if let stage = rm.stageOf[routing] {
            // The route is the stage's only while the connection is its worker's.
            if rm.layout.security.curve, user != stages[stage]?.plan.placement.workerName {
                remoteGarbage(routing, rm, "a frame for stage '\(stage)' from \(user.map { "worker '\($0)'" } ?? "an unauthenticated connection")", worker: user); return
            }
            rm.lastFrame[stage] = monotonicNs()
            msg.withBytes { raw in
                guard let f = try? FrameView(raw) else { remoteGarbage(routing, rm, "a malformed frame from stage '\(stage)'", worker: user); return }
                if f.header.type == .hello { return }
                handleRunnerFrame(stage, f)
            }
            return
        }
        // Otherwise only a HELLO: a worker registering, or one of its runners asking for its stage.
        let hello: Hello? = msg.withBytes { raw in
            guard let f = try? FrameView(raw), f.header.type == .hello else { return nil }
            return try? Hello.decode(f)
        }
        // A cut-off worker's connections that were open before stay refused.
        if let u = user, rm.workers[u]?.cutOff == true {
            remoteGarbage(routing, rm, "a frame from worker '\(u)', which is cut off", worker: u); return
        }
        guard let h = hello, h.protocolVersion == Hello.protocolVersion else {
            // A well-formed frame from an admitted worker's connection that lost its route (its
            // stage was given to a newer connection) is stale, not garbage.
            let wellFormed: Bool = msg.withBytes { raw in (try? FrameView(raw)) != nil }
            if wellFormed, let u = user, !u.hasPrefix("key:") { rm.staleFrames += 1; return }
            remoteGarbage(routing, rm, "a frame before HELLO, or a HELLO of another protocol version", worker: user); return
        }
        if h.worker.hasPrefix("worker:") {
            let claimed = String(h.worker.dropFirst(7))
            var name: String
            if !h.grant.isEmpty || user?.hasPrefix("key:") == true {
                guard let u = user, let key = rm.key(ofUser: u) else {
                    refuseRemote(routing, rm, registering: true, worker: claimed, "a grant needs an authenticated CURVE connection"); return
                }
                switch checkGrant(h.grant, key: key, claimed: claimed, rm) {
                case .failure(let why): refuseRemote(routing, rm, registering: true, worker: u, why.description); return
                case .success(let n): name = n
                }
            } else if let u = user {
                if !claimed.isEmpty && claimed != u {
                    refuseRemote(routing, rm, registering: true, worker: u, "the connection's key is worker '\(u)' but its HELLO says '\(claimed)'"); return
                }
                name = u
            } else if rm.layout.security.curve {
                refuseRemote(routing, rm, registering: true, worker: claimed, "no authenticated worker on this connection"); return
            } else {
                guard rm.workers[claimed] != nil else { refuseRemote(routing, rm, registering: true, worker: claimed, "no worker '\(claimed)' in remote.workers"); return }
                name = claimed
            }
            RemoteBans.shared.unban(name, in: options.runDirectory)
            let stages = plan.stages.filter { $0.placement.workerName == name && rm.mayRun($0.id, worker: name) }.map(\.id)
            rm.workers[name]?.connected = true
            rm.workers[name]?.registrations += 1
            rm.workers[name]?.lastSeenNs = monotonicNs()
            log.info("remote: worker '\(name)' (pid \(h.pid)\(rm.workers[name].map { $0.address.isEmpty ? "" : ", \($0.address)" } ?? "")) registered; its stages: \(stages.isEmpty ? "none" : stages.joined(separator: ", "))")
            auditWriter?.submit(AuditRecord(decision: "worker-joined", stage: "host", intent: "remote.register",
                                            reason: "worker '\(name)' registered for \(stages.isEmpty ? "no stages" : stages.joined(separator: ", "))",
                                            details: ["worker": .string(name), "pid": .int(Int64(h.pid)), "address": .string(rm.workers[name]?.address ?? "")]))
            let roster = ConfigValue.object([("worker", .string(name)), ("stages", .list(stages.map(ConfigValue.string))),
                                             ("pipeline", .string(plan.spec.name))])
            controlSeq += 1
            _ = try? rm.router.send(parts: [routing, FrameEncoder.text(.assign, seq: controlSeq, JSON.serialize(roster))], dontWait: true)
            return
        }
        // A runner asking for stage `h.worker`.
        let stage = h.worker
        guard let st = stages[stage] else { refuseRemote(routing, rm, worker: user ?? "?", "it asked for stage '\(stage)', which this pipeline does not have"); return }
        guard let owner = st.plan.placement.workerName else {
            refuseRemote(routing, rm, worker: user ?? "?", "it asked for stage '\(stage)', which runs in the host"); return
        }
        if let u = user, u != owner {
            refuseRemote(routing, rm, worker: u, "worker '\(u)' asked for stage '\(stage)', which is placed on worker '\(owner)'"); return
        }
        if let u = user, u.hasPrefix("key:") {
            refuseRemote(routing, rm, worker: u, "a runner asked for stage '\(stage)' before its worker's grant was accepted"); return
        }
        if !rm.mayRun(stage, worker: owner) {
            refuseRemote(routing, rm, worker: owner, "worker '\(owner)' asked for stage '\(stage)', which its grant does not name"); return
        }
        if rm.layout.security.curve && user == nil { refuseRemote(routing, rm, worker: "?", "no authenticated worker on this connection"); return }
        if let old = rm.routes[stage], old != routing {
            // The old runner, if it is still there, is told to stop.
            controlSeq += 1
            _ = try? rm.router.send(parts: [old, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .abort))], dontWait: true)
            rm.stageOf[old] = nil
        }
        if stages[stage]?.assigned == true {
            // The stage's runner came back (a restarted worker, a new runner after a long cut, a
            // worker admitted again after a revocation): a new incarnation, counted from zero on
            // top of the old counts.
            stages[stage]?.restarts += 1
            if let s = stages[stage]?.stats { stages[stage]?.base = s }
            stages[stage]?.stats = nil
            log.warning("remote: stage '\(stage)' is back on worker '\(owner)' (restart \(stages[stage]?.restarts ?? 0))")
        }
        rm.routes[stage] = routing
        rm.stageOf[routing] = stage
        rm.lastFrame[stage] = monotonicNs()
        stages[stage]?.startedNs = monotonicNs()
        assign(stage)
    }

    /// Checks a presented grant against the key of the connection it came on (not the key the
    /// grant claims): signed by a trusted owner, for this key, not expired, not below the highest
    /// epoch seen for the key (durably), not a revocation, for a worker of this pipeline. Returns
    /// the worker name it admits.
    func checkGrant(_ bytes: [UInt8], key: String, claimed: String, _ rm: RemoteHost) -> Result<String, GrantRefusal> {
        guard !rm.owners.isEmpty else { return .failure("a grant was presented but remote.owners trusts no owner") }
        guard !bytes.isEmpty else { return .failure("unknown worker key and no grant") }
        let g: Grant
        do { g = try Grant.parse(bytes) } catch { return .failure(GrantRefusal("\(error)")) }
        guard g.verify(owners: rm.owners) else { return .failure("grant not signed by a trusted owner (owner \(Hex.encode(g.owner.prefix(8))))") }
        guard g.worker == key else { return .failure("grant for another worker's key (\(g.worker.prefix(12))...) presented by \(key.prefix(12))...") }
        let now = Int64(wallNs() / 1_000_000_000)
        guard g.expires > now else { return .failure("grant expired at \(RFC3339.format(ns: g.expires.multipliedReportingOverflow(by: 1_000_000_000).overflow ? Int64.max : g.expires * 1_000_000_000))") }
        guard let store = rm.epochs else { return .failure("no grant epoch store") }
        do {
            if let high = try store.highest(key), g.epoch < high {
                return .failure("replayed grant: epoch \(g.epoch) is below the highest seen for this worker (\(high))")
            }
            try store.raise(key, to: g.epoch, nowS: now, revoked: g.isRevocation)
        } catch { return .failure(GrantRefusal("grant epochs: \(error)")) }
        if g.isRevocation { rm.granted[key] = nil; return .failure("grant epoch \(g.epoch) revokes this worker") }
        guard rm.workers[g.name] != nil else { return .failure("grant names worker '\(g.name)', which remote.workers does not list") }
        if let listed = rm.names[key], listed != g.name { return .failure("key is listed as worker '\(listed)' but the grant names '\(g.name)'") }
        // A worker listed with a key is that key alone; a grant cannot add another.
        if rm.names[key] == nil, rm.names.values.contains(g.name) { return .failure("worker '\(g.name)' is listed with a key in remote.workers; a grant cannot name it") }
        if !claimed.isEmpty && claimed != g.name { return .failure("the grant names worker '\(g.name)' but the HELLO says '\(claimed)'") }
        // One key per worker name: a newer grant for the name replaces the key before it.
        for (k, v) in rm.granted where v.name == g.name && k != key { rm.granted[k] = nil; revokeRoutes(ofWorker: g.name, rm, reason: "its name was granted to another key") }
        rm.granted[key] = (g.name, Set(g.stages), g.epoch, g.expires)
        return .success(g.name)
    }

    /// `pipectl grant apply FILE`: an owner's grant given to the running host, usually a
    /// revocation: the watermark rises, and a revoked worker's runners are aborted.
    func applyGrant(_ bytes: [UInt8]) -> Result<ConfigValue, RuntimeError> {
        guard let rm = remote else { return .failure(.plan("this pipeline has no remote workers")) }
        guard let store = rm.epochs, !rm.owners.isEmpty else { return .failure(.plan("remote.owners trusts no owner")) }
        let g: Grant
        do { g = try Grant.parse(bytes) } catch { return .failure(.plan("\(error)")) }
        guard g.verify(owners: rm.owners) else { return .failure(.plan("grant not signed by a trusted owner")) }
        let now = Int64(wallNs() / 1_000_000_000)
        do {
            if let high = try store.highest(g.worker), g.epoch < high { return .failure(.plan("epoch \(g.epoch) is below the highest seen for this worker (\(high))")) }
            try store.raise(g.worker, to: g.epoch, nowS: now, revoked: g.isRevocation)
        } catch { return .failure(.io("grant epochs: \(error)")) }
        var aborted: [String] = []
        if g.isRevocation || (rm.granted[g.worker].map { $0.epoch < g.epoch } ?? false) {
            let old = rm.granted[g.worker]
            rm.granted[g.worker] = g.isRevocation || g.expires <= now ? nil : (g.name, Set(g.stages), g.epoch, g.expires)
            if let name = old?.name { aborted = revokeRoutes(ofWorker: name, rm, reason: g.isRevocation ? "revoked" : "its grant changed") }
        }
        let what = g.isRevocation ? "revoked" : "granted \(g.stages.joined(separator: ","))"
        log.warning("remote: grant epoch \(g.epoch) for key \(g.worker.prefix(12))... applied: \(what)\(aborted.isEmpty ? "" : "; aborted \(aborted.joined(separator: ", "))")")
        auditWriter?.submit(AuditRecord(decision: g.isRevocation ? "grant-revoked" : "grant-applied", stage: "host", intent: "remote.grant",
                                        reason: "grant epoch \(g.epoch) for worker '\(g.name)': \(what)",
                                        details: ["worker_key": .string(g.worker), "epoch": .int(Int64(clamping: g.epoch)),
                                                  "aborted": .string(aborted.joined(separator: ","))]))
        return .success(.object([("epoch", .int(Int64(clamping: g.epoch))), ("revoked", .bool(g.isRevocation)),
                                 ("aborted", .list(aborted.map(ConfigValue.string)))]))
    }

    /// Aborts the runners of worker `name` whose stages it may no longer run, and bans the name
    /// on the host's lane sockets until it is admitted again (frames from its open connections
    /// are then refused, and without its credits the lanes to it stop within one window).
    @discardableResult
    func revokeRoutes(ofWorker name: String, _ rm: RemoteHost, reason: String) -> [String] {
        var aborted: [String] = []
        for (s, r) in rm.routes where stages[s]?.plan.placement.workerName == name && !rm.mayRun(s, worker: name) {
            controlSeq += 1
            _ = try? rm.router.send(parts: [r, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .abort))], dontWait: true)
            rm.stageOf[r] = nil; rm.routes[s] = nil
            aborted.append(s)
        }
        if !rm.names.values.contains(name) && !rm.granted.values.contains(where: { $0.name == name }) { RemoteBans.shared.ban(name, in: options.runDirectory) }
        if !aborted.isEmpty { log.warning("remote: worker '\(name)' \(reason): aborted \(aborted.joined(separator: ", "))") }
        return aborted
    }

    /// Grants that expired while their worker ran: treated as revoked (checked once a second).
    func sweepGrants() {
        guard let rm = remote, !rm.granted.isEmpty else { return }
        let now = Int64(wallNs() / 1_000_000_000)
        for (k, g) in rm.granted where g.expires <= now {
            rm.granted[k] = nil
            let aborted = revokeRoutes(ofWorker: g.name, rm, reason: "grant expired")
            auditWriter?.submit(AuditRecord(decision: "grant-expired", stage: "host", intent: "remote.grant",
                                            reason: "grant epoch \(g.epoch) for worker '\(g.name)' expired", details: ["worker_key": .string(k), "aborted": .string(aborted.joined(separator: ","))]))
        }
    }

    /// Refuses a HELLO: logged and audited (rate-limited), and answered with ABORT, or, for a
    /// registering worker, with a roster that carries the reason (the worker prints it and exits).
    func refuseRemote(_ routing: [UInt8], _ rm: RemoteHost, registering: Bool = false, worker: String, _ reason: String) {
        let address = rm.currentAddress
        rm.refused += 1
        let loud = rm.mayAudit(monotonicNs(), "authorize \(worker)")
        if loud { log.warning("remote: refused: \(reason)") }
        if loud {
            auditWriter?.submit(AuditRecord(decision: "worker-refused", stage: "host", intent: "remote.authorize", reason: reason,
                                            details: ["worker": .string(worker), "address": .string(address), "refused_so_far": .int(Int64(rm.refused))]))
        }
        controlSeq += 1
        let answer = registering ? FrameEncoder.text(.assign, seq: controlSeq, JSON.serialize(.object([("refused", .string(reason))])))
                                 : FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .abort))
        _ = try? rm.router.send(parts: [routing, answer], dontWait: true)
    }

    /// What the relay or a runner thread refused from remote workers: garbage counts against its
    /// worker; a frame still in flight from a worker revoked or cut off meanwhile is refused, not
    /// held against it.
    func takeRefusals(_ refusals: [FrameRefusal], dropped: Int, _ rm: RemoteHost, intent: String) {
        for r in refusals {
            if r.garbage { remoteGarbage([], rm, r.why, worker: r.worker); continue }
            rm.refused += 1
            if rm.mayAudit(monotonicNs(), "\(intent)-banned \(r.worker ?? "")") {
                log.warning("remote: refused \(r.why)")
                auditWriter?.submit(AuditRecord(decision: "frame-refused", stage: "host", intent: intent, reason: r.why,
                                                details: ["worker": .string(r.worker ?? "")]))
            }
        }
        rm.refused += dropped
    }

    /// A frame that is not the protocol, from the worker `user` (the connection's authenticated
    /// name) if known. A worker that sends 100 is cut off: its runners are aborted and its key
    /// refused until the host restarts.
    func remoteGarbage(_ routing: [UInt8], _ rm: RemoteHost, _ what: String, worker user: String?, count: Int = 1) {
        rm.refused += count
        let stage = rm.stageOf[routing]
        let worker = user ?? stage.flatMap { stages[$0]?.plan.placement.workerName }
        var bad = 0
        if let w = worker { rm.workers[w]?.badFrames += count; bad = rm.workers[w]?.badFrames ?? 0 }
        if rm.mayAudit(monotonicNs(), "garbage \(worker ?? "")") {
            log.warning("remote: refused \(what)\(worker.map { " (worker '\($0)')" } ?? "")")
            auditWriter?.submit(AuditRecord(decision: "frame-refused", stage: "host", intent: "remote.frame", reason: "refused \(what)",
                                            details: ["worker": .string(worker ?? ""), "bad_frames": .int(Int64(bad))]))
        }
        if let w = worker, bad >= 100, rm.workers[w]?.cutOff == false {
            rm.workers[w]?.cutOff = true
            RemoteBans.shared.ban(w, in: options.runDirectory)
            log.error("remote: worker '\(w)' cut off after \(bad) bad frames; its key is refused until the host restarts")
            auditWriter?.submit(AuditRecord(decision: "worker-cut-off", stage: "host", intent: "remote.frame",
                                            reason: "worker '\(w)' sent \(bad) bad frames", details: ["worker": .string(w)]))
            for (s, r) in rm.routes where stages[s]?.plan.placement.workerName == w {
                controlSeq += 1
                _ = try? rm.router.send(parts: [r, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .abort))], dontWait: true)
                rm.stageOf[r] = nil; rm.routes[s] = nil
            }
        }
    }

    /// Whether a remote stage's runner has been silent longer than `remote.down_after_ms`.
    func remoteDown(_ id: String, now: UInt64) -> Bool {
        guard let rm = remote, stages[id]?.plan.placement.isRemote == true else { return false }
        if stages[id]?.stats?.flags.contains(.finished) == true { return false }
        guard let t = rm.lastFrame[id] else { return true }
        return now - t > UInt64(rm.spec.downAfterMs) * 1_000_000
    }

    func workersJSON() -> ConfigValue {
        guard let rm = remote else { return .list([]) }
        let now = monotonicNs()
        return .list(rm.workers.values.sorted { $0.name < $1.name }.map { w in
            let placed = plan.stages.filter { $0.placement.workerName == w.name }.map(\.id)
            let up = placed.filter { rm.routes[$0] != nil && !remoteDown($0, now: now) }
            let state = w.cutOff ? "cut-off" : !w.connected ? "absent" : up.count == placed.count ? "up" : up.isEmpty ? "down" : "partly down"
            return .object([("name", .string(w.name)), ("key", .string(w.key)), ("state", .string(state)), ("address", .string(w.address)),
                            ("stages", .list(placed.map(ConfigValue.string))), ("stages_up", .list(up.map(ConfigValue.string))),
                            ("registrations", .int(Int64(w.registrations))),
                            ("last_seen_ms", w.lastSeenNs == 0 ? .null : .int(Int64((now - w.lastSeenNs) / 1_000_000))),
                            ("bad_frames", .int(Int64(w.badFrames)))])
        })
    }

    func remoteJSON() -> ConfigValue {
        guard let rm = remote else { return .null }
        return .object([("listen", .string(rm.spec.listen)), ("security", .string(rm.layout.security.curve ? "curve" : "plaintext")),
                        ("server_key", .string(rm.layout.security.serverPublicKey)), ("refused", .int(Int64(rm.refused))),
                        ("handshake_failures", .int(Int64(rm.handshakeFailures))), ("stale_frames", .int(Int64(rm.staleFrames))), ("workers", workersJSON()),
                        ("relays", relaysJSON(rm))])
    }

    /// What a relayed lane waits for, in words: "" when it forwards freely, else which end has
    /// no room for the frame the relay holds (absent, or slower than its producer).
    func relayWaiting(_ l: PipelinePlan.PlannedLane, _ s: LaneRelay.LaneStats) -> String {
        func end(_ id: String) -> String {
            let p = plan.stage(id)?.placement
            return p?.workerName.map { "\(id) (worker \($0)) is absent or slow" } ?? "\(id) (its process) is absent or slow"
        }
        var waits: [String] = []
        if s.dataHeld { waits.append("a data frame waits: \(end(l.to))") }
        if s.backHeld { waits.append("credits wait: \(end(l.from))") }
        return waits.joined(separator: "; ")
    }

    /// The lanes between remote stages that this host relays: where each end connects, frames
    /// forwarded each way, frames refused.
    func relaysJSON(_ rm: RemoteHost) -> ConfigValue {
        let st = rm.relay?.stats() ?? [:]
        let r = rm.layout
        let run = options.runDirectory
        var rows: [ConfigValue] = []
        for id in r.relayed.sorted() {
            guard let l = plan.lanes.first(where: { $0.id == id }) else { continue }
            let s = st[id] ?? LaneRelay.LaneStats()
            let sendsTo: String = r.relayIn[id].map(r.connect) ?? RemoteLayout.relayEndpoint(lane: id, "in", runDir: run)
            let takesFrom: String = r.laneData[id].map(r.connect) ?? plan.inputEndpoint(l.to, transport: "ipc", runTag: "", runDir: run)
            let returnsTo: String = r.relayRet[id].map(r.connect) ?? RemoteLayout.relayEndpoint(lane: id, "ret", runDir: run)
            let returnsFrom: String = r.laneRet[id].map(r.connect) ?? plan.returnEndpoint(l.from, transport: "ipc", runTag: "", runDir: run)
            let fields: [(String, ConfigValue)] = [
                ("lane", .int(Int64(id))), ("from", .string("\(l.from).\(l.output)")), ("to", .string("\(l.to).\(l.port)")),
                ("producer_sends_to", .string(sendsTo)), ("consumer_takes_from", .string(takesFrom)),
                ("consumer_returns_to", .string(returnsTo)), ("producer_returns_from", .string(returnsFrom)),
                ("data_frames", .int(Int64(clamping: s.data))), ("return_frames", .int(Int64(clamping: s.back))),
                ("refused", .int(Int64(clamping: s.refused))), ("waiting", .string(relayWaiting(l, s)))]
            rows.append(.object(fields))
        }
        return .list(rows)
    }

    /// Closes the remote side; returns false when something stays open (the lane relay's
    /// thread, or runner threads, and with them the ZAP handler), so the context must not be
    /// terminated (zmq_ctx_term would wait for them for ever).
    @discardableResult
    func closeRemote() -> Bool {
        guard let rm = remote else { return true }
        RemoteBans.shared.clear(run: options.runDirectory)
        _ = RemoteRefusals.shared.take(run: options.runDirectory)
        _ = LaneHandshakes.shared.take(run: options.runDirectory)
        let relayClosed = rm.relay?.stop() ?? true
        // The monitor stops before its reader closes (an event sent to a PAIR with no reader
        // would block libzmq's I/O thread).
        rm.router.stopMonitor()
        rm.router.close(); rm.monitor?.close(); rm.control?.close()
        // A CURVE listener without a ZAP handler lets every client in: the handler stays while
        // any runner thread (and its tcp listeners) or the relay is alive.
        if threadsDone.value.load(ordering: .sequentiallyConsistent) >= threads.count && relayClosed { rm.zap?.close(); return true }
        log.warning("runner threads or the lane relay still running at shutdown: the ZAP handler stays open with them")
        return false
    }
}

/// A frame refused from a remote worker, for the host to audit and count. `garbage`: not the
/// protocol, or past its credits (counts toward cutting the worker off); otherwise a frame from a
/// worker revoked or cut off meanwhile (still in flight: counted and audited only).
struct FrameRefusal: Sendable { let worker: String?; let why: String; let garbage: Bool }

/// Frames the host's own runner threads refused from remote workers on tcp lanes (garbage, a
/// frame on another worker's lane, DATA past its credits, an envelope over the limits): the
/// runner hands them here and the host takes them each loop pass, audits them and counts them
/// against the worker, as it does for what the lane relay refuses. Per run directory and worker:
/// exact counts and the first few refusals as samples, so a flood costs no memory and one worker's
/// flood cannot crowd another's refusals out of the count.
final class RemoteRefusals: Sendable {
    static let shared = RemoteRefusals()
    struct Tally: Sendable { var worker = ""; var garbage = 0, banned = 0; var samples: [FrameRefusal] = [] }
    let waiting = Mutex<[String: [String: Tally]]>([:])
    func report(_ r: FrameRefusal, run: String) {
        waiting.withLock { w in
            var t = w[run]?[r.worker ?? ""] ?? Tally(worker: r.worker ?? "")
            if r.garbage { t.garbage += 1 } else { t.banned += 1 }
            if t.samples.count < 8 { t.samples.append(r) }
            w[run, default: [:]][r.worker ?? ""] = t
        }
    }
    func take(run: String) -> [Tally] {
        waiting.withLock { w in
            defer { w[run] = nil }
            return w[run].map { Array($0.values) } ?? []
        }
    }
}

/// Failed handshakes on the tcp lane ports the host's own runners bind, which their socket
/// monitors report here; the host takes them each loop pass and audits them as it does those of
/// its registration port. Per run directory, endpoint and kind of failure: a count, so a flood
/// of bad handshakes costs no memory.
final class LaneHandshakes: Sendable {
    static let shared = LaneHandshakes()
    struct Tally: Sendable { var endpoint: String; var event: Int32; var value: UInt32; var reason: String; var count = 0 }
    struct Kind: Hashable, Sendable { var endpoint: String; var event: Int32; var value: UInt32 }
    let waiting = Mutex<[String: [Kind: Tally]]>([:])
    func report(run: String, endpoint: String, _ ev: ZMQMonitorEvent) {
        waiting.withLock { w in
            let k = Kind(endpoint: endpoint, event: ev.event, value: ev.value)
            var t = w[run]?[k] ?? Tally(endpoint: endpoint, event: ev.event, value: ev.value, reason: ev.reason)
            t.count += 1
            w[run, default: [:]][k] = t
        }
    }
    func take(run: String) -> [Tally] {
        waiting.withLock { w in
            defer { w[run] = nil }
            return (w[run] ?? [:]).values.sorted { ($0.endpoint, $0.event, $0.value) < ($1.endpoint, $1.event, $1.value) }
        }
    }
}

/// Worker names whose frames the host's own runners refuse on every tcp lane, even on
/// connections opened before the worker was revoked, cut off or its grant expired (ZAP only
/// runs when a connection is made). Per run directory, so hosts in one process do not mix.
final class RemoteBans: Sendable {
    static let shared = RemoteBans()
    let banned = Mutex<Set<String>>([])
    func ban(_ name: String, in run: String) { _ = banned.withLock { $0.insert(run + "\u{0}" + name) } }
    func unban(_ name: String, in run: String) { _ = banned.withLock { $0.remove(run + "\u{0}" + name) } }
    func isBanned(_ name: String, in run: String) -> Bool { banned.withLock { $0.contains(run + "\u{0}" + name) } }
    func clear(run: String) { banned.withLock { $0 = $0.filter { !$0.hasPrefix(run + "\u{0}") } } }
}

/// Socket monitors for failed handshakes on the tcp ports one thread binds (a runner's lane
/// ports, the relay's): that thread owns the sockets, adds the monitors' readers to its poller,
/// drains those that are readable, and stops them all before it closes anything. What they see
/// goes to ``LaneHandshakes`` for the host to audit; refused authentications are left to ZAP.
struct HandshakeWatch {
    private var entries: [(socket: ZMQSocket, monitor: ZMQSocket, endpoint: String, poll: Int)] = []
    let run: String

    init(run: String) { self.run = run }

    /// Watches each of `bound` (best effort: a monitor that cannot be set up is logged, not
    /// fatal). `tag` makes the monitors' inproc names unique in the process.
    mutating func watch(_ bound: [(ZMQSocket, String)], context: ZMQContext, tag: String, poller: inout ZMQPoller, log: Logger) {
        // One monitor per socket (a second zmq_socket_monitor on a socket replaces the first):
        // a socket bound on several ports reports them together.
        var sockets: [(ZMQSocket, String)] = []
        for (s, e) in bound {
            if let i = sockets.firstIndex(where: { $0.0 === s }) { sockets[i].1 += ", " + e } else { sockets.append((s, e)) }
        }
        for (k, (s, e)) in sockets.enumerated() {
            var reader: ZMQSocket?
            do {
                // Unbounded on our side: libzmq's I/O thread must never wait on this pipe; we
                // drain it whenever it is readable.
                let m = try context.socket(.pair)
                reader = m
                try m.setReceiveHWM(0)
                let ep = "inproc://lane-handshakes/\(tag)/\(k)"
                try s.monitorHandshakes(ep, failuresOnly: true)
                try m.connect(ep)
                entries.append((s, m, e, poller.add(m)))
            } catch {
                // No monitor may be left without its reader.
                s.stopMonitor()
                reader?.close()
                log.warning("lane port \(e): cannot monitor its handshakes (\(error)); failed ones will not be audited")
            }
        }
    }

    /// Hands what the readable monitors report to the host.
    func take(_ poller: ZMQPoller) {
        for m in entries where poller.isReadable(m.poll) {
            while let ev = ZMQMonitorEvent.receive(from: m.monitor) {
                guard ev.isHandshakeFailure, !ev.isAuthFailure else { continue }
                LaneHandshakes.shared.report(run: run, endpoint: m.endpoint, ev)
            }
        }
    }

    /// Each monitor stops before its reader closes (an event sent to a PAIR with no reader would
    /// block libzmq's I/O thread). Call before closing the watched sockets.
    mutating func stop() {
        for m in entries { m.socket.stopMonitor(); m.monitor.close() }
        entries.removeAll()
    }
}
