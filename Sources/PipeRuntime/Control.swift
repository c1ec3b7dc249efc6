import Glibc
import PipeKit
import PipeZMQ

/// The control protocol (docs/operations.md, "The control protocol"): versioned JSON request/reply over a ZeroMQ
/// ROUTER at `ipc://<run_dir>/control.sock`, plus subscriptions that push events to the
/// subscriber until it unsubscribes or goes quiet.
///
/// Request: `{"v":1,"id":N,"cmd":"lanes","args":{...}}`
/// Reply:   `{"v":1,"id":N,"ok":true,"result":...}` or `{"v":1,"id":N,"ok":false,"error":"..."}`
/// Event:   `{"v":1,"event":"stats","result":{"status":...,"lanes":[...]}}`
public enum ControlProtocol {
    public static let version: Int64 = 1

    /// One control command: its name, summary and handler. The registry is the single source for
    /// `help`, dispatch and the docs.
    public struct Command: Sendable {
        public let name: String
        public let summary: String
        /// Whether a remote caller (tcp, an operator key) may run it; commands that change the
        /// run (stop, grant) are local only: a remote caller is never treated as local.
        public var remote = true
        let handle: @Sendable (PipelineHost, ConfigValue, [UInt8]) -> Result<ConfigValue, RuntimeError>
        init(name: String, remote: Bool = true, summary: String, handle: @escaping @Sendable (PipelineHost, ConfigValue, [UInt8]) -> Result<ConfigValue, RuntimeError>) {
            self.name = name; self.summary = summary; self.remote = remote; self.handle = handle
        }
    }

    public static let commands: [Command] = [
        Command(name: "ping", summary: "Liveness: pipeline name, host pid, uptime.") { h, _, _ in .success(h.pingJSON()) },
        Command(name: "help", summary: "Lists the control commands.") { _, _, _ in
            .success(.list(commands.map { .object([("name", .string($0.name)), ("summary", .string($0.summary)), ("remote", .bool($0.remote))]) }))
        },
        Command(name: "status", summary: "The host's and every stage's status report.") { h, _, _ in .success(h.statusJSON()) },
        Command(name: "lanes", summary: "Every lane: from, to, transport, bound, sent, received, depth, credits.") { h, _, _ in .success(h.lanesJSON()) },
        Command(name: "workers", summary: "Remote workers: name, key, state, address, stages, last seen.") { h, _, _ in .success(h.workersJSON()) },
        Command(name: "grant", remote: false, summary: "Applies an owner's grant ({\"grant\": FILE TEXT}): raises the worker's epoch; a revocation aborts its runners.") { h, args, _ in
            guard let text = args["grant"]?.stringValue else { return .failure(.plan("grant: args need {\"grant\": the grant file's text}")) }
            return h.applyGrant(Array(text.utf8))
        },
        Command(name: "stop", remote: false, summary: "Graceful stop: sources stop, lanes drain, sinks flush.") { h, _, _ in
            if !h.stopping { h.beginStop(reason: "pipectl stop") }
            return .success(.object([("stopping", .bool(true))]))
        },
        Command(name: "subscribe", summary: "Pushes `stats` events (status and lanes) every interval_ms (default 500) until unsubscribe.") { h, args, who in
            let ms = max(50, min(60_000, args["interval_ms"]?.intValue ?? 500))
            let now = monotonicNs()
            h.subscribers[who] = (UInt64(ms) * 1_000_000, now, now)
            return .success(.object([("topic", .string("stats")), ("interval_ms", .int(ms))]))
        },
        Command(name: "unsubscribe", summary: "Stops this client's events.") { h, _, who in
            h.subscribers[who] = nil
            return .success(.object([("unsubscribed", .bool(true))]))
        },
    ]

    public static func request(id: Int64, cmd: String, args: ConfigValue = .map([])) -> String {
        JSON.serialize(.object([("v", .int(version)), ("id", .int(id)), ("cmd", .string(cmd)), ("args", args)]))
    }
}

extension PipelineHost {
    /// A caller is its routing id behind one byte saying where it came from: 0 the local ipc
    /// socket, 1 the remote (tcp, CURVE) control endpoint.
    func reply(_ who: [UInt8], _ v: ConfigValue) {
        guard let via = who.first else { return }
        let socket = via == 1 ? remote?.control : controlRouter
        _ = try? socket?.send(parts: [Array(who.dropFirst()), Array(JSON.serialize(v).utf8)], dontWait: true)
    }

    func handleControl(_ parts: [[UInt8]], operator op: String? = nil) {
        guard parts.count >= 2, let first = parts.first, let body = parts.last else { return }
        let who = [op == nil ? 0 : 1] + first
        if body.count > 65536 { reply(who, .object([("v", .int(1)), ("ok", .bool(false)), ("error", .string("request too large"))])); return }
        let req: ConfigValue
        do { req = try JSON.parse(bytes: body) } catch {
            reply(who, .object([("v", .int(1)), ("ok", .bool(false)), ("error", .string("bad request: \(error)"))])); return
        }
        let id = req["id"] ?? .null
        guard req["v"]?.intValue == ControlProtocol.version else {
            reply(who, .object([("v", .int(1)), ("id", id), ("ok", .bool(false)), ("error", .string("unsupported protocol version; this host speaks v1"))])); return
        }
        if subscribers[who] != nil { subscribers[who]?.lastSeen = monotonicNs() }
        guard let name = req["cmd"]?.stringValue, let cmd = ControlProtocol.commands.first(where: { $0.name == name }) else {
            let names = ControlProtocol.commands.map(\.name).joined(separator: ", ")
            reply(who, .object([("v", .int(1)), ("id", id), ("ok", .bool(false)), ("error", .string("unknown command '\(req["cmd"]?.stringValue ?? "")'; commands: \(names)"))]))
            return
        }
        if let op, !cmd.remote {
            log.warning("control: remote operator '\(op)' asked for '\(cmd.name)', which is local only")
            auditWriter?.submit(AuditRecord(decision: "control-refused", actor: op, stage: "host", intent: "control.\(cmd.name)",
                                            reason: "'\(cmd.name)' is local only; remote operator '\(op)' refused", details: ["operator": .string(op)]))
            reply(who, .object([("v", .int(1)), ("id", id), ("ok", .bool(false)), ("error", .string("'\(cmd.name)' is local only (run pipectl on the host); a remote caller may: \(ControlProtocol.commands.filter(\.remote).map(\.name).joined(separator: ", "))"))]))
            return
        }
        switch cmd.handle(self, req["args"] ?? .map([]), who) {
        case .success(let r): reply(who, .object([("v", .int(1)), ("id", id), ("ok", .bool(true)), ("result", r)]))
        case .failure(let e): reply(who, .object([("v", .int(1)), ("id", id), ("ok", .bool(false)), ("error", .string("\(e)"))]))
        }
    }

    func publishSubscriptions(_ now: UInt64) {
        guard !subscribers.isEmpty else { return }
        for (who, s) in subscribers {
            // A subscriber that has not spoken for 30 s is gone.
            if now - s.lastSeen > 30_000_000_000 { subscribers[who] = nil; continue }
            guard now >= s.next else { continue }
            subscribers[who]?.next = now + s.interval
            reply(who, .object([("v", .int(1)), ("event", .string("stats")),
                                ("result", .object([("status", statusJSON()), ("lanes", lanesJSON())]))]))
        }
    }

    func pingJSON() -> ConfigValue {
        .object([("pipeline", .string(plan.spec.name)), ("pid", .int(Int64(getpid()))),
                 ("uptime_s", .double(Double(monotonicNs() - startNs) / 1e9)), ("protocol", .int(ControlProtocol.version))])
    }

    func statusJSON() -> ConfigValue {
        let views = stageViews()
        let waitedOn: [ConfigValue] = bottlenecks(views).map { b in
            .object([("stage", .string(b.stage)), ("state", .string(b.state)), ("busy_pct", .double((b.busy * 1000).rounded() / 10)),
                     ("full_lanes", .list(b.lanes.map { .int(Int64($0)) }))])
        }
        return .object([
            ("host", .object([("pipeline", .string(plan.spec.name)), ("file", .string(plan.spec.file)), ("pid", .int(Int64(getpid()))),
                              ("run_dir", .string(options.runDirectory)), ("state", .string(stopping ? "stopping (\(stopReason))" : "running")),
                              ("uptime_s", .double(Double(monotonicNs() - startNs) / 1e9)), ("audit_records", .int(Int64(auditCount))), ("audit", auditJSON()),
                              ("remote", remoteJSON())])),
            ("stages", .list(views.map(\.json))),
            ("bottlenecks", .list(waitedOn)),
        ])
    }

    func lanesJSON() -> ConfigValue { .list(lanes().map(\.json)) }
}

extension AttrValue {
    var json: ConfigValue {
        switch self { case .string(let s): return .string(s); case .int(let i): return .int(i); case .double(let d): return .double(d); case .bool(let b): return .bool(b) }
    }
}

extension StageView {
    public var json: ConfigValue {
        .object([("id", .string(id)), ("kind", .string(kind)), ("placement", .string(placement)), ("pid", pid.map { .int(Int64($0)) } ?? .null),
                 ("state", .string(state)), ("received", .int(Int64(clamping: received))), ("emitted", .int(Int64(clamping: emitted))),
                 ("dead_lettered", .int(Int64(clamping: deadLettered))), ("errors", .int(Int64(clamping: errors))), ("restarts", .int(Int64(restarts))),
                 ("rate_in", .double((rateIn * 10).rounded() / 10)), ("rate_out", .double((rateOut * 10).rounded() / 10)),
                 ("busy_pct", .double((busyFraction * 1000).rounded() / 10)), ("report_ns", .int(Int64(clamping: reportNs))),
                 ("status", .map(status.map { ConfigEntry(key: $0.0, value: $0.1.json) }))])
    }
}

extension LaneView {
    public var json: ConfigValue {
        func us(_ q: Double) -> ConfigValue { latency.quantileMicros(q).map { .double(($0 * 10).rounded() / 10) } ?? .null }
        return .object([
            ("id", .int(Int64(id))), ("from", .string(from)), ("to", .string(to)), ("transport", .string(transport)),
            ("bound", .int(Int64(bound))), ("bytes", bytesBound.map { .int(Int64($0)) } ?? .null), ("when_full", .string(whenFull)),
            ("loop_back", .bool(loopBack)), ("state", .string(down ? "down" : state.rawValue)),
            ("low", .int(Int64(low))), ("high", .int(Int64(high))), ("release", .int(Int64(release))),
            ("sent", .int(Int64(clamping: sent))), ("received", .int(Int64(clamping: received))), ("depth", .int(depth)),
            ("queued", .int(Int64(clamping: queued))), ("credits", .int(Int64(clamping: credits))), ("eos", .bool(endOfStream)),
            ("rate_in", .double((rateIn * 10).rounded() / 10)), ("rate_out", .double((rateOut * 10).rounded() / 10)),
            ("dropped", .int(Int64(clamping: dropped))), ("spilled", .int(Int64(clamping: spilled))),
            ("spill_depth", .int(Int64(clamping: spillDepth))),
            ("blocked_ms", .double(Double(blockedNs) / 1e6)), ("latency_p50_us", us(0.5)), ("latency_p99_us", us(0.99)),
            ("blocked_pct", .double((blockedFraction * 1000).rounded() / 10)), ("tap", .string(tap)), ("endpoint", .string(endpoint)),
            ("relay", relay.map(ConfigValue.string) ?? .null),
            ("sent_report_ns", .int(Int64(clamping: sentReportNs))), ("received_report_ns", .int(Int64(clamping: receivedReportNs))),
        ])
    }
}

/// A `pipectl` connection to a host's control endpoint.
public final class ControlClient {
    let zmq: ZMQContext
    let socket: ZMQSocket
    var nextID: Int64 = 1
    public let endpoint: String

    /// `keys` and `serverKey`: a CURVE client of a host's remote control endpoint (tcp).
    public init(endpoint: String, keys: CurveKeyPair? = nil, serverKey: String? = nil) throws(RuntimeError) {
        self.endpoint = endpoint
        if endpoint.hasPrefix("ipc://") {
            let path = String(endpoint.dropFirst(6))
            var st = stat()
            guard stat(path, &st) == 0 else { throw .io("no pipehost is running at \(endpoint) (socket file missing)") }
        }
        do {
            zmq = try ZMQContext()
            socket = try zmq.socket(.dealer)
            if let k = keys, let sk = serverKey { try socket.makeCurveClient(publicKey: k.publicKey, secretKey: k.secretKey, serverKey: sk) }
            try socket.connect(endpoint)
        } catch { throw .io("cannot connect to \(endpoint): \(error)") }
    }

    deinit { socket.close(); zmq.terminate() }

    /// Sends one request and waits for its reply (or times out: the host is not answering).
    public func call(_ cmd: String, args: ConfigValue = .map([]), timeoutMs: Int = 3000) throws(RuntimeError) -> ConfigValue {
        let id = nextID; nextID += 1
        do { try socket.send(Array(ControlProtocol.request(id: id, cmd: cmd, args: args).utf8)) } catch { throw .io("send to \(endpoint): \(error)") }
        let deadline = monotonicNs() + UInt64(timeoutMs) * 1_000_000
        var poller = ZMQPoller(); poller.add(socket)
        while monotonicNs() < deadline {
            let left = Int((deadline - monotonicNs()) / 1_000_000)
            guard (try? poller.poll(timeoutMs: max(1, left))) ?? 0 > 0, let bytes = try? socket.receive(dontWait: true) else { continue }
            guard let v = try? JSON.parse(bytes: bytes) else { throw .protocolError("unreadable reply from host") }
            if v["event"] != nil { continue }
            guard v["id"]?.intValue == id else { continue }
            if v["ok"]?.boolValue == true { return v["result"] ?? .null }
            throw .protocolError(v["error"]?.stringValue ?? "host refused the request")
        }
        if endpoint.hasPrefix("tcp://") {
            throw .io("no pipehost answered at \(endpoint) within \(timeoutMs) ms: is it running with remote.control there, is this --key listed in its remote.operators, and is --server-key its curve.pub? (CURVE drops a refused or mis-keyed handshake silently)")
        }
        throw .io("no pipehost answered at \(endpoint) within \(timeoutMs) ms (is it running?)")
    }

    /// Waits for the next pushed event.
    public func nextEvent(timeoutMs: Int) -> ConfigValue? {
        var poller = ZMQPoller(); poller.add(socket)
        guard (try? poller.poll(timeoutMs: timeoutMs)) ?? 0 > 0, let bytes = try? socket.receive(dontWait: true),
              let v = try? JSON.parse(bytes: bytes), v["event"] != nil else { return nil }
        return v
    }
}
