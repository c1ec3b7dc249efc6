import PipeConfig
import PipeKit

/// What the host tells a runner in its ASSIGN frame (UTF-8 JSON, docs/wire-format.md): its
/// stage, configuration, and every lane end with the endpoints to bind and connect.
public struct Assignment: Sendable, Equatable {
    public struct Input: Sendable, Equatable {
        public var lane: UInt32
        public var port: String
        public var portIndex: Int
        public var laneIndex: Int
        public var from: String
        public var loopBack: Bool
        public var maxHops: Int?
        public var bound: Int
        /// The lane's byte bound, when set: credits then also go back every half of it.
        public var bytes: Int?
        /// The producer's return endpoint (credits flow back there).
        public var returnEndpoint: String
        /// Bind the return PUSH at `returnEndpoint` instead of connecting (a remote producer connects to it).
        public var bindReturnEndpoint = false
        /// On tcp: the worker whose authenticated connection alone may send on this lane.
        public var peer: String?
        /// The lane crosses tcp beyond this runner's own socket (a `process` stage's lane that the
        /// host relays to a remote worker): the tcp loss rules apply although the endpoint is ipc.
        public var lossy = false
    }
    public struct OutputLane: Sendable, Equatable {
        public var lane: UInt32
        public var to: String
        /// The consumer's input endpoint.
        public var endpoint: String
        public var bound: Int
        /// Most bytes in flight (producer-side), when set.
        public var bytes: Int?
        public var whenFull: WhenFull
        public var loopBack: Bool
        /// Lanes with the same group share envelopes round-robin (replicas of one consumer).
        public var group: Int
        /// Bind the lane's PUSH at `endpoint` instead of connecting (a remote consumer connects to it).
        public var bind = false
        /// On tcp: the worker whose authenticated connection alone may return credits on this lane.
        public var peer: String?
        /// See ``Input/lossy``.
        public var lossy = false
    }
    public struct Output: Sendable, Equatable {
        public var name: String
        public var lanes: [OutputLane]
    }

    public var stage: String
    public var kind: String
    public var config: ConfigValue?
    public var audit: AuditLevel
    public var runDirectory: String
    public var maxEnvelopeBytes: Int
    public var maxBatchEnvelopes: Int
    public var bindInput: [String]
    public var bindReturn: [String]
    public var inputs: [Input]
    public var outputs: [Output]
    public var usesStore: Bool
    /// A source stops after emitting this many envelopes (`pipehost run --max-envelopes`).
    public var maxEmit: UInt64?
    /// Where the runner publishes tapped envelopes (XPUB; `pipectl tap`), or empty for none.
    public var tapEndpoint: String = ""
    /// How often the runner reports STATS (default 100 ms).
    public var statsIntervalMs: Int = 100
    /// Whether this runner hands batches over by reference on its in-process output lanes
    /// (HANDOFF, docs/wire-format.md); it takes HANDOFF on its in-process input lanes either way.
    public var byReference = true
    /// How often this stage's worker was restarted before this incarnation (0: the first).
    public var restarts: Int = 0
    /// The pipeline's name (a durable source's journal is bound to it).
    public var pipeline: String = ""
    /// Acknowledgements, redelivery and deduplication (docs/delivery.md).
    public var delivery = DeliverySpec()
    /// Endpoints the input PULL and the return PULL connect to (a remote stage binds nothing).
    public var connectInput: [String] = []
    public var connectReturn: [String] = []
    /// How tcp lanes are secured (nil: this stage has none).
    public var tcp: TCPSecurity?

    public var json: ConfigValue {
        .object([
            ("stage", .string(stage)), ("kind", .string(kind)), ("config", config ?? .null), ("audit", .string(audit.rawValue)),
            ("run_dir", .string(runDirectory)), ("max_envelope_bytes", .int(Int64(maxEnvelopeBytes))),
            ("max_batch_envelopes", .int(Int64(maxBatchEnvelopes))), ("uses_store", .bool(usesStore)),
            ("max_emit", maxEmit.map { .int(Int64(clamping: $0)) } ?? .null), ("tap", .string(tapEndpoint)), ("stats_interval_ms", .int(Int64(statsIntervalMs))),
            ("by_reference", .bool(byReference)),
            ("pipeline", .string(pipeline)), ("restarts", .int(Int64(restarts))),
            ("delivery", .object([("mode", .string(delivery.mode.rawValue)), ("ack_timeout_ms", .int(Int64(delivery.ackTimeoutMs))),
                                  ("max_pending", .int(Int64(delivery.maxPending))), ("max_attempts", .int(Int64(delivery.maxAttempts))),
                                  ("dedup_window", .int(Int64(delivery.dedupWindow)))])),
            ("bind_in", .list(bindInput.map(ConfigValue.string))), ("bind_ret", .list(bindReturn.map(ConfigValue.string))),
            ("connect_in", .list(connectInput.map(ConfigValue.string))), ("connect_ret", .list(connectReturn.map(ConfigValue.string))),
            ("tcp", tcp.map { t in .object([("mode", .string(t.curve ? "curve" : "plain")), ("server_key", .string(t.serverPublicKey)),
                                          ("server_secret", t.serverSecretKey.map(ConfigValue.string) ?? .null)]) } ?? .null),
            ("inputs", .list(inputs.map { i in
                .object([("lane", .int(Int64(i.lane))), ("port", .string(i.port)), ("port_index", .int(Int64(i.portIndex))),
                         ("lane_index", .int(Int64(i.laneIndex))), ("from", .string(i.from)), ("loop_back", .bool(i.loopBack)),
                         ("max_hops", i.maxHops.map { .int(Int64($0)) } ?? .null), ("bound", .int(Int64(i.bound))),
                         ("bytes", i.bytes.map { .int(Int64($0)) } ?? .null),
                         ("ret", .string(i.returnEndpoint)), ("bind_ret", .bool(i.bindReturnEndpoint)),
                         ("peer", i.peer.map(ConfigValue.string) ?? .null)] + (i.lossy ? [("lossy", .bool(true))] : []))
            })),
            ("outputs", .list(outputs.map { o in
                .object([("name", .string(o.name)), ("lanes", .list(o.lanes.map { l in
                    .object([("lane", .int(Int64(l.lane))), ("to", .string(l.to)), ("connect", .string(l.endpoint)),
                             ("bound", .int(Int64(l.bound))), ("bytes", l.bytes.map { .int(Int64($0)) } ?? .null),
                             ("when_full", .string(l.whenFull.rawValue)), ("loop_back", .bool(l.loopBack)),
                             ("group", .int(Int64(l.group))), ("bind", .bool(l.bind)), ("peer", l.peer.map(ConfigValue.string) ?? .null)]
                            + (l.lossy ? [("lossy", .bool(true))] : []))
                }))])
            })),
        ])
    }

    public init(stage: String, kind: String, config: ConfigValue?, audit: AuditLevel, runDirectory: String, maxEnvelopeBytes: Int,
                maxBatchEnvelopes: Int, bindInput: [String], bindReturn: [String], inputs: [Input], outputs: [Output], usesStore: Bool) {
        self.stage = stage; self.kind = kind; self.config = config; self.audit = audit; self.runDirectory = runDirectory
        self.maxEnvelopeBytes = maxEnvelopeBytes; self.maxBatchEnvelopes = maxBatchEnvelopes; self.bindInput = bindInput
        self.bindReturn = bindReturn; self.inputs = inputs; self.outputs = outputs; self.usesStore = usesStore
        self.maxEmit = nil
    }

    public init(json v: ConfigValue) throws(RuntimeError) {
        func s(_ x: ConfigValue?, _ f: String) throws(RuntimeError) -> String {
            guard let r = x?.stringValue else { throw .protocolError("ASSIGN: missing string '\(f)'") }; return r
        }
        func i(_ x: ConfigValue?, _ f: String) throws(RuntimeError) -> Int {
            guard let r = x?.intValue else { throw .protocolError("ASSIGN: missing integer '\(f)'") }; return Int(r)
        }
        stage = try s(v["stage"], "stage"); kind = try s(v["kind"], "kind")
        config = v["config"] == .null ? nil : v["config"]
        guard let a = AuditLevel(rawValue: try s(v["audit"], "audit")) else { throw .protocolError("ASSIGN: bad audit level") }
        audit = a
        runDirectory = try s(v["run_dir"], "run_dir")
        maxEnvelopeBytes = try i(v["max_envelope_bytes"], "max_envelope_bytes")
        maxBatchEnvelopes = try i(v["max_batch_envelopes"], "max_batch_envelopes")
        usesStore = v["uses_store"]?.boolValue ?? false
        maxEmit = v["max_emit"]?.intValue.map { UInt64(max(0, $0)) }
        tapEndpoint = v["tap"]?.stringValue ?? ""
        statsIntervalMs = Int(max(10, min(60_000, v["stats_interval_ms"]?.intValue ?? 100)))
        pipeline = v["pipeline"]?.stringValue ?? ""
        byReference = v["by_reference"]?.boolValue ?? true
        restarts = Int(max(0, v["restarts"]?.intValue ?? 0))
        if let d = v["delivery"] {
            guard let m = DeliverySpec.Mode(rawValue: try s(d["mode"], "delivery.mode")) else { throw .protocolError("ASSIGN: bad delivery mode") }
            delivery.mode = m
            delivery.ackTimeoutMs = Int(max(10, d["ack_timeout_ms"]?.intValue ?? 10_000))
            delivery.maxPending = Int(max(1, d["max_pending"]?.intValue ?? 65_536))
            delivery.maxAttempts = Int(max(1, d["max_attempts"]?.intValue ?? 10))
            delivery.dedupWindow = Int(max(1, d["dedup_window"]?.intValue ?? 200_000))
        }
        bindInput = (v["bind_in"]?.listValue ?? []).compactMap(\.stringValue)
        bindReturn = (v["bind_ret"]?.listValue ?? []).compactMap(\.stringValue)
        connectInput = (v["connect_in"]?.listValue ?? []).compactMap(\.stringValue)
        connectReturn = (v["connect_ret"]?.listValue ?? []).compactMap(\.stringValue)
        if let t = v["tcp"], t != .null {
            tcp = TCPSecurity(curve: t["mode"]?.stringValue == "curve", serverPublicKey: t["server_key"]?.stringValue ?? "",
                              serverSecretKey: t["server_secret"]?.stringValue)
        }
        var ins: [Input] = []
        for x in v["inputs"]?.listValue ?? [] {
            guard let inLane = UInt32(exactly: try i(x["lane"], "lane")) else { throw .protocolError("ASSIGN: bad lane id") }
            ins.append(Input(lane: inLane, port: try s(x["port"], "port"), portIndex: try i(x["port_index"], "port_index"),
                             laneIndex: try i(x["lane_index"], "lane_index"), from: try s(x["from"], "from"),
                             loopBack: x["loop_back"]?.boolValue ?? false, maxHops: x["max_hops"]?.intValue.map(Int.init),
                             bound: try i(x["bound"], "bound"), bytes: x["bytes"]?.intValue.map(Int.init), returnEndpoint: try s(x["ret"], "ret"),
                             bindReturnEndpoint: x["bind_ret"]?.boolValue ?? false, peer: x["peer"]?.stringValue,
                             lossy: x["lossy"]?.boolValue ?? false))
        }
        inputs = ins
        var outs: [Output] = []
        for x in v["outputs"]?.listValue ?? [] {
            var lanes: [OutputLane] = []
            for l in x["lanes"]?.listValue ?? [] {
                guard let wf = WhenFull(rawValue: try s(l["when_full"], "when_full")) else { throw .protocolError("ASSIGN: bad when_full") }
                guard let outLane = UInt32(exactly: try i(l["lane"], "lane")) else { throw .protocolError("ASSIGN: bad lane id") }
                lanes.append(OutputLane(lane: outLane, to: try s(l["to"], "to"), endpoint: try s(l["connect"], "connect"),
                                        bound: try i(l["bound"], "bound"), bytes: l["bytes"]?.intValue.map(Int.init), whenFull: wf, loopBack: l["loop_back"]?.boolValue ?? false,
                                        group: Int(l["group"]?.intValue ?? 0), bind: l["bind"]?.boolValue ?? false, peer: l["peer"]?.stringValue,
                                        lossy: l["lossy"]?.boolValue ?? false))
            }
            outs.append(Output(name: try s(x["name"], "name"), lanes: lanes))
        }
        outputs = outs
    }
}

/// How a stage's tcp lanes are secured: CURVE (the host is the server of every tcp connection;
/// only the host's own runners get its secret key) or plaintext (`remote.insecure`).
public struct TCPSecurity: Sendable, Equatable {
    public var curve: Bool
    public var serverPublicKey: String
    /// Set for runners in the host's own process tree (they bind tcp); never sent to a remote worker.
    public var serverSecretKey: String?
    public init(curve: Bool, serverPublicKey: String, serverSecretKey: String?) {
        self.curve = curve; self.serverPublicKey = serverPublicKey; self.serverSecretKey = serverSecretKey
    }
    /// The ZAP domain of a host-side lane listener: one per port, so the ZAP handler admits on
    /// each only the workers at the far end of its lanes (another allowed worker connecting to a
    /// lane port would otherwise get a round-robin share of that lane's envelopes).
    public static func zapDomain(port: Int) -> String { "pipehost-port:\(port)" }
    /// The port of a `tcp://HOST:PORT` endpoint.
    static func port(of endpoint: String) -> Int? { endpoint.split(separator: ":").last.flatMap { Int($0) } }
}

/// The tcp ports of one run: every socket facing a remote worker is bound by the host side
/// (remote workers only connect), on ports the host reserves at start.
public struct RemoteLayout: Sendable {
    /// Where host-side sockets bind (the listen host) and where workers connect (the advertised host).
    public var bindHost: String
    public var connectHost: String
    public var security: TCPSecurity
    /// Host-side stage -> port of its tcp input (remote producers connect) and return (remote consumers' credits).
    public var stageIn: [String: Int] = [:]
    public var stageRet: [String: Int] = [:]
    /// Lane -> port bound by the host-side producer's PUSH (remote consumer) or consumer's return PUSH (remote producer).
    public var laneData: [UInt32: Int] = [:]
    public var laneRet: [UInt32: Int] = [:]
    /// A lane between two remote stages, relayed by the host (``LaneRelay``): the port its
    /// producer's worker sends to (`relayIn`) and the one its consumer's worker returns credits to
    /// (`relayRet`); the consumer takes data from `laneData`, the producer credits from `laneRet`.
    public var relayIn: [UInt32: Int] = [:]
    public var relayRet: [UInt32: Int] = [:]
    /// Lanes the host relays: neither end runs in the host process (two remote stages, or a
    /// remote stage and a `placement: process` stage, whose end is an ipc socket of the relay).
    public var relayed: Set<UInt32> = []
    /// The relay's ipc socket for a `process` stage's end of relayed lane `lane`: where its
    /// output sends (`in`) or its input returns credits (`ret`).
    /// (A directory of their own: no stage id can name these files.)
    public static func relayEndpoint(lane: UInt32, _ end: String, runDir: String) -> String { "ipc://\(runDir)/sock/relay/lane-\(lane).\(end)" }
    /// Port -> the workers whose connections it admits (the far ends of its lanes).
    public var admits: [Int: Set<String>] = [:]
    public init(bindHost: String, connectHost: String, security: TCPSecurity) {
        self.bindHost = bindHost; self.connectHost = connectHost; self.security = security
    }
    func bind(_ port: Int) -> String { "tcp://\(bindHost):\(port)" }
    func connect(_ port: Int) -> String { "tcp://\(connectHost):\(port)" }

    /// Reserves a port for every host-side tcp socket of `plan` (the kernel picks free ones).
    public static func make(plan: PipelinePlan, bindHost: String, connectHost: String, security: TCPSecurity,
                            reserve: () throws(RuntimeError) -> Int) throws(RuntimeError) -> RemoteLayout {
        var r = RemoteLayout(bindHost: bindHost, connectHost: connectHost, security: security)
        let remote = Set(plan.stages.filter { $0.placement.isRemote }.map(\.id))
        let inHost = Set(plan.stages.filter { $0.placement == .inProcess }.map(\.id))
        let worker = { (id: String) in plan.stage(id)?.placement.workerName ?? "" }
        for l in plan.lanes where l.transport == "tcp" {
            if !inHost.contains(l.from) && !inHost.contains(l.to) {
                r.relayed.insert(l.id)
                if remote.contains(l.from) {
                    let dataIn = try reserve(), retOut = try reserve()
                    r.relayIn[l.id] = dataIn; r.laneRet[l.id] = retOut
                    r.admits[dataIn, default: []].insert(worker(l.from)); r.admits[retOut, default: []].insert(worker(l.from))
                }
                if remote.contains(l.to) {
                    let dataOut = try reserve(), retIn = try reserve()
                    r.laneData[l.id] = dataOut; r.relayRet[l.id] = retIn
                    r.admits[dataOut, default: []].insert(worker(l.to)); r.admits[retIn, default: []].insert(worker(l.to))
                }
            } else if remote.contains(l.to) {
                let data = try reserve()
                r.laneData[l.id] = data
                if r.stageRet[l.from] == nil { r.stageRet[l.from] = try reserve() }
                r.admits[data, default: []].insert(worker(l.to))
                if let p = r.stageRet[l.from] { r.admits[p, default: []].insert(worker(l.to)) }
            } else {
                if r.stageIn[l.to] == nil { r.stageIn[l.to] = try reserve() }
                let ret = try reserve()
                r.laneRet[l.id] = ret
                r.admits[ret, default: []].insert(worker(l.from))
                if let p = r.stageIn[l.to] { r.admits[p, default: []].insert(worker(l.from)) }
            }
        }
        return r
    }
}

extension PipelinePlan {
    /// Endpoint naming: inproc names are unique per run (`inproc://<run>/<stage>/in`); ipc socket
    /// files live in the run directory (`<run_dir>/sock/<stage>.in`).
    func inputEndpoint(_ stage: String, transport: String, runTag: String, runDir: String) -> String {
        transport == "inproc" ? "inproc://\(runTag)/\(stage)/in" : "ipc://\(runDir)/sock/\(stage).in"
    }
    func returnEndpoint(_ stage: String, transport: String, runTag: String, runDir: String) -> String {
        transport == "inproc" ? "inproc://\(runTag)/\(stage)/ret" : "ipc://\(runDir)/sock/\(stage).ret"
    }

    /// The assignment for one stage.
    public func assignment(for id: String, runTag: String, runDir: String, remote: RemoteLayout? = nil) -> Assignment? {
        guard let st = stage(id) else { return nil }
        let ins = lanes.filter { $0.to == id }
        let outs = lanes.filter { $0.from == id }
        let isRemote = st.placement.isRemote
        let r = remote
        let worker = { (s: String) in self.stage(s)?.placement.workerName }
        // A relayed lane's end in a `process` stage is an ipc socket like any other.
        let relayedHere = { (l: PlannedLane) in !isRemote && r?.relayed.contains(l.id) == true }
        let local = { (l: PlannedLane) in relayedHere(l) ? "ipc" : l.transport }
        // Non-tcp binds first: the tcp ones are made after the socket becomes a CURVE server.
        var bindIn = Array(Set(ins.filter { local($0) != "tcp" }.map { inputEndpoint(id, transport: local($0), runTag: runTag, runDir: runDir) })).sorted()
        var bindRet = Array(Set(outs.filter { local($0) != "tcp" }.map { returnEndpoint(id, transport: local($0), runTag: runTag, runDir: runDir) })).sorted()
        if !isRemote, let r {
            if let p = r.stageIn[id] { bindIn.append(r.bind(p)) }
            if let p = r.stageRet[id] { bindRet.append(r.bind(p)) }
        }
        let inputs = ins.map { l in
            var i = Assignment.Input(lane: l.id, port: l.port, portIndex: l.portIndex, laneIndex: l.laneIndex, from: l.fromRef, loopBack: l.loopBack,
                                     maxHops: l.maxHops, bound: l.settings.bound, bytes: l.settings.bytes,
                                     returnEndpoint: returnEndpoint(l.from, transport: l.transport, runTag: runTag, runDir: runDir))
            if l.transport == "tcp", let r {
                if isRemote {
                    i.returnEndpoint = r.connect(r.relayRet[l.id] ?? r.stageRet[l.from] ?? 0)
                } else if relayedHere(l) {
                    i.returnEndpoint = RemoteLayout.relayEndpoint(lane: l.id, "ret", runDir: runDir); i.lossy = true
                } else {
                    i.returnEndpoint = r.bind(r.laneRet[l.id] ?? 0); i.bindReturnEndpoint = true; i.peer = worker(l.from)
                }
            }
            return i
        }
        let outputs = st.outputs.map { name in
            Assignment.Output(name: name, lanes: outs.filter { $0.output == name }.map { l in
                var o = Assignment.OutputLane(lane: l.id, to: l.toRef, endpoint: inputEndpoint(l.to, transport: l.transport, runTag: runTag, runDir: runDir),
                                              bound: l.settings.bound, bytes: l.settings.bytes, whenFull: l.settings.whenFull, loopBack: l.loopBack,
                                              group: l.group)
                if l.transport == "tcp", let r {
                    if isRemote {
                        o.endpoint = r.connect(r.relayIn[l.id] ?? r.stageIn[l.to] ?? 0)
                    } else if relayedHere(l) {
                        o.endpoint = RemoteLayout.relayEndpoint(lane: l.id, "in", runDir: runDir); o.lossy = true
                    } else {
                        o.endpoint = r.bind(r.laneData[l.id] ?? 0); o.bind = true; o.peer = worker(l.to)
                    }
                }
                return o
            })
        }
        var a = Assignment(stage: id, kind: st.kind, config: st.config, audit: spec.audit, runDirectory: runDir,
                           maxEnvelopeBytes: spec.limits.maxEnvelopeBytes, maxBatchEnvelopes: spec.limits.maxBatchEnvelopes,
                           bindInput: isRemote ? [] : bindIn, bindReturn: isRemote ? [] : bindRet, inputs: inputs, outputs: outputs, usesStore: st.usesStore)
        if let r, isRemote {
            a.connectInput = ins.compactMap { r.laneData[$0.id].map(r.connect) }
            a.connectReturn = outs.compactMap { r.laneRet[$0.id].map(r.connect) }
        }
        if let r, ins.contains(where: { local($0) == "tcp" }) || outs.contains(where: { local($0) == "tcp" }) {
            var t = r.security
            if isRemote { t.serverSecretKey = nil }
            a.tcp = t
        }
        // A remote producer's tap would be a socket file on another machine.
        if !outs.isEmpty && !isRemote { a.tapEndpoint = tapEndpoint(id, runDir: runDir) }
        a.pipeline = spec.name
        a.delivery = spec.delivery
        return a
    }

    /// Where a stage's runner publishes tapped envelopes of its output lanes.
    public func tapEndpoint(_ stage: String, runDir: String) -> String { "ipc://\(runDir)/sock/\(stage).tap" }
}
