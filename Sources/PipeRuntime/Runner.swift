import Glibc
import Logging
import PipeKit
import PipeStore
import PipeZMQ
import PipeConfig

/// Runs one stage instance on its own thread (or as the body of a worker process): says HELLO
/// on the control channel, takes its ASSIGN, binds and connects its lanes, and loops:
/// credits in, envelopes in, `process`, batches out, stats to the host.
///
/// Threading: everything here runs on the runner's one thread; the class is handed to that
/// thread at start and never touched from another, which is why it is `@unchecked Sendable`.
public final class StageRunner: @unchecked Sendable {
    let zmq: ZMQContext
    let controlEndpoint: String
    public let stageID: String
    let registry: StageRegistry
    let location: String
    /// For worker processes: the host's pid; the runner stops when it is reparented away from it.
    let parentPid: Int32?
    var log: Logger
    /// On a remote worker: its CURVE key pair (a client of the host on every tcp connection), and
    /// the local directory that replaces the host's run directory.
    public var clientKeys: CurveKeyPair?
    public var localRunDirectory: String?
    /// After `run()`: whether the host ended this runner with ABORT (a failed or ending run, or
    /// another runner took the stage over) rather than FINISH.
    public private(set) var abortedByHost = false

    /// The host's CURVE public key, for a remote runner (with `clientKeys`).
    public var serverKey: String?

    public init(context: ZMQContext, controlEndpoint: String, stageID: String, registry: StageRegistry, location: String, parentPid: Int32? = nil) {
        self.zmq = context; self.controlEndpoint = controlEndpoint; self.stageID = stageID; self.registry = registry
        self.location = location; self.parentPid = parentPid
        var l = Logger(label: "stage.\(stageID)"); l[metadataKey: "stage"] = .string(stageID); self.log = l
    }

    /// Runs until FINISH or ABORT; returns the exit status (0 clean, 1 failed).
    public func run() -> Int32 {
        // `top -H` and perf show the stage each thread runs (Linux keeps 15 characters).
        let fd = open("/proc/thread-self/comm", O_WRONLY)
        if fd >= 0 {
            let name = Array(stageID.utf8.prefix(15))
            _ = name.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        do {
            let control = try zmq.socket(.dealer)
            // A remote runner's routing id is random (16 bytes, never shown to other workers), so a
            // reconnection after a cut keeps its route; the host maps it to a stage only after an
            // authorized HELLO, and checks the connection's worker on every frame.
            if controlEndpoint.hasPrefix("tcp://") {
                var id: [UInt8] = [0x72]
                for _ in 0..<16 { id.append(UInt8.random(in: 0...255)) }
                try control.setIdentity(id)
            } else {
                try control.setIdentity(Array(stageID.utf8))
            }
            if controlEndpoint.hasPrefix("tcp://") { try TCPLinks.prepare(control) }
            if let k = clientKeys, let server = serverKey { try control.makeCurveClient(publicKey: k.publicKey, secretKey: k.secretKey, serverKey: server) }
            // Unbounded queue + non-blocking sends: a dead host must never wedge the runner
            // (the parent and silence checks then end it).
            try control.setSendHWM(0)
            try control.connect(controlEndpoint)
            defer { control.close() }
            try control.send(Hello(pid: UInt32(getpid()), worker: stageID).encode(seq: 1))
            // Wait for the ASSIGN (or ABORT) for up to 60 s.
            let deadline = monotonicNs() + 60_000_000_000
            var poller = ZMQPoller(); poller.add(control)
            while monotonicNs() < deadline {
                guard try poller.poll(timeoutMs: 200) > 0, let msg = try control.receiveMessage(dontWait: true) else { continue }
                let outcome: Result<Assignment?, RuntimeError> = msg.withBytes { raw in
                    do {
                        let f = try FrameView(raw)
                        switch f.header.type {
                        case .assign:
                            return .success(try Assignment(json: try JSON.parse(try f.utf8Body())))
                        case .command:
                            if try f.command().code == .abort { return .failure(.protocolError("aborted by host before assignment")) }
                            return .success(nil)
                        default: return .success(nil)
                        }
                    } catch let e as RuntimeError { return .failure(e) }
                    catch { return .failure(.protocolError("bad ASSIGN: \(error)")) }
                }
                switch outcome {
                case .failure(let e): log.error("\(e)"); return 1
                case .success(nil): continue
                case .success(var a?):
                    let core: RunnerCore
                    do {
                        if let d = localRunDirectory { a.runDirectory = d; a.tapEndpoint = "" }
                        core = try RunnerCore(assignment: a, zmq: zmq, control: control, registry: registry, location: location, log: log,
                                              clientKeys: clientKeys)
                    } catch {
                        // Tell the host, or it would wait for a stage that will never report.
                        let reason = "cannot start: \(error)"
                        log.error("\(reason)")
                        let r = StatsReport(stage: stageID, timeNs: wallNs(), flags: [.failed], received: 0, emitted: 0, deadLettered: 0,
                                            errors: 1, held: 0, lanes: [], status: [("error", .string(reason))])
                        _ = try? control.send(r.encode(seq: 2))
                        return 1
                    }
                    core.parentPid = parentPid
                    let rc = core.run()
                    abortedByHost = core.abortedByHost
                    return rc
                }
            }
            log.error("no ASSIGN from the host within 60 s on \(controlEndpoint)")
            return 1
        } catch {
            log.error("runner failed: \(error)")
            return 1
        }
    }
}

/// The running stage with its lanes. One thread.
final class RunnerCore: StageContext {
    /// Set when the host sent ABORT (not FINISH).
    var abortedByHost = false
    struct OutLane {
        let id: UInt32
        let to: String
        let socket: ZMQSocket
        let bound: Int
        let whenFull: WhenFull
        let loopBack: Bool
        var epoch: UInt32 = 0
        /// Epochs this lane has left behind (a late CREDIT of one is ignored).
        var retiredEpochs: [UInt32] = []
        var limit: UInt64 = 0
        var sentInEpoch: UInt64 = 0
        var transmitted: UInt64 = 0
        var queue = Ring<Envelope>()
        var seq: UInt64 = 0
        var eosSent = false
        var dropped: UInt64 = 0
        var blockedSince: UInt64?
        var blockedNs: UInt64 = 0
        /// Whether any CREDIT has arrived (drop policies apply only once the consumer is there).
        var hasCredit = false
        /// DATA frames sent (transmitted / frames = the average batch).
        var frames: UInt64 = 0
        /// `when_full: spill`: the lane's disk queue.
        var spill: SpillQueue?
        var spillFailing = false
        /// The index of the output this lane belongs to.
        var output = 0
        /// Byte bound (producer-side): bytes sent and not yet credited back, frame by frame
        /// (cumulative count in the epoch after the frame, its bytes), and bytes queued here.
        var bytesBound: Int?
        var inFlightBytes = 0
        var queueBytes = 0
        var sentFrames: [(count: UInt64, bytes: Int)] = []
        /// tcp lanes: EOS goes again every second until the host ends the run (one lost with a
        /// dropped connection would leave the consumer waiting).
        var tcp = false
        /// Both ends in this process (inproc): batches are handed over by reference (HANDOFF).
        var local = false
        var eosAt: UInt64 = 0
        var beatAt: UInt64 = 0
        var credits: Int { Int(clamping: Int64(clamping: limit) - Int64(clamping: sentInEpoch)) }
        var inFlight: Int { bound - credits + queue.count }
        var bytesRoom: Bool { bytesBound.map { inFlightBytes + queueBytes < $0 } ?? true }
        var writable: Bool { queue.count < credits && bytesRoom }
        /// Whether the lane may send now (credits, and room under the byte bound).
        var canSend: Bool { credits > 0 && (bytesBound.map { inFlightBytes < $0 } ?? true) }
    }
    struct InLane {
        let id: UInt32
        let arrival: Arrival
        let maxHops: Int?
        let bound: Int
        let ret: ZMQSocket
        var epoch: UInt32
        var receivedInEpoch: UInt64 = 0
        var received: UInt64 = 0
        var limitSent: UInt64 = 0
        var seq: UInt64 = 0
        var eos = false
        var producerIncarnation: UInt64?
        /// When the producer's current incarnation was first seen (monotonic ns).
        var incarnationAt: UInt64 = 0
        var latency = DurationHistogram()
        /// With a byte bound: bytes taken since the last CREDIT (credits go back at half of it too,
        /// or the producer, counting bytes, would wait for a count that never comes).
        var bytesBound: Int?
        var bytesSinceGrant = 0
        /// tcp lanes: the producer's last frame seq, to notice frames lost with a dropped connection.
        var lastSeq: UInt64 = 0
        /// tcp lanes: since when seqs have been missing (monotonic ns), which (up to
        /// ``maxTrackedGap``; beyond, only how many), so that a frame arriving late fills its gap.
        var gapSince: UInt64?
        var missing: Set<UInt64> = []
        var untrackedMissing: UInt64 = 0
        var tcp = false
        /// The producer is in this process (inproc): HANDOFF frames are taken on this lane, and only here.
        var local = false
        var creditAt: UInt64 = 0
    }

    let a: Assignment
    let zmq: ZMQContext
    let control: ZMQSocket
    var log: Logger
    let location: String
    let stage: any Stage
    let source: (any SourceStage)?
    let limits: WireLimits
    /// Whose batches this runner hands over and takes on in-process lanes (``LocalHandoff``).
    let handoffContext: ObjectIdentifier
    /// The tcp endpoints this runner binds (lane ports of the host for remote workers), and the
    /// monitors that report their failed handshakes (a plaintext client on a CURVE port, a client
    /// with the wrong server key): ZeroMQ drops those connections without a word to the socket.
    var tcpBound: [(ZMQSocket, String)] = []
    var handshakes: HandshakeWatch
    /// tcp input lanes with seqs missing, not yet taken for lost (``settleGaps``).
    var lanesWithGaps = 0
    var inSocket: ZMQSocket?
    var retSocket: ZMQSocket?
    /// `pipectl tap`: an XPUB socket; lanes with a subscriber get copies of what they carry, at
    /// most `tapRate` envelopes per second each, dropped (never waited for) when the reader is slow.
    var tapSocket: ZMQSocket?
    var tapped: Set<UInt32> = []
    var tapWindow: [UInt32: (start: UInt64, sent: Int)] = [:]
    static let tapRate = 200
    var outLanes: [OutLane] = []
    var inLanes: [InLane] = []
    var inIndex: [UInt32: Int] = [:]
    var outIndex: [UInt32: Int] = [:]
    /// Output index -> lane indices (every lane of every group).
    var outputLanes: [[Int]] = []
    /// Output index -> groups -> lane indices: each group gets every envelope (fan-out); inside a
    /// group (the replicas of one consumer) envelopes go round-robin.
    var outputGroups: [[[Int]]] = []
    var roundRobin: [[Int]] = []
    /// Every group of every output, for the backpressure test.
    var allGroups: [[Int]] = []
    var outputNames: [String] = []
    var deadLetterHandle: OutputHandle
    var kv: (any KeyValueStore)?
    /// tcp lanes: the worker that owns each lane (the sender its frames must come from).
    var lanePeers: [UInt32: String] = [:]
    let checkPeers: Bool
    var foreignFrames: UInt64 = 0
    var lostFrames: UInt64 = 0
    let incarnation: UInt64
    /// At-least-once bookkeeping (docs/delivery.md); nil under at-most-once.
    var delivery: DeliveryState?
    let isSink: Bool

    // Counters.
    var received: UInt64 = 0, emitted: UInt64 = 0, deadLettered: UInt64 = 0, errors: UInt64 = 0
    var busyNs: UInt64 = 0
    /// The storage identity of the input the stage is handling (``deliverToStage``), or nil.
    var handlingInput: ObjectIdentifier?
    var processing = DurationHistogram()
    var status: [(String, AttrValue)] = []
    var metrics: [String: Int] = [:]
    var controlSeq: UInt64 = 1
    /// Commands taken from the control socket and not yet acted on; `endPending` once one of them
    /// is FINISH or ABORT.
    var pendingCommands: [RunnerCommand] = []
    var endPending = false
    /// An AUDIT frame being filled (header, then records separated by newlines).
    var auditBuffer: [UInt8] = []

    // State.
    var exhausted = false
    var stopRequested = false
    var loopClosed = false
    var drained = false
    var finished = false
    var failed: String?
    var nextTick: UInt64 = .max
    var nextProduce: UInt64 = 0
    var nextStats: UInt64 = 0
    var lastHostContact: UInt64
    var statsDirty = true
    var parentPid: Int32?

    init(assignment a: Assignment, zmq: ZMQContext, control: ZMQSocket, registry: StageRegistry, location: String, log: Logger,
         clientKeys: CurveKeyPair? = nil) throws {
        self.a = a; self.zmq = zmq; self.control = control; self.location = location; self.log = log
        handoffContext = ObjectIdentifier(zmq)
        let links = TCPLinks(security: a.tcp, clientKeys: clientKeys)
        var tcpBound: [(ZMQSocket, String)] = []
        checkPeers = a.inputs.contains { $0.peer != nil } || a.outputs.contains { $0.lanes.contains { $0.peer != nil } }
        limits = WireLimits(maxEnvelopeBytes: a.maxEnvelopeBytes, maxBatchEnvelopes: a.maxBatchEnvelopes)
        guard let d = registry[a.kind] else { throw RuntimeError.plan("unknown stage kind '\(a.kind)'") }
        let reader = ConfigReader(a.config, fields: d.fields)
        stage = try d.make(reader)
        source = stage as? any SourceStage
        isSink = d.role == .sink
        incarnation = wallNs()
        lastHostContact = monotonicNs()
        outputNames = a.outputs.map(\.name)
        deadLetterHandle = OutputHandle(index: outputNames.firstIndex(of: deadLetterOutput) ?? -1, name: deadLetterOutput)
        let maxMsg = Int64(limits.maxFrameBytes)
        if !a.bindInput.isEmpty || !a.connectInput.isEmpty {
            let s = try zmq.socket(.pull)
            // Credits bound what an honest producer has in flight, so no queue limit is needed;
            // but a producer across tcp (a worker, maybe relayed) could ignore them. ZeroMQ's
            // limit is per connection: twice the largest bound plus room for heartbeats never
            // holds back an honest producer, and a flood backs up into the flooder's connection
            // (or the relay, which then stops reading it) instead of this process's memory.
            let across = a.inputs.filter { $0.returnEndpoint.hasPrefix("tcp://") || $0.lossy }
            try s.setReceiveHWM(across.isEmpty ? 0 : Int32(clamping: 2 * (across.map(\.bound).max() ?? 0) + 64))
            try s.setMaxMessageSize(maxMsg)
            for e in a.bindInput { try links.bind(s, e); if e.hasPrefix("tcp://") { tcpBound.append((s, e)) } }
            for e in a.connectInput { try links.connect(s, e) }
            inSocket = s
        }
        if !a.bindReturn.isEmpty || !a.connectReturn.isEmpty {
            let s = try zmq.socket(.pull)
            try s.setReceiveHWM(0); try s.setMaxMessageSize(65_536 + 16 * Int64(Swift.max(4096, a.maxBatchEnvelopes)))
            for e in a.bindReturn { try links.bind(s, e); if e.hasPrefix("tcp://") { tcpBound.append((s, e)) } }
            for e in a.connectReturn { try links.connect(s, e) }
            retSocket = s
        }
        for o in a.outputs {
            var idx: [Int] = []
            var byGroup: [Int: [Int]] = [:]
            for l in o.lanes {
                byGroup[l.group, default: []].append(outLanes.count)
                let s = try zmq.socket(.push)
                try s.setSendHWM(Int32(clamping: l.bound + 64))
                if l.bind {
                    try links.bind(s, l.endpoint)
                    if l.endpoint.hasPrefix("tcp://") { tcpBound.append((s, l.endpoint)) }
                } else { try links.connect(s, l.endpoint) }
                if let p = l.peer { lanePeers[l.lane] = p }
                outIndex[l.lane] = outLanes.count
                idx.append(outLanes.count)
                var lane = OutLane(id: l.lane, to: l.to, socket: s, bound: l.bound, whenFull: l.whenFull, loopBack: l.loopBack)
                lane.tcp = l.endpoint.hasPrefix("tcp://") || l.lossy
                lane.local = a.byReference && l.endpoint.hasPrefix("inproc://") && !l.lossy
                lane.bytesBound = l.bytes
                lane.output = outputLanes.count
                if l.whenFull == .spill && !l.loopBack {
                    let dir = a.runDirectory + "/spill"
                    mkdir(dir, 0o700)
                    let name = "\(a.stage).\(o.name)--\(l.to)".map { $0.isLetter || $0.isNumber || "._-".contains($0) ? String($0) : "_" }.joined()
                    do { lane.spill = try SpillQueue(path: "\(dir)/\(name).sqlite", tracked: a.delivery.mode == .atLeastOnce) }
                    catch { throw RuntimeError.io("lane \(l.lane) to \(l.to): cannot open its spill queue: \(error)") }
                    if let n = lane.spill?.count, n > 0 { log.info("lane \(l.lane) to \(l.to): \(n) spilled envelopes from an earlier run go first") }
                }
                outLanes.append(lane)
            }
            outputLanes.append(idx)
            let groups = byGroup.keys.sorted().compactMap { byGroup[$0] }
            outputGroups.append(groups)
            roundRobin.append(Array(repeating: 0, count: groups.count))
            allGroups += groups
        }
        for i in a.inputs {
            let s = try zmq.socket(.push)
            // Under at-least-once the return path carries acknowledgements, which must never be
            // dropped at a high-water mark: their volume is bounded by what the lane carried.
            try s.setSendHWM(a.delivery.mode == .atLeastOnce ? 0 : 1000)
            if i.bindReturnEndpoint {
                try links.bind(s, i.returnEndpoint)
                if i.returnEndpoint.hasPrefix("tcp://") { tcpBound.append((s, i.returnEndpoint)) }
            } else { try links.connect(s, i.returnEndpoint) }
            if let p = i.peer { lanePeers[i.lane] = p }
            inIndex[i.lane] = inLanes.count
            let transport = i.returnEndpoint.range(of: "://").map { String(i.returnEndpoint[..<$0.lowerBound]) } ?? "inproc"
            inLanes.append(InLane(id: i.lane, arrival: Arrival(port: i.port, portIndex: i.portIndex, laneIndex: i.laneIndex, from: i.from,
                                                               loopBack: i.loopBack, transport: transport),
                                  maxHops: i.maxHops, bound: i.bound, ret: s, epoch: UInt32(truncatingIfNeeded: incarnation / 1000) | 1,
                                  bytesBound: i.bytes))
            inLanes[inLanes.count - 1].tcp = transport == "tcp" || i.lossy
            inLanes[inLanes.count - 1].local = transport == "inproc" && !i.lossy
        }
        if !a.tapEndpoint.isEmpty {
            let s = try zmq.socket(.xpub)
            try s.setSendHWM(1000); try s.setLinger(ms: 0)
            try Self.prepareIPC(a.tapEndpoint); try s.bind(a.tapEndpoint); Self.restrict(a.tapEndpoint)
            tapSocket = s
        }
        if a.usesStore {
            mkdir(a.runDirectory + "/state", 0o700)
            kv = try SQLiteKeyValueStore(path: a.runDirectory + "/state/\(a.stage).kv.sqlite")
        }
        if a.delivery.mode == .atLeastOnce {
            let dv = DeliveryState(settings: a.delivery, inLanes: inLanes.count, outLanes: outLanes.count)
            if let rs = stage as? any ResumableSource, rs.durable {
                mkdir(a.runDirectory + "/state", 0o700)
                dv.journal = try SourceJournal(path: a.runDirectory + "/state/\(a.stage).journal.sqlite", pipeline: a.pipeline, stage: a.stage, kind: a.kind)
            }
            delivery = dv
        }
        self.tcpBound = tcpBound
        handshakes = HandshakeWatch(run: a.runDirectory)
    }

    /// Whether a tcp frame is from the worker that owns its lane: messages over an authenticated
    /// connection carry the worker name the ZAP handler gave it (User-Id); inproc and ipc ones carry
    /// none and are the host's own. A frame for a lane the sender does not own is refused and counted.
    func peerAllowed(_ msg: ZMQMessage, lane: UInt32) -> Bool {
        peerAllowed(user: checkPeers ? msg.property("User-Id") : nil, lane: lane)
    }

    func peerAllowed(user: String?, lane: UInt32) -> Bool {
        guard checkPeers, let user, !user.isEmpty else { return true }
        if lanePeers[lane] == user && !RemoteBans.shared.isBanned(user, in: a.runDirectory) { return true }
        if lanePeers[lane] == user {
            refuseRemoteFrame(user, lane: lane, "worker '\(user)' is revoked or cut off; its frame on lane \(lane) is refused", garbage: false)
        } else {
            refuseRemoteFrame(user, lane: lane, "a frame from worker '\(user)' on lane \(lane), which belongs to '\(lanePeers[lane] ?? "the host")'")
        }
        return false
    }

    /// Counts a frame refused from a remote worker (`refused_frames` in the status report). From
    /// a worker's authenticated connection (a runner in the host process), the host takes it over:
    /// it audits it and counts it against the worker, cutting off one that keeps at it (garbage,
    /// floods past the credits, frames on other workers' lanes). Otherwise (a remote consumer
    /// fed through the relay) the first ten and then every thousandth are logged and audited
    /// here: a flood stays counted, not written.
    func refuseRemoteFrame(_ user: String, lane: UInt32, _ why: String, garbage: Bool = true, fromWorker: Bool = true) {
        foreignFrames += 1
        report("refused_frames", .int(Int64(clamping: foreignFrames)))
        statsDirty = true
        if checkPeers && fromWorker {
            RemoteRefusals.shared.report(FrameRefusal(worker: user, why: why, garbage: garbage), run: a.runDirectory)
            return
        }
        if foreignFrames <= 10 || foreignFrames % 1000 == 0 {
            log.warning("refused: \(why) (\(foreignFrames) refused so far)")
            audit(AuditRecord(decision: "frame-refused", intent: "remote.lane", reason: why,
                              details: ["worker": .string(user), "lane": .int(Int64(lane)), "refused_so_far": .int(Int64(clamping: foreignFrames))]))
        }
    }

    static func prepareIPC(_ endpoint: String) throws {
        guard endpoint.hasPrefix("ipc://") else { return }
        let path = String(endpoint.dropFirst(6))
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.endIndex)])
        mkdir(dir, 0o700)
        unlink(path)
    }
    /// ipc socket files: mode 0600 (the run directory is 0700 too).
    static func restrict(_ endpoint: String) {
        guard endpoint.hasPrefix("ipc://") else { return }
        chmod(String(endpoint.dropFirst(6)), 0o600)
    }

    // MARK: StageContext

    var stageID: String { a.stage }
    var logger: Logger { log }
    var now: UInt64 { monotonicNs() }
    var wallClockNs: UInt64 { wallNs() }
    var auditLevel: AuditLevel { a.audit }
    var runDirectory: String { a.runDirectory }
    var store: (any KeyValueStore)? { kv }
    func laneCount(port: String) -> Int { inLanes.reduce(0) { $0 + ($1.arrival.port == port ? 1 : 0) } }
    var restarts: Int { a.restarts }

    func output(_ name: String) throws(StageError) -> OutputHandle {
        guard let i = outputNames.firstIndex(of: name) else {
            throw StageError.halt("stage '\(a.stage)' has no output '\(name)' (outputs: \(outputNames.joined(separator: ", ")))")
        }
        return OutputHandle(index: i, name: name)
    }

    func emit(_ envelope: consuming Envelope, to output: OutputHandle) {
        guard let dv = delivery else { emitToLanes(envelope, to: output); return }
        // A source's emit outside a redelivery is a new root: kept until acknowledged.
        if dv.current < 0, source != nil || dv.emitAsRoot, output.index >= 0, output.index < outputLanes.count {
            let t = dv.newToken(inLane: -1, id: envelope.id)
            let deadline = dv.clock &+ dv.timeoutNs
            // A restarted non-durable source sends as a later attempt; the kept root says so too.
            if envelope.attempt < dv.baseAttempt { envelope.attempt = dv.baseAttempt }
            dv.setRoot(t, DeliveryState.Root(envelope: copy envelope, output: output.index, rowid: 0, deadline: deadline, born: dv.tokens[Int(t)].gen))
            if dv.journal != nil { dv.unjournaled.append((t, dv.tokens[Int(t)].gen)) }
            dv.current = t
            emitToLanes(envelope, to: output)
            dv.current = -1
            dv.tokens[Int(t)].open = false
            if dv.tokens[Int(t)].pending == 0 { dv.complete(t) }
            return
        }
        emitToLanes(envelope, to: output)
    }

    func emitToLanes(_ envelope: consuming Envelope, to output: OutputHandle) {
        guard output.index >= 0, output.index < outputLanes.count else { return }
        // What is emitted while handling a redelivered input is a redelivery too (sinks look up
        // only later attempts in their window).
        if let dv = delivery, dv.currentAttempt > 1, envelope.attempt < dv.currentAttempt { envelope.attempt = dv.currentAttempt }
        if output.index != deadLetterHandle.index {
            // The input being handled, passed on unchanged, was checked against these same limits
            // when it was emitted (or decoded) upstream; anything else is checked now.
            do { if envelope.storageIdentity != handlingInput { try EnvelopeCodec.check(envelope, limits: limits) } } catch {
                deadLetter(envelope, reason: "cannot emit on '\(output.name)': \(error.reason)")
                return
            }
            if !(delivery?.redelivering ?? false) { emitted += 1 }
        } else if (try? EnvelopeCodec.check(envelope, limits: limits)) == nil {
            // A stage's own dead letter over the limits (deadLetter() cuts its own down first).
            let reason = envelope.attrs["dead_letter_reason"]?.stringValue ?? "a dead letter over the limits"
            envelope = cutDown(envelope, reason: reason)
        }
        if a.audit == .all {
            audit(.about(envelope, decision: "route", reason: "emitted on \(output.name)", routine: true))
        }
        let groups = outputGroups[output.index]
        // Read once: every lane's registration names the same id.
        let emittedID: EnvelopeID? = delivery != nil ? envelope.id : nil
        for (n, group) in groups.enumerated() {
            let li = pick(output.index, n, group)
            switch outLanes[li].whenFull {
            case .dropNewest where !outLanes[li].loopBack && outLanes[li].hasCredit && outLanes[li].inFlight >= outLanes[li].bound:
                outLanes[li].dropped += 1
                audit(.about(envelope, decision: "drop", reason: "lane \(outLanes[li].id) to \(outLanes[li].to) full (drop_newest)"))
                continue
            case .dropOldest where !outLanes[li].loopBack && outLanes[li].hasCredit && outLanes[li].inFlight >= outLanes[li].bound && !outLanes[li].queue.isEmpty:
                let old = outLanes[li].queue.peek(0)
                outLanes[li].queue.removeFirst()
                // Dropped by policy: as good as acknowledged.
                if delivery != nil { acknowledged(lane: li, id: old.id, mayWalk: false) }
                if outLanes[li].bytesBound != nil { outLanes[li].queueBytes -= EnvelopeCodec.encodedSize(old) }
                outLanes[li].dropped += 1
                audit(.about(old, decision: "drop", reason: "lane \(outLanes[li].id) to \(outLanes[li].to) full (drop_oldest)"))
            case .spill where !outLanes[li].loopBack:
                // Once anything is spilled, everything after it is too: the lane keeps its order.
                if let sp = outLanes[li].spill, !sp.isEmpty || !outLanes[li].writable {
                    sp.append(EnvelopeCodec.encode(envelope))
                    continue
                }
            default: break
            }
            if outLanes[li].bytesBound != nil { outLanes[li].queueBytes += EnvelopeCodec.encodedSize(envelope) }
            if let dv = delivery {
                if dv.current < 0 && dv.handling { dv.current = dv.newToken(inLane: dv.inputLane, id: dv.inputID) }
                if dv.current >= 0 { dv.register(lane: li, id: emittedID ?? envelope.id, token: dv.current, at: dv.clock) }
            }
            // Fan-out copies to every group but the last, which takes the envelope itself.
            if n == groups.count - 1 { outLanes[li].queue.append(consume envelope); return }
            outLanes[li].queue.append(copy envelope)
        }
    }

    /// The lane of `group` that takes the next envelope: round-robin, skipping lanes without room
    /// (the least loaded when all are full).
    @inline(__always) func pick(_ output: Int, _ g: Int, _ group: [Int]) -> Int {
        if group.count == 1 { return group[0] }
        let start = roundRobin[output][g]
        var best = group[start % group.count]
        for k in 0..<group.count {
            let li = group[(start + k) % group.count]
            if outLanes[li].writable { best = li; break }
            if outLanes[li].queue.count < outLanes[best].queue.count { best = li }
        }
        roundRobin[output][g] = (start + 1) % group.count
        return best
    }

    func isWritable(_ output: OutputHandle) -> Bool {
        guard output.index >= 0, output.index < outputLanes.count else { return false }
        return outputGroups[output.index].allSatisfy { g in g.contains { outLanes[$0].writable || outLanes[$0].loopBack } }
    }

    func deadLetter(_ envelope: Envelope, reason: String) {
        var e = envelope
        e.attrs["dead_letter_reason"] = .string(String(reason.utf8.prefix(4096)) ?? reason)
        e.attrs["dead_letter_stage"] = .string(a.stage)
        deadLettered += 1
        audit(.about(envelope, decision: "dead-letter", reason: reason))
        if deadLetterHandle.index >= 0 {
            // A dead letter that itself breaks the limits is cut down to what surely fits.
            if (try? EnvelopeCodec.check(e, limits: limits)) == nil { e = cutDown(envelope, reason: reason) }
            emit(e, to: deadLetterHandle)
        } else {
            log.warning("dead letter (no destination): \(reason)")
        }
    }

    /// A dead letter cut down to what surely fits any limits: its header (strings shortened), the
    /// reason and this stage; no payload.
    func cutDown(_ envelope: Envelope, reason: String) -> Envelope {
        Envelope(id: envelope.id, parent: envelope.parent, actor: String(envelope.actor.prefix(256)),
                 intent: String(envelope.intent.prefix(256)), authority: String(envelope.authority.prefix(256)),
                 rank: envelope.rank, hops: envelope.hops, attempt: envelope.attempt, ingestNs: envelope.ingestNs,
                 attrs: ["dead_letter_reason": .string(String(reason.prefix(1000))), "dead_letter_stage": .string(String(a.stage.prefix(256)))])
    }

    func audit(_ record: AuditRecord) {
        if record.routine && a.audit != .all { return }
        var r = record
        if r.stage.isEmpty { r.stage = a.stage }
        if r.location.isEmpty { r.location = location }
        if r.timeNs == 0 { r.timeNs = wallNs() }
        // Batched: records leave as binary entries (docs/audit-log.md) in one AUDIT frame per
        // loop pass (flushAudit), not one frame (and one wake-up of the host) per decision.
        if auditBuffer.isEmpty {
            auditBuffer.reserveCapacity(64 << 10)
            let h = FrameEncoder.text(.audit, seq: 0, "")
            auditBuffer.append(contentsOf: h)
        }
        AuditCodec.appendEntry(r, into: &auditBuffer)
        if auditBuffer.count >= Self.auditFlushBytes { flushAudit() }
    }

    static let auditFlushBytes = 256 << 10

    /// Sends the buffered audit records. The control socket has no send limit (HWM 0), so a
    /// record is never dropped here; the host writes them in arrival order.
    func flushAudit() {
        guard !auditBuffer.isEmpty else { return }
        controlSeq += 1
        auditBuffer.withUnsafeMutableBytes { FrameHeader.patchSeq(in: $0, controlSeq) }
        _ = try? control.send(auditBuffer)
        auditBuffer.removeAll(keepingCapacity: true)
    }

    func report(_ key: String, _ value: AttrValue) {
        if let i = status.firstIndex(where: { $0.0 == key }) { status[i].1 = value } else { status.append((key, value)) }
    }

    func count(_ metric: String, by amount: Int) { metrics[metric, default: 0] += amount }

    // MARK: loop

    /// False while some blocking group has no lane with room: then the stage takes no input.
    var canAccept: Bool {
        for g in allGroups {
            var blocking = false, room = false
            for li in g {
                let l = outLanes[li]
                if l.loopBack || (l.whenFull != .block && !l.spillFailing) { room = true; break }
                blocking = true
                // A spill lane whose writes fail holds what it has, in order, and takes no more.
                if l.writable && !l.spillFailing { room = true; break }
            }
            if blocking && !room { return false }
        }
        return true
    }
    /// Nothing waits to be sent. A spill queue left on disk counts as empty once a stop was
    /// requested (it is sent first by the next run with this run directory), but only once
    /// everything in it is written: a stop never ends with spilled envelopes only in memory.
    var queuesEmpty: Bool {
        outLanes.allSatisfy { $0.queue.isEmpty && ($0.spill?.isEmpty ?? true || (stopRequested && !($0.spill?.hasPending ?? false))) }
    }
    var idle: Bool { queuesEmpty && stage.heldCount == 0 && deliverySettled }
    /// Every non-loop input has ended (checked on every loop pass: no allocation).
    var nonLoopInputsEnded: Bool { inLanes.allSatisfy { $0.arrival.loopBack || $0.eos } }
    var hasLoopInputs: Bool { inLanes.contains { $0.arrival.loopBack } }
    var hasByteBoundInput: Bool { inLanes.contains { $0.bytesBound != nil } }
    var inputsClosed: Bool {
        if source != nil { return exhausted }
        return nonLoopInputsEnded && (loopClosed || !hasLoopInputs)
    }
    var awaitingLoopClose: Bool { source == nil && !loopClosed && hasLoopInputs && nonLoopInputsEnded }

    func run() -> Int32 {
        defer { teardown() }
        do { try stage.start(context: self) } catch {
            fail("start failed: \(error)")
        }
        if failed == nil {
            do { try startDelivery() } catch { fail("delivery: \(error)") }
        }
        if let t = stage.tickInterval { nextTick = monotonicNs() + t }
        // Announce ourselves on every output lane (producer incarnation) and grant initial credits.
        for i in outLanes.indices { beat(i) }
        for i in inLanes.indices { grantCredits(i, force: true) }

        var poller = ZMQPoller()
        poller.add(control)
        let pr = retSocket.map { poller.add($0) } ?? -1
        let pi = inSocket.map { poller.add($0) } ?? -1
        if let ts = tapSocket { _ = poller.add(ts) }
        handshakes.watch(tcpBound, context: zmq, tag: "\(a.stage)/\(incarnation)", poller: &poller, log: log)
        var exitCode: Int32 = 0
        loop: while true {
            let t = monotonicNs()
            // How long may we sleep?
            var wait: UInt64 = 100_000_000
            if failed == nil && !finished {
                if let _ = source, !exhausted, canAccept, pendingRoom > 0 { wait = nextProduce > t ? min(wait, nextProduce - t) : 0 }
                if let dv = delivery, source != nil || dv.rootCount > 0 {
                    let next = checkTimeouts(t)
                    if next != .max { wait = next > t ? min(wait, next - t) : 0 }
                }
                if nextTick != .max { wait = nextTick > t ? min(wait, nextTick - t) : 0 }
                if inputsClosed && !drained { wait = 0 }
            }
            if nextStats > t { wait = min(wait, nextStats - t) } else { wait = 0 }
            if pi >= 0 { poller.setEvents(pi, canAccept && failed == nil ? .readable : []) }
            // zmq_poll counts in milliseconds: a source due again sooner (a rate limit) sleeps
            // instead, at least 200 us so that what falls due meanwhile leaves as one batch
            // (waking per envelope cost half a core at 187k/s), at most the 1 ms poll would.
            if source != nil, wait > 0, wait < 1_000_000 {
                var ts = timespec(tv_sec: 0, tv_nsec: Int(max(wait, 200_000)))
                nanosleep(&ts, nil)
                wait = 0
            }
            do { _ = try poller.poll(timeoutMs: Int((wait + 999_999) / 1_000_000)) } catch {
                if error.isTerminated { break loop }
                log.debug("poll: \(error)")
            }

            // Control (always drained: commands must get through while the stage is blocked).
            do {
                receiveCommands()
                let commands = pendingCommands
                pendingCommands.removeAll()
                for cmd in commands {
                    switch cmd.code {
                    case .loopClosed: loopClosed = true; statsDirty = true
                    case .stop:
                        stopRequested = true; statsDirty = true
                        if let src = source { src.requestStop(); exhausted = true }
                    case .finish: sendStats(); break loop
                    case .abort: exitCode = failed == nil ? 0 : 1; abortedByHost = true; sendStats(); break loop
                    }
                }
            }
            handshakes.take(poller)
            // Tap subscriptions: 0x01 + lane id (4 bytes, big-endian) subscribes, 0x00 leaves.
            if let ts = tapSocket {
                while let m = try? ts.receive(dontWait: true), m.count == 5 {
                    let lane = UInt32(m[1]) << 24 | UInt32(m[2]) << 16 | UInt32(m[3]) << 8 | UInt32(m[4])
                    if m[0] == 1 { tapped.insert(lane) } else { tapped.remove(lane) }
                }
            }
            // Credits back from consumers.
            if pr >= 0, let ret = retSocket {
                while let msg = try? ret.receiveMessage(dontWait: true) { handleReturn(msg) }
            }
            flushAll()
            if failed == nil {
                // Input.
                if let inS = inSocket {
                    var frames = 0
                    // A burst is bounded in frames and in time, so that control, ticks and the
                    // source get their turn even behind a slow stage with a deep queue.
                    let burstEnd = coarseMonotonicNs() + 50_000_000
                    while frames < 64, canAccept, frames == 0 || coarseMonotonicNs() < burstEnd, let msg = try? inS.receiveMessage(dontWait: true) {
                        frames += 1
                        handleInput(msg)
                        if frames % 8 == 0 { flushAll() }
                    }
                    // Credits go back at half a window (in handleInput), never per burst: the
                    // producer still holds half a window then, so it is never blocked by waiting,
                    // and a CREDIT per burst would wake it for every small batch at low rates.
                    // A byte-bounded lane is the exception: when we have taken everything, what
                    // is in flight may be less than half its bytes, and the producer may be
                    // waiting for room for one more envelope; tell it what we took.
                    if hasByteBoundInput, !inS.hasInput {
                        for li in inLanes.indices where inLanes[li].bytesBound != nil && inLanes[li].bytesSinceGrant > 0 { grantCredits(li, force: false) }
                    }
                }
                // Source.
                if let max = a.maxEmit, emitted >= max, !exhausted { exhausted = true; statsDirty = true }
                if let src = source, !exhausted, canAccept, pendingRoom > 0, monotonicNs() >= nextProduce {
                    // Under a byte bound the count of credits says little: produce a few at a time.
                    let room = allGroups.map { g in g.reduce(0) { r, li in
                        let l = outLanes[li]
                        if l.loopBack { return r + 256 }
                        let byCount = Swift.max(0, l.credits - l.queue.count)
                        return r + (l.bytesBound == nil ? byCount : (l.bytesRoom ? Swift.min(byCount, 8) : 0))
                    } }
                    var budget = Swift.max(1, Swift.min(limits.maxBatchEnvelopes, room.min() ?? 256, pendingRoom))
                    if let max = a.maxEmit { budget = Int(Swift.min(UInt64(budget), max - emitted)) }
                    let t0 = monotonicNs(), before = emitted
                    defer {
                        let spent = monotonicNs() - t0, n = emitted - before
                        busyNs &+= spent
                        if n > 0 { processing.record(ns: spent / n, count: n) }
                    }
                    do {
                        switch try src.produce(budget: min(budget, 1024), context: self) {
                        case .active: break
                        case .idle(let after): nextProduce = monotonicNs() &+ min(after, 60_000_000_000)
                        case .exhausted: exhausted = true; statsDirty = true
                        }
                    } catch let e as StageError where e.action != .halt {
                        errors += 1; log.warning("source error: \(e.reason)")
                    } catch { fail("source failed: \(error)") }
                    if stopRequested { exhausted = true }
                }
                // Tick.
                if nextTick != .max, monotonicNs() >= nextTick {
                    let t0 = monotonicNs()
                    do { try stage.tick(context: self) } catch { handleStageError(error, envelope: nil) }
                    busyNs &+= monotonicNs() - t0
                    nextTick = monotonicNs() + (stage.tickInterval ?? 1_000_000_000)
                }
                flushAll()
                // End of stream.
                if inputsClosed && !drained {
                    drained = true
                    do { try stage.drain(context: self) } catch { handleStageError(error, envelope: nil) }
                    statsDirty = true
                }
                if drained && !finished {
                    flushAll()
                    // Under at-least-once a source ends only once everything it sent is acknowledged.
                    if queuesEmpty && deliverySettled {
                        for i in outLanes.indices { sendEOS(i) }
                        if outLanes.allSatisfy(\.eosSent) { finished = true; statsDirty = true }
                    }
                }
            }
            if finished { repeatEOS(monotonicNs()) }
            beatTCP(monotonicNs())
            if lanesWithGaps > 0 { settleGaps(monotonicNs()) }
            recreditTCP(monotonicNs())
            if statsDirty || monotonicNs() >= nextStats { sendStats() }
            if let pp = parentPid, getppid() != pp {
                log.error("host process \(pp) is gone; stopping")
                exitCode = 1
                break loop
            }
            if monotonicNs() - lastHostContact > 15_000_000_000 {
                log.error("no word from the host for 15 s; stopping")
                exitCode = 1
                break loop
            }
        }
        return failed == nil ? exitCode : 1
    }

    /// Takes every command the host has sent. FINISH and ABORT also stop delivery at once, even
    /// in the middle of a batch (a slow stage must not keep an abort waiting).
    func receiveCommands() {
        while let msg = try? control.receiveMessage(dontWait: true) {
            lastHostContact = monotonicNs()
            let cmd: RunnerCommand? = msg.withBytes { raw in
                guard let f = try? FrameView(raw), f.header.type == .command else { return nil }
                return try? f.command()
            }
            guard let cmd else { continue }
            if cmd.code == .abort || cmd.code == .finish { endPending = true }
            pendingCommands.append(cmd)
        }
    }

    func fail(_ reason: String) {
        failed = reason
        report("error", .string(reason))
        log.error("\(reason)")
        statsDirty = true
    }

    func handleStageError(_ error: any Error, envelope: Envelope?) {
        errors += 1
        if let se = error as? StageError {
            switch se.action {
            case .halt: fail(se.reason)
            case .deadLetter, .retry: if let e = envelope { deadLetter(e, reason: se.reason) }
            }
        } else if let e = envelope {
            deadLetter(e, reason: "\(error)")
        } else {
            log.warning("stage error: \(error)")
        }
    }

    func handleReturn(_ msg: ZMQMessage) {
        msg.withBytes { raw in
            guard let f = try? FrameView(raw), let li = outIndex[f.header.lane] else {
                errors += 1
                // From a worker's connection: refused and counted against it, like garbage on a data path.
                if let u = returnUser(msg) {
                    refuseRemoteFrame(u, lane: 0, "a \(raw.count)-byte message on a return path that is not a frame for one of its lanes")
                }
                return
            }
            guard peerAllowed(msg, lane: f.header.lane) else { return }
            if f.header.type == .credit, let (epoch, claimed) = try? f.credit() {
                // A CREDIT of an epoch already replaced (queued behind the new one on another
                // pipe) says nothing current: taking it would flip the lane back and forth.
                if outLanes[li].retiredEpochs.contains(epoch) { return }
                outLanes[li].hasCredit = true
                // An honest consumer never grants past what we sent in its epoch plus the bound.
                let ceiling = epoch == outLanes[li].epoch ? outLanes[li].sentInEpoch &+ UInt64(outLanes[li].bound) : UInt64(outLanes[li].bound)
                let limit = min(claimed, ceiling)
                if epoch != outLanes[li].epoch {
                    // The consumer (re)started: count from zero in its new epoch; resend EOS if we had ended.
                    // A consumer that restarts starts an epoch of its own (from its start time); one
                    // that saw this producer restart moves to epoch + 1, and may first send a
                    // CREDIT of the epoch before (queued for our predecessor): neither lost anything.
                    let restarted = delivery != nil && outLanes[li].epoch != 0 && epoch != outLanes[li].epoch &+ 1
                    if outLanes[li].epoch != 0 {
                        outLanes[li].retiredEpochs.append(outLanes[li].epoch)
                        if outLanes[li].retiredEpochs.count > 4 { outLanes[li].retiredEpochs.removeFirst() }
                    }
                    outLanes[li].epoch = epoch
                    outLanes[li].sentInEpoch = 0
                    outLanes[li].limit = limit
                    outLanes[li].sentFrames.removeAll(); outLanes[li].inFlightBytes = 0
                    // What the restarted consumer lost goes again under the new epoch's credits.
                    if restarted { consumerRestarted(li) }
                    if outLanes[li].eosSent { outLanes[li].eosSent = false; sendEOS(li) }
                } else if limit > outLanes[li].limit {
                    outLanes[li].limit = limit
                }
                if outLanes[li].bytesBound != nil {
                    // limit = received + bound: the frames up to `received` have left the lane.
                    let consumed = limit &- UInt64(outLanes[li].bound)
                    var k = 0
                    while k < outLanes[li].sentFrames.count, outLanes[li].sentFrames[k].count <= consumed {
                        outLanes[li].inFlightBytes -= outLanes[li].sentFrames[k].bytes; k += 1
                    }
                    if k > 0 { outLanes[li].sentFrames.removeFirst(k) }
                }
            } else if f.header.type == .ack {
                guard let dv = delivery else { return }
                do {
                    try f.forEachAckID(limit: Swift.max(limits.maxBatchEnvelopes, 4096)) { id in
                        dv.acksReceived += 1
                        if dv.acknowledge(lane: li, id: id) { walkLane(li) }
                    }
                } catch {
                    errors += 1
                    if let u = returnUser(msg) { refuseRemoteFrame(u, lane: f.header.lane, "a malformed ACK on lane \(f.header.lane) (\(error))"); return }
                    if errors <= 10 || errors % 1000 == 0 { log.warning("malformed ACK on lane \(outLanes[li].id): \(error) (\(errors) errors so far)") }
                }
            } else {
                errors += 1
                if let u = returnUser(msg) { refuseRemoteFrame(u, lane: f.header.lane, "a frame of type \(f.header.type) on the return path of lane \(f.header.lane)") }
            }
        }
    }

    /// The worker whose authenticated connection `msg` came in on (a runner in the host process), or nil.
    func returnUser(_ msg: ZMQMessage) -> String? { checkPeers ? msg.property("User-Id").flatMap { $0.isEmpty ? nil : $0 } : nil }

    func handleInput(_ msg: ZMQMessage) {
        // A frame from a remote worker's connection (ZAP named it): garbage from there is
        // refused and counted, never dead-lettered (a flood would otherwise fill the dead letters).
        let remoteUser = returnUser(msg)
        msg.withBytes { raw in
            let f: FrameView
            do { f = try FrameView(raw) } catch {
                errors += 1
                if let u = remoteUser { refuseRemoteFrame(u, lane: 0, "a malformed frame (\(error))"); return }
                deadLetter(Envelope(intent: "lane.malformed-frame", payload: Array(raw.prefix(65536))), reason: "malformed frame: \(error)")
                return
            }
            guard let li = inIndex[f.header.lane] else {
                errors += 1
                if let u = remoteUser { refuseRemoteFrame(u, lane: f.header.lane, "a frame for unknown lane \(f.header.lane)"); return }
                deadLetter(Envelope(intent: "lane.unknown-lane", payload: Array(raw.prefix(65536))), reason: "frame for unknown lane \(f.header.lane)")
                return
            }
            guard peerAllowed(user: remoteUser, lane: f.header.lane) else { return }
            // HANDOFF means something only on an in-process lane: refused elsewhere before it can
            // touch the lane's sequence or credit bookkeeping.
            if f.header.type == .handoff && (!inLanes[li].local || remoteUser != nil) {
                _ = takeHandoff(f, lane: li, remoteUser: remoteUser, raw: raw)
                return
            }
            // A remote producer may not send past the credits it was given (with slack for an
            // epoch change): what it floods beyond them is refused, not processed. On every tcp
            // lane, also in a remote consumer, whose producer may be another worker (a lane the
            // host relays) rather than the host.
            if remoteUser != nil || inLanes[li].tcp, f.header.type == .data || f.header.type == .handoff,
               inLanes[li].receivedInEpoch + UInt64(f.dataDeclaredCount) > inLanes[li].limitSent + 2 * UInt64(inLanes[li].bound) {
                refuseRemoteFrame(remoteUser ?? "the producer of lane \(f.header.lane)", lane: f.header.lane,
                                  "\(f.header.type) past its credits on lane \(f.header.lane)", fromWorker: remoteUser != nil)
                return
            }
            let incarnation = f.header.type == .heartbeat ? try? f.heartbeatTime() : nil
            // (A new incarnation refused below must not reset the lane's seqs and gaps either.)
            if inLanes[li].tcp, !(incarnation.map { incarnationTooSoon(li, $0, remote: remoteUser != nil) } ?? false) {
                noticeLoss(li, seq: f.header.seq, incarnation: incarnation)
            }
            switch f.header.type {
            case .data, .handoff:
                // A HANDOFF is taken only on a lane whose producer is in this process, and only when
                // it names a batch left for this lane: anything else is refused before any counter moves.
                var handed: [Envelope]?
                if f.header.type == .handoff {
                    guard let b = takeHandoff(f, lane: li, remoteUser: remoteUser, raw: raw) else { return }
                    handed = b
                }
                // The producer counted every envelope the frame declares; if the frame is broken
                // part-way, the rest are counted as received too, so its credits do not leak.
                let declared = f.dataDeclaredCount
                let t0 = monotonicNs()
                if let sent = f.dataSentNs, declared > 0 {
                    let now = wallNs()
                    inLanes[li].latency.record(ns: now > sent ? now - sent : 0, count: UInt64(declared))
                }
                var visited = 0
                var malformed: String? = nil
                defer {
                    let spent = monotonicNs() - t0
                    busyNs &+= spent
                    if visited > 0 { processing.record(ns: spent / UInt64(visited), count: UInt64(visited)) }
                }
                func take(_ result: Result<Envelope, DecodeError>, _ bytes: UnsafeRawBufferPointer, size: Int) {
                        // An abort (or finish) arrived mid-batch: deliver nothing more.
                        if endPending { return }
                        visited += 1
                        inLanes[li].received += 1; inLanes[li].receivedInEpoch += 1; received += 1
                        if inLanes[li].bytesBound != nil { inLanes[li].bytesSinceGrant += size }
                        switch result {
                        case .success(let e):
                            deliver(e, lane: li)
                            // A slow stage can spend seconds on one batch: keep its reports fresh,
                            // and return credits as soon as half a window is consumed, not at the
                            // end of the frame (or a full window would drain before the producer
                            // may send again).
                            if coarseMonotonicNs() >= nextStats {
                                sendStats()
                                receiveCommands()
                            }
                            if inLanes[li].receivedInEpoch + UInt64(inLanes[li].bound) >= inLanes[li].limitSent + UInt64(max(1, inLanes[li].bound / 2))
                                || inLanes[li].bytesBound.map({ inLanes[li].bytesSinceGrant * 2 >= $0 }) == true {
                                grantCredits(li, force: false)
                            }
                        case .failure(let err):
                            errors += 1
                            if malformed == nil { malformed = "\(err)" }
                            deadLetter(Envelope(intent: "lane.malformed-envelope", payload: Array(bytes.prefix(65536))),
                                       reason: "malformed envelope on lane \(inLanes[li].id) from \(inLanes[li].arrival.from): \(err)")
                        }
                }
                do {
                    if var handed {
                        let sized = inLanes[li].bytesBound != nil
                        // Reversed, then popped: each envelope moves out of the batch (no reference counting).
                        handed.reverse()
                        while let e = handed.popLast() {
                            take(.success(e), UnsafeRawBufferPointer(start: nil, count: 0), size: sized ? EnvelopeCodec.encodedSize(e) : 0)
                        }
                    } else {
                        try f.forEachEnvelope(limits: limits) { result, bytes in take(result, bytes, size: bytes.count) }
                    }
                } catch {
                    errors += 1
                    let missing = UInt64(max(0, min(declared, limits.maxBatchEnvelopes) - visited))
                    inLanes[li].received &+= missing; inLanes[li].receivedInEpoch &+= missing; received &+= missing
                    if inLanes[li].bytesBound != nil { inLanes[li].bytesSinceGrant += max(1, f.body.count) }
                    if malformed == nil { malformed = "\(error)" }
                    deadLetter(Envelope(intent: "lane.malformed-frame", payload: Array(raw.prefix(65536))),
                               reason: "malformed DATA frame on lane \(inLanes[li].id): \(error)")
                }
                // From a worker: dead-lettered as from anyone (nothing is lost), and one strike
                // against the worker per broken frame.
                if let u = remoteUser, let m = malformed {
                    refuseRemoteFrame(u, lane: f.header.lane, "a DATA frame on lane \(f.header.lane) holding what is not an envelope within the limits (\(m))")
                }
                // A byte-bounded lane: the producer frees bytes only for whole frames the credit
                // covers, so credit at the end of every frame that left bytes unreported.
                if inLanes[li].bytesBound != nil && inLanes[li].bytesSinceGrant > 0 { grantCredits(li, force: false) }
                // Return credits at half a window, so the producer refills while we work.
                if inLanes[li].receivedInEpoch + UInt64(inLanes[li].bound) >= inLanes[li].limitSent + UInt64(max(1, inLanes[li].bound / 2)) {
                    grantCredits(li, force: false)
                }
            case .endOfStream:
                // Nothing more will come to fill a gap: what is missing is lost (counted now,
                // before the stage ends).
                settleGap(li)
                inLanes[li].eos = true; statsDirty = true
            case .heartbeat:
                // A producer announcing itself: a new incarnation starts a new credit epoch.
                if let inc = incarnation, inLanes[li].producerIncarnation != inc {
                    let now = monotonicNs()
                    if let u = remoteUser, incarnationTooSoon(li, inc, remote: true) {
                        refuseRemoteFrame(u, lane: f.header.lane, "a new producer incarnation on lane \(f.header.lane) \((now &- inLanes[li].incarnationAt) / 1_000_000) ms after the last")
                        return
                    }
                    inLanes[li].incarnationAt = now
                    // A producer we have not seen: if this epoch already carried data (from an earlier
                    // producer incarnation), start a new epoch; either way, grant to it now.
                    if inLanes[li].producerIncarnation != nil || inLanes[li].receivedInEpoch > 0 {
                        inLanes[li].epoch &+= 1; if inLanes[li].epoch == 0 { inLanes[li].epoch = 1 }
                        inLanes[li].receivedInEpoch = 0; inLanes[li].eos = false
                    }
                    inLanes[li].producerIncarnation = inc
                    grantCredits(li, force: true)
                }
            default:
                errors += 1
                if let u = remoteUser { refuseRemoteFrame(u, lane: f.header.lane, "a frame of type \(f.header.type) on the data path of lane \(f.header.lane)") }
            }
        }
    }

    /// The batch a HANDOFF frame names, or nil when the frame is refused (counted, and
    /// dead-lettered or held against its worker): a lane whose producer is not in this process, a
    /// malformed body, or a token that names no batch left for this lane.
    func takeHandoff(_ f: FrameView, lane li: Int, remoteUser: String?, raw: UnsafeRawBufferPointer) -> [Envelope]? {
        let why: String
        if !inLanes[li].local || remoteUser != nil {
            why = "on lane \(f.header.lane), whose producer is not in this process"
        } else {
            do {
                let h = try f.handoff()
                if h.count <= limits.maxBatchEnvelopes,
                   let b = LocalHandoff.shared.take(h.token, context: handoffContext, lane: f.header.lane, count: h.count) { return b }
                why = "on lane \(f.header.lane) names no batch of \(h.count) left for it in this process"
            } catch { why = "on lane \(f.header.lane) is malformed: \(error)" }
        }
        errors += 1
        if let u = remoteUser { refuseRemoteFrame(u, lane: f.header.lane, "a HANDOFF frame \(why)"); return nil }
        deadLetter(Envelope(intent: "lane.malformed-frame", payload: Array(raw.prefix(65536))), reason: "refused a HANDOFF frame \(why)")
        return nil
    }

    func deliver(_ e: Envelope, lane li: Int) {
        guard let dv = delivery else { deliverToStage(e, lane: li); return }
        let id = e.id, attempt = e.attempt
        // A sink drops what it already has (a redelivery) and acknowledges it again. A first
        // attempt cannot be a redelivery: only later attempts are looked up.
        if isSink, let dd = dv.dedup, attempt > 1 ? dd.contains(id) : dd.seenLater(id) {
            dv.duplicates += 1
            dv.acksOut[li].append(id); dv.acksWaiting += 1
            return
        }
        // The token is made on the first emit (most sinks and filters never need one).
        dv.handling = true; dv.inputLane = Int32(li); dv.inputID = id
        dv.currentAttempt = attempt
        deliverToStage(e, lane: li)
        dv.handling = false
        dv.currentAttempt = dv.baseAttempt
        if isSink { dv.dedup?.add(id, later: attempt > 1) }
        let t = dv.current
        if t >= 0 {
            dv.current = -1
            dv.tokens[Int(t)].open = false
            if dv.tokens[Int(t)].pending == 0 { dv.complete(t) }
        } else {
            dv.acksOut[li].append(id); dv.acksWaiting += 1
        }
    }

    func deliverToStage(_ e: Envelope, lane li: Int) {
        if let max = inLanes[li].maxHops, e.hops > UInt32(clamping: max) {
            deadLetter(e, reason: "hop-limit: hops \(e.hops) > max_hops \(max) on loop-back lane from \(inLanes[li].arrival.from)")
            return
        }
        // The stage takes the envelope; a copy is kept only for the rare retry or dead letter,
        // which the stage may need once it has given the envelope away (COW: no bytes copied).
        var attempt = 0
        // `e` stays held until the stage returns, so a change by the stage moves the envelope to
        // a new storage box: the same identity at emit means it was passed on unchanged.
        handlingInput = e.storageIdentity
        defer { handlingInput = nil }
        while true {
            do { try stage.process(e, from: inLanes[li].arrival, context: self); return }
            catch let se as StageError where se.action == .retry && attempt < 3 { attempt += 1 }
            catch { handleStageError(error, envelope: e); return }
        }
    }

    /// Sends a CREDIT when enough was consumed (or `force`): limit = received in epoch + bound.
    /// A tcp connection that drops takes the frames queued on it along. A gap in the producer's
    /// frame seqs shows it: the consumer then starts a fresh credit epoch, as a restarted consumer
    /// would, so credits do not leak away (and under at-least-once the producer sends again what
    /// it had outstanding on the lane). A producer's new incarnation (HEARTBEAT) starts over at 1.
    ///
    /// A gap is acted on once it has lasted ``gapGraceNs``, for every frame missing by then: a
    /// connection that dies slowly (its peer reconnected while the reset of the old one is still
    /// on its way) takes every other frame of a PUSH that round-robins onto it, and a new epoch
    /// per gap made the producer send the lane's unacknowledged envelopes again for each one
    /// (17 times in one second, measured, until they ran out of attempts and were dead-lettered).
    func noticeLoss(_ li: Int, seq: UInt64, incarnation: UInt64?) {
        let last = inLanes[li].lastSeq
        if let inc = incarnation, inc != inLanes[li].producerIncarnation {
            // A new incarnation starts over (and a new epoch of its own): earlier gaps are moot.
            inLanes[li].lastSeq = seq
            clearGap(li)
            return
        }
        defer { inLanes[li].lastSeq = Swift.max(last, seq) }
        guard seq > last &+ 1 else {
            // A frame that was missing arrived after all (reordered, not lost).
            if seq < last, inLanes[li].gapSince != nil, inLanes[li].missing.remove(seq) != nil,
               inLanes[li].missing.isEmpty, inLanes[li].untrackedMissing == 0 { clearGap(li) }
            return
        }
        if last == 0 {
            // Our first frame on the lane (a new runner): what came before it was the producer's
            // history with an earlier consumer, not a loss; a new epoch all the same, in case
            // frames sent on our own credits went down before this one.
            log.info("lane \(inLanes[li].id) from \(inLanes[li].arrival.from): first frame has seq \(seq); new credit epoch")
            freshEpoch(li)
            return
        }
        let gap = seq - last - 1
        if gap <= UInt64(Self.maxTrackedGap - inLanes[li].missing.count) {
            for s in (last + 1)..<seq { inLanes[li].missing.insert(s) }
        } else {
            inLanes[li].untrackedMissing &+= gap
        }
        if inLanes[li].gapSince == nil { inLanes[li].gapSince = monotonicNs(); lanesWithGaps += 1 }
    }

    /// Most missing seqs remembered per lane (a larger loss is only counted).
    static let maxTrackedGap = 65_536

    /// A worker's producer restarts in seconds, not many times a second: a new incarnation from
    /// a remote worker sooner than 1 s after the last would only reset its credits (refused).
    func incarnationTooSoon(_ li: Int, _ inc: UInt64, remote: Bool) -> Bool {
        remote && inLanes[li].producerIncarnation != nil && inLanes[li].producerIncarnation != inc
            && monotonicNs() &- inLanes[li].incarnationAt < 1_000_000_000
    }

    /// How long seqs must have been missing before the consumer takes them for lost.
    static let gapGraceNs: UInt64 = 1_000_000_000

    /// Lanes whose gaps have lasted ``gapGraceNs``: one loss for all their missing frames, and a
    /// fresh credit epoch (the producer sends again what it had outstanding, once).
    func settleGaps(_ now: UInt64) {
        for li in inLanes.indices {
            guard let since = inLanes[li].gapSince, now &- since >= Self.gapGraceNs else { continue }
            settleGap(li)
        }
    }

    /// Takes lane `li`'s missing frames for lost now: counted, logged, and a fresh epoch.
    func settleGap(_ li: Int) {
        guard inLanes[li].gapSince != nil else { return }
        let lost = UInt64(inLanes[li].missing.count) &+ inLanes[li].untrackedMissing
        clearGap(li)
        lostFrames &+= lost
        report("lost_frames", .int(Int64(clamping: lostFrames)))
        log.warning("lane \(inLanes[li].id) from \(inLanes[li].arrival.from): \(lost) frame(s) lost in transit (a dropped connection); new credit epoch")
        freshEpoch(li)
    }

    func clearGap(_ li: Int) {
        if inLanes[li].gapSince != nil { lanesWithGaps -= 1 }
        inLanes[li].gapSince = nil
        inLanes[li].missing.removeAll()
        inLanes[li].untrackedMissing = 0
    }

    /// A fresh credit epoch, as a restarted consumer would start (not the current one + 1, which
    /// answers a producer's restart).
    func freshEpoch(_ li: Int) {
        var fresh = UInt32(truncatingIfNeeded: wallNs() / 1000) | 1
        if fresh == inLanes[li].epoch || fresh == inLanes[li].epoch &+ 1 { fresh &+= 2 }
        inLanes[li].epoch = fresh
        inLanes[li].receivedInEpoch = 0
        grantCredits(li, force: true)
    }

    func grantCredits(_ i: Int, force: Bool) {
        let limit = inLanes[i].receivedInEpoch + UInt64(inLanes[i].bound)
        guard force || limit > inLanes[i].limitSent else { return }
        inLanes[i].limitSent = limit
        inLanes[i].bytesSinceGrant = 0
        inLanes[i].seq += 1
        inLanes[i].creditAt = monotonicNs()
        _ = try? inLanes[i].ret.send(FrameEncoder.credit(lane: inLanes[i].id, seq: inLanes[i].seq, epoch: inLanes[i].epoch, limit: limit), dontWait: true)
    }

    /// tcp lanes: the current CREDIT again every second until the run ends (also after EOS: a
    /// redelivery may still need credit). A CREDIT is cumulative, so a repeat is harmless, and it
    /// is what a producer gets when the first one found no connection yet (a bound return socket
    /// refuses a frame before its peer connects) or was lost with one.
    func recreditTCP(_ now: UInt64) {
        for i in inLanes.indices where inLanes[i].tcp && now &- inLanes[i].creditAt > 1_000_000_000 {
            grantCredits(i, force: true)
        }
    }

    func flushAll() {
        flushAudit()
        if let dv = delivery {
            dv.clock = coarseMonotonicNs()
            if dv.rootsEmptied { dv.rootsEmptied = false; statsDirty = true }
            walkLanesIfDue(dv.clock)
            settleSpillRows()
            // Spilled envelopes count as delivered: on disk before anything acknowledges them
            // (while a spill write fails, nothing is acknowledged).
            for i in outLanes.indices where outLanes[i].spill != nil { commitSpill(i) }
            settleDelivery(acknowledge: !outLanes.contains(where: { $0.spillFailing }))
        }
        let t = monotonicNs()
        let accepting = canAccept, inputsOpen = source == nil && !nonLoopInputsEnded
        for i in outLanes.indices {
            flush(i)
            commitSpill(i)
            // Blocked time: the lane has work queued (or spilled) but may not send; for a source,
            // a lane without credit is the pressure that reached it (it produces only to credit);
            // for a transform, a full lane that keeps it from taking input is that pressure too
            // (its queue is empty then: it takes input only when it has room to emit).
            let sourceWaiting = source != nil && !exhausted && !outLanes[i].loopBack && outLanes[i].hasCredit
            let inputHeldBack = inputsOpen && !accepting && !outLanes[i].loopBack && outLanes[i].whenFull == .block && !outLanes[i].writable
            let headWaits = outLanes[i].bytesBound.map { b in
                !outLanes[i].queue.isEmpty && outLanes[i].inFlightBytes > 0 && outLanes[i].inFlightBytes + EnvelopeCodec.encodedSize(outLanes[i].queue.peek(0)) > b
            } ?? false
            let blocked = (!outLanes[i].queue.isEmpty || !(outLanes[i].spill?.isEmpty ?? true) || sourceWaiting) && (!outLanes[i].canSend || headWaits)
                || inputHeldBack
            if blocked, outLanes[i].blockedSince == nil { outLanes[i].blockedSince = t }
            if !blocked, let s = outLanes[i].blockedSince { outLanes[i].blockedNs += t - s; outLanes[i].blockedSince = nil }
        }
    }

    /// Writes a spill lane's buffered envelopes to disk; if that fails (disk full, permissions),
    /// the lane holds them in memory and blocks its producer like `block` until writing works.
    func commitSpill(_ i: Int) {
        guard let sp = outLanes[i].spill else { return }
        if let e = sp.commit() {
            if !outLanes[i].spillFailing {
                outLanes[i].spillFailing = true
                log.error("lane \(outLanes[i].id) to \(outLanes[i].to): spill write failed (\(e)); holding envelopes in memory and blocking until it works")
                audit(AuditRecord(decision: "spill-failed", reason: "lane \(outLanes[i].id) to \(outLanes[i].to): \(e)"))
            }
        } else if outLanes[i].spillFailing {
            outLanes[i].spillFailing = false
            log.info("lane \(outLanes[i].id) to \(outLanes[i].to): spilling works again")
        }
    }

    /// Moves envelopes from the head of the lane's spill queue into its send queue, as many as
    /// it may send now.
    func refillFromSpill(_ i: Int) {
        // After EOS (a stop left the spill for the next run) nothing more may go out on the lane.
        guard let sp = outLanes[i].spill, !sp.isEmpty, outLanes[i].queue.isEmpty, outLanes[i].canSend, !outLanes[i].eosSent else { return }
        // Tracked (at-least-once), a stop reads nothing more back: a read-back row would have to
        // be acknowledged before the stage may end, and the stop leaves the spill for the next run.
        if sp.tracked && stopRequested { return }
        let rows: [SpillQueue.Row]
        do { rows = try sp.take(min(outLanes[i].credits, limits.maxBatchEnvelopes)) } catch {
            if !outLanes[i].spillFailing { log.error("lane \(outLanes[i].id): cannot read its spill queue: \(error)") }
            outLanes[i].spillFailing = true
            return
        }
        for r in rows {
            do {
                var e = try r.bytes.withUnsafeBytes { (b: UnsafeRawBufferPointer) throws(DecodeError) -> Envelope in try EnvelopeCodec.decode(b, limits: limits) }
                if outLanes[i].bytesBound != nil { outLanes[i].queueBytes += r.bytes.count }
                if sp.tracked, let dv = delivery {
                    // At-least-once: the spilling stage delivers what it reads back. The row stays
                    // until the copy is acknowledged; a root of this runner sends it again (on
                    // this lane only) when it is lost. A row an earlier run may have delivered
                    // goes as a redelivery, so that sinks look it up.
                    if r.replay { e.attempt &+= 1 }
                    let t = dv.newToken(inLane: -1, id: e.id)
                    dv.setRoot(t, DeliveryState.Root(envelope: e, output: outLanes[i].output, rowid: 0, deadline: dv.clock &+ dv.timeoutNs,
                                                     born: dv.tokens[Int(t)].gen, lane: Int32(i), spillSeq: r.seq))
                    dv.register(lane: i, id: e.id, token: t, at: dv.clock)
                    dv.tokens[Int(t)].open = false
                }
                outLanes[i].queue.append(e)
            } catch {
                deadLetter(Envelope(intent: "lane.spill-corrupt", payload: Array(r.bytes.prefix(65536))),
                           reason: "lane \(outLanes[i].id) to \(outLanes[i].to): spilled envelope does not decode: \(error)")
                sp.done(r.seq)
            }
        }
    }

    /// At-least-once: root `t`, a copy read back from spill lane `li` and lost, goes again on that
    /// lane, straight into its queue: it is older than anything still spilled (and there are at
    /// most about a lane bound of them), so it goes before the rest of the spill, not behind it
    /// (where a sink's dedup window might no longer know it).
    func resendOnSpillLane(_ li: Int, _ envelope: Envelope, token t: Int32) {
        guard let dv = delivery else { return }
        if outLanes[li].bytesBound != nil { outLanes[li].queueBytes += EnvelopeCodec.encodedSize(envelope) }
        dv.register(lane: li, id: envelope.id, token: t, at: dv.clock)
        outLanes[li].queue.append(envelope)
    }

    func flush(_ i: Int) {
        if delivery?.journalBroken == true { return }
        refillFromSpill(i)
        let local = outLanes[i].local
        while !outLanes[i].queue.isEmpty && outLanes[i].canSend {
            var n = min(outLanes[i].queue.count, outLanes[i].credits, limits.maxBatchEnvelopes)
            // Keep frames near 1 MiB at most: big envelopes travel in smaller batches; under a byte
            // bound, only what fits (at least one envelope when nothing is in flight). A handoff
            // carries references, so only a byte bound needs the sizes there.
            let byteRoom = outLanes[i].bytesBound.map { $0 - outLanes[i].inFlightBytes } ?? Int.max
            var bytes = 0, fit = 0
            if local && outLanes[i].bytesBound == nil { fit = n }
            while fit < n {
                let size = EnvelopeCodec.encodedSize(outLanes[i].queue.peek(fit)) + 4
                if fit > 0 && ((!local && bytes + size > WireLimits.frameEnvelopeBytes) || bytes + size > byteRoom) { break }
                if fit == 0 && size > byteRoom && outLanes[i].inFlightBytes > 0 { break }
                bytes += size; fit += 1
            }
            if fit == 0 { return }
            n = fit
            let taken = n
            let lane = outLanes[i].id, seq = outLanes[i].seq + 1
            let socket = outLanes[i].socket
            let sentNs = wallNs()
            let ok: Bool
            if local {
                ok = handOff(i, taken, lane: lane, seq: seq, sentNs: sentNs)
            } else {
                ok = outLanes[i].queue.withFirst(n) { envs in
                    let sent = (try? socket.send(count: DataFrameBuilder.size(of: envs), dontWait: true) { buf in
                        if let base = buf.baseAddress { DataFrameBuilder.write(lane: lane, seq: seq, sentNs: sentNs, envelopes: envs, into: base) }
                    }) ?? false
                    if sent && !tapped.isEmpty && tapped.contains(lane) { tap(lane, envs) }
                    return sent
                }
                if ok { outLanes[i].queue.removeFirst(taken) }
            }
            guard ok else { return }
            outLanes[i].seq += 1
            outLanes[i].frames += 1
            outLanes[i].sentInEpoch += UInt64(taken)
            outLanes[i].transmitted += UInt64(taken)
            if outLanes[i].bytesBound != nil {
                let payload = bytes - 4 * taken
                outLanes[i].queueBytes -= payload
                outLanes[i].inFlightBytes += payload
                outLanes[i].sentFrames.append((outLanes[i].sentInEpoch, payload))
            }
            if outLanes[i].queue.isEmpty { refillFromSpill(i) }
        }
    }

    /// Sends the first `n` queued envelopes of in-process lane `i` as one batch: moved out of the
    /// queue into the process's handoff table, its token sent in a HANDOFF frame. False (and the
    /// batch back at the head of the queue) when ZeroMQ did not take the frame.
    func handOff(_ i: Int, _ n: Int, lane: UInt32, seq: UInt64, sentNs: UInt64) -> Bool {
        let envs = outLanes[i].queue.takeFirst(n)
        let count = envs.count
        let tapCopy = !tapped.isEmpty && tapped.contains(lane) ? envs : nil
        let token = LocalHandoff.shared.put(consume envs, context: handoffContext, lane: lane)
        let frame = FrameEncoder.handoff(lane: lane, seq: seq, sentNs: sentNs, count: count, token: token)
        if (try? outLanes[i].socket.send(frame, dontWait: true)) == true {
            tapCopy?.withUnsafeBufferPointer { tap(lane, $0) }
            return true
        }
        if let back = LocalHandoff.shared.take(token, context: handoffContext, lane: lane, count: count) { outLanes[i].queue.putBack(back) }
        return false
    }

    /// Publishes copies of envelopes just sent on a tapped lane: one message per frame (a DATA
    /// frame body: count, then length-prefixed envelopes) of at most 16 envelopes, at most
    /// `tapRate` envelopes per second, never blocking (XPUB drops for a slow reader).
    func tap(_ lane: UInt32, _ envs: UnsafeBufferPointer<Envelope>) {
        guard let ts = tapSocket else { return }
        let now = monotonicNs()
        var w = tapWindow[lane] ?? (now, 0)
        if now - w.start >= 1_000_000_000 { w = (now, 0) }
        let n = min(envs.count, Self.tapRate - w.sent, 16)
        guard n > 0 else { return }
        let topic: [UInt8] = [UInt8(lane >> 24), UInt8(truncatingIfNeeded: lane >> 16), UInt8(truncatingIfNeeded: lane >> 8), UInt8(truncatingIfNeeded: lane)]
        let frame = DataFrameBuilder.build(lane: lane, seq: 0, sentNs: wallNs(), envelopes: UnsafeBufferPointer(rebasing: envs[0..<n]))
        if (try? ts.send(parts: [topic, frame], dontWait: true)) == true { w.sent += n }
        tapWindow[lane] = w
    }

    /// A HEARTBEAT carrying this producer's incarnation. Its seq is used only when ZeroMQ took
    /// the frame (a bound socket with no peer yet refuses it), so a consumer sees gaps only
    /// where frames were really lost.
    func beat(_ i: Int) {
        let next = outLanes[i].seq + 1
        if (try? outLanes[i].socket.send(FrameEncoder.heartbeat(lane: outLanes[i].id, seq: next, timeNs: incarnation), dontWait: true)) == true {
            outLanes[i].seq = next
        }
        outLanes[i].beatAt = monotonicNs()
    }

    /// tcp lanes: a HEARTBEAT every second. After a dropped connection took a window of frames
    /// along, it is what shows the consumer the gap (a producer out of credits sends nothing else).
    func beatTCP(_ now: UInt64) {
        for i in outLanes.indices where outLanes[i].tcp && now &- outLanes[i].beatAt > 1_000_000_000 { beat(i) }
    }

    /// Once finished: a lane whose EOS has not gone out (refused by a full or unconnected
    /// socket, or owed again to a new epoch) tries again on every pass; on tcp lanes EOS goes
    /// again once a second after the first (see OutLane.tcp).
    func repeatEOS(_ now: UInt64) {
        for i in outLanes.indices {
            if !outLanes[i].eosSent { sendEOS(i) }
            else if outLanes[i].tcp && now &- outLanes[i].eosAt > 1_000_000_000 { _ = transmitEOS(i) }
        }
    }

    func sendEOS(_ i: Int) {
        guard !outLanes[i].eosSent else { return }
        if transmitEOS(i) { outLanes[i].eosSent = true }
    }

    /// One EOS frame; its seq is taken only when ZeroMQ accepted it.
    func transmitEOS(_ i: Int) -> Bool {
        let next = outLanes[i].seq + 1
        guard (try? outLanes[i].socket.send(FrameEncoder.endOfStream(lane: outLanes[i].id, seq: next, total: outLanes[i].transmitted), dontWait: true)) == true else {
            return false
        }
        outLanes[i].seq = next
        outLanes[i].eosAt = monotonicNs()
        return true
    }

    func sendStats() {
        flushAudit()
        statsDirty = false
        nextStats = monotonicNs() + UInt64(a.statsIntervalMs) * 1_000_000
        var flags: StatsReport.Flags = []
        if idle && failed == nil { flags.insert(.idle) }
        if exhausted { flags.insert(.exhausted) }
        if finished { flags.insert(.finished) }
        if awaitingLoopClose { flags.insert(.awaitingLoopClose) }
        if failed != nil { flags.insert(.failed) }
        let t = monotonicNs()
        var lanes: [LaneEndStats] = []
        for l in outLanes {
            let blocked = l.blockedNs + (l.blockedSince.map { t - $0 } ?? 0)
            lanes.append(LaneEndStats(lane: l.id, role: .producer, count: l.transmitted, credits: UInt32(clamping: max(0, l.credits)),
                                      queued: UInt32(clamping: l.queue.count), endOfStream: l.eosSent, blockedNs: blocked,
                                      dropped: l.dropped, spilled: l.spill?.written ?? 0, spillDepth: UInt32(clamping: l.spill?.count ?? 0),
                                      epoch: l.epoch, countInEpoch: l.sentInEpoch))
        }
        for l in inLanes {
            lanes.append(LaneEndStats(lane: l.id, role: .consumer, count: l.received,
                                      credits: UInt32(clamping: max(0, Int64(l.limitSent) - Int64(l.receivedInEpoch))), queued: 0, endOfStream: l.eos,
                                      latency: l.latency, epoch: l.epoch, countInEpoch: l.receivedInEpoch))
        }
        var st = status
        for (k, v) in metrics.sorted(by: { $0.key < $1.key }) { st.append(("metric.\(k)", .int(Int64(v)))) }
        for l in outLanes where l.frames > 0 { st.append(("batch.lane\(l.id)", .double((Double(l.transmitted) / Double(l.frames) * 10).rounded() / 10))) }
        deliveryStatus(&st)
        st.append(("pid", .int(Int64(getpid()))))
        let r = StatsReport(stage: a.stage, timeNs: wallNs(), flags: flags, received: received, emitted: emitted, deadLettered: deadLettered,
                            errors: errors, held: UInt32(clamping: stage.heldCount), busyNs: busyNs, processing: processing, lanes: lanes, status: st)
        controlSeq += 1
        _ = try? control.send(r.encode(seq: controlSeq), dontWait: true)
    }

    /// Read-back copies acknowledged: their rows go with the next spill commit.
    func settleSpillRows() {
        guard let dv = delivery, !dv.spillDone.isEmpty else { return }
        for d in dv.spillDone { outLanes[Int(d.lane)].spill?.done(d.seq) }
        dv.spillDone.removeAll(keepingCapacity: true)
    }

    func teardown() {
        settleSpillRows()
        for i in outLanes.indices { commitSpill(i) }
        stage.stop()
        handshakes.stop()
        for l in outLanes { l.socket.close() }
        for l in inLanes { l.ret.close() }
        inSocket?.close(); retSocket?.close(); tapSocket?.close()
        // Batches handed to this runner and never taken (it stopped before reading them).
        let local = Set(inLanes.filter(\.local).map(\.id))
        if !local.isEmpty { LocalHandoff.shared.discard(context: handoffContext, lanes: local) }
        if !a.tapEndpoint.isEmpty, a.tapEndpoint.hasPrefix("ipc://") { unlink(String(a.tapEndpoint.dropFirst(6))) }
        kv = nil
    }
}


/// A CURVE key pair in Z85.
public struct CurveKeyPair: Sendable, Equatable {
    public var publicKey: String
    public var secretKey: String
    public init(publicKey: String, secretKey: String) { self.publicKey = publicKey; self.secretKey = secretKey }
}

/// Binds and connects a runner's sockets: ipc/inproc as they are; tcp with CURVE (the host side
/// is the server, a remote worker the client) or plaintext when the pipeline says `insecure`.
struct TCPLinks {
    let security: TCPSecurity?
    let clientKeys: CurveKeyPair?

    /// tcp options of every link: keepalive-style ZeroMQ heartbeats, so a vanished peer is noticed.
    static func prepare(_ s: ZMQSocket) throws {
        try s.setInt(75, 1000)   // ZMQ_HEARTBEAT_IVL
        try s.setInt(77, 5000)   // ZMQ_HEARTBEAT_TIMEOUT
        try s.setInt(76, 10_000) // ZMQ_HEARTBEAT_TTL
        // ZMQ_TCP_MAXRT (TCP_USER_TIMEOUT): a connection whose data goes unacknowledged for 5 s
        // is closed by the kernel. ZeroMQ's heartbeat timeout starts only once a PING is sent,
        // which waits for an empty output buffer, so without it a connection that filled its
        // send buffer during a link cut outlived the cut, and a PUSH round-robined every other
        // frame onto it after the link came back (until TCP's next retransmission found the
        // peer's reset). Receivers read eagerly (credits bound what is in flight), so a healthy
        // connection never holds unacknowledged data that long.
        try s.setInt(80, 5000)
    }

    func bind(_ s: ZMQSocket, _ e: String) throws {
        guard e.hasPrefix("tcp://") else { try RunnerCore.prepareIPC(e); try s.bind(e); RunnerCore.restrict(e); return }
        guard let t = security else { throw RuntimeError.plan("tcp endpoint \(e) without tcp security settings") }
        try Self.prepare(s)
        if t.curve {
            guard let secret = t.serverSecretKey else { throw RuntimeError.plan("tcp bind \(e) needs the host's CURVE secret key") }
            guard let port = TCPSecurity.port(of: e) else { throw RuntimeError.plan("tcp bind \(e): no port") }
            try s.makeCurveServer(secretKey: secret, domain: TCPSecurity.zapDomain(port: port))
        }
        try s.bind(e)
    }

    func connect(_ s: ZMQSocket, _ e: String) throws {
        guard e.hasPrefix("tcp://") else { try s.connect(e); return }
        guard let t = security else { throw RuntimeError.plan("tcp endpoint \(e) without tcp security settings") }
        try Self.prepare(s)
        if t.curve {
            guard let k = clientKeys else { throw RuntimeError.plan("tcp connect \(e) needs this worker's CURVE key pair") }
            try s.makeCurveClient(publicKey: k.publicKey, secretKey: k.secretKey, serverKey: t.serverPublicKey)
        }
        try s.connect(e)
    }
}
