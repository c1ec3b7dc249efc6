import Foundation
import Glibc
import Logging
import PipeAudit
import PipeConfig
import PipeKit
import PipeZMQ
import Synchronization

/// Set by SIGINT/SIGTERM handlers; read by the host loop.
let signalStop = Atomic<Int32>(0)

/// Options of one `pipehost run`.
public struct HostOptions: Sendable {
    public var runDirectory: String
    /// Stop sources after this many seconds without lane activity (nil: never).
    public var untilIdleSeconds: Double?
    /// Each source stops after emitting this many envelopes (nil: never); enforced by its runner, exactly.
    public var maxEnvelopes: UInt64?
    /// The executable spawned for `placement: process` workers (`pipehost worker ...`).
    public var workerExecutable: String
    /// Most restarts of one worker before the pipeline fails.
    public var maxRestarts: Int
    /// How often runners report STATS (the freshness of pipectl, metrics and lane states).
    public var statsIntervalMs: Int = 100
    /// In-process lanes hand batches over by reference (HANDOFF); false encodes them as DATA
    /// frames, as lanes between processes do (`pipehost run --inproc-data-frames`).
    public var inprocByReference = true
    public init(runDirectory: String, untilIdleSeconds: Double? = nil, maxEnvelopes: UInt64? = nil,
                workerExecutable: String = "/proc/self/exe", maxRestarts: Int = 5) {
        self.runDirectory = runDirectory; self.untilIdleSeconds = untilIdleSeconds; self.maxEnvelopes = maxEnvelopes
        self.workerExecutable = workerExecutable; self.maxRestarts = maxRestarts
    }
}

/// What a finished run reports.
public struct RunSummary: Sendable {
    public var pipeline: String
    public var elapsedSeconds: Double
    public var stages: [StageView]
    public var lanes: [LaneView]
    public var failure: String?
}

/// One stage as the host sees it (for `pipectl status` and the summary).
public struct StageView: Sendable {
    public var id: String
    public var kind: String
    public var placement: String
    public var pid: Int32?
    public var state: String
    public var received: UInt64
    public var emitted: UInt64
    public var deadLettered: UInt64
    public var errors: UInt64
    public var restarts: Int
    public var status: [(String, AttrValue)]
    /// Envelopes per second in and out, and the share of time in stage code, over the last second.
    public var rateIn: Double = 0
    public var rateOut: Double = 0
    public var busyFraction: Double = 0
    /// Wall time (ns) of the runner report these figures come from.
    public var reportNs: UInt64 = 0
}

/// One lane as the host sees it (for `pipectl lanes` and the summary).
public struct LaneView: Sendable {
    public var id: UInt32
    public var from: String
    public var to: String
    public var transport: String
    public var bound: Int
    public var bytesBound: Int?
    public var whenFull: String
    public var loopBack: Bool
    public var sent: UInt64
    public var received: UInt64
    public var queued: UInt64
    public var credits: UInt64
    public var endOfStream: Bool
    public var blockedNs: UInt64
    public var dropped: UInt64 = 0
    public var spilled: UInt64 = 0
    public var spillDepth: UInt64 = 0
    /// Watermark state and marks (CONCEPTS.md, "backpressure watermarks").
    public var state: PressureState = .normal
    public var low: Int = 0
    public var high: Int = 0
    public var release: Int = 0
    /// Envelopes per second into the lane (producer) and out of it (consumer), over the last second.
    public var rateIn: Double = 0
    public var rateOut: Double = 0
    /// Lane latency (DATA frame sent -> taken by the consumer).
    public var latency = DurationHistogram()
    /// The producer's tap endpoint (`pipectl tap`).
    public var tap: String = ""
    /// Whether an end of the lane is a remote stage whose worker is absent or silent.
    public var down = false
    /// For a tcp lane: the host-side endpoint its data crosses (what the remote end connects to or sends to).
    public var endpoint = ""
    /// A lane the host relays (no end in the host process): what the relay is doing
    /// ("forwarding", or what it waits for); nil for every other lane.
    public var relay: String?
    /// Share of the last second the producer was blocked on this lane.
    public var blockedFraction: Double = 0
    /// Wall times (ns) of the producer's and the consumer's reports behind `sent` and `received`.
    public var sentReportNs: UInt64 = 0
    public var receivedReportNs: UInt64 = 0
    /// The host's estimate (see LaneMonitor), when both ends have reported.
    public var estimatedDepth: Int64?
    /// Envelopes in flight (sent, not yet taken, at most the bound) plus those waiting in the
    /// sender queue and the spill queue. The two ends report at different moments; the estimate carries each count to
    /// the newer report's time (see LaneMonitor). Before both reported: the raw difference.
    public var depth: Int64 {
        estimatedDepth ?? (min(Int64(bound), max(0, inFlightCount.map(Int64.init(clamping:)) ?? (Int64(clamping: sent) - Int64(clamping: received))))
                           + Int64(clamping: queued) + Int64(clamping: spillDepth))
    }
    /// Sent minus taken within the credit epoch both ends report (nil when they differ): unlike
    /// `sent - received`, it does not keep what a dead incarnation lost or never reported.
    public var inFlightCount: Int64?
}

/// The host: plans a pipeline, runs its stages as threads and worker processes, supervises them,
/// decides end-of-stream for loops, serves the control endpoint, and drains on SIGINT/SIGTERM.
public final class PipelineHost: @unchecked Sendable {
    // @unchecked: all mutable state is confined to the thread that calls `run()`.
    struct StageState {
        var plan: PipelinePlan.PlannedStage
        var stats: StatsReport?
        /// Counters of earlier incarnations (a restarted worker counts from zero).
        var base: StatsReport?
        var pid: Int32?
        var restarts = 0
        var assigned = false
        var childExited = false
        /// When this incarnation was started (thread start or spawn), for the 30 s start rule.
        var startedNs: UInt64 = 0
    }

    public let plan: PipelinePlan
    let registry: StageRegistry
    let options: HostOptions
    var log = Logger(label: "pipehost")
    let zmq: ZMQContext
    let runTag: String
    var stages: [String: StageState] = [:]
    var order: [String] = []
    var threads: [Thread] = []
    let threadsDone = Counter()
    var runnerRouter: ZMQSocket?
    var controlRouter: ZMQSocket?
    var auditWriter: AuditWriter?
    var auditCount = 0
    var auditPath = ""
    var lastAuditCheck: UInt64 = 0
    var lastAuditError: String?
    var finalAudit: AuditWriter.Stats?
    var startNs: UInt64 = 0
    var stopping = false
    var shuttingDown = false
    var stopReason = ""
    var failure: String?
    var loopChecks: [String: (vector: [UInt64], time: UInt64)] = [:]
    var lastActivity: (vector: [UInt64], time: UInt64) = ([], 0)
    var subscribers: [[UInt8]: (interval: UInt64, next: UInt64, lastSeen: UInt64)] = [:]
    var laneMonitors: [UInt32: LaneMonitor] = [:]
    var metricsServer: MetricsServer?
    var lastMetricsRender: UInt64 = 0
    /// Per stage: received, emitted and busy nanoseconds, as rates.
    var stageRates: [String: (RateMeter, RateMeter, RateMeter)] = [:]
    var lastHeartbeat: UInt64 = 0
    var signalsAtStop: Int32 = 0
    var controlSeq: UInt64 = 0
    /// Remote workers (nil when every stage runs on this host).
    var remote: RemoteHost?

    public init(plan: PipelinePlan, registry: StageRegistry, options: HostOptions) throws(RuntimeError) {
        self.plan = plan; self.registry = registry; self.options = options
        do { zmq = try ZMQContext(ioThreads: 1) } catch { throw .io("cannot create ZeroMQ context: \(error)") }
        runTag = "pipe-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        for s in plan.stages { stages[s.id] = StageState(plan: s); order.append(s.id) }
        for l in plan.lanes { laneMonitors[l.id] = LaneMonitor(settings: l.settings) }
    }

    var runnerEndpointIPC: String { "ipc://\(options.runDirectory)/runners.sock" }
    var runnerEndpointInproc: String { "inproc://\(runTag)/runners" }

    /// Runs the pipeline to completion (or until stopped). Returns the summary.
    public func run() throws(RuntimeError) -> RunSummary {
        let dir = options.runDirectory
        try RunDirectory.create(dir)
        try RunDirectory.create(dir + "/sock")
        try? "\(getpid())\n".write(toFile: dir + "/host.pid", atomically: true, encoding: .utf8)
        try? "\(plan.spec.name)\n\(plan.spec.file)\n".write(toFile: dir + "/pipeline", atomically: true, encoding: .utf8)
        try openAuditLog(dir)
        // Every way out of run() closes the log (drains it, signs the final checkpoint);
        // shutdown() does it first on the normal path.
        defer { closeAuditLog() }
        installSignalHandlers()
        do {
            let rr = try zmq.socket(.router)
            try rr.setInt(ZMQ_ROUTER_HANDOVER_OPT, 1)
            try rr.setRouterMandatory(false)
            try rr.setReceiveHWM(0); try rr.setSendHWM(0)
            try rr.bind(runnerEndpointInproc)
            if plan.stages.contains(where: { $0.placement != .inProcess }) {
                try RunnerCore.prepareIPC(runnerEndpointIPC)
                try rr.bind(runnerEndpointIPC); RunnerCore.restrict(runnerEndpointIPC)
            }
            runnerRouter = rr
            let cr = try zmq.socket(.router)
            let ce = RunDirectory.controlEndpoint(dir)
            try RunnerCore.prepareIPC(ce)
            try cr.bind(ce); RunnerCore.restrict(ce)
            controlRouter = cr
        } catch let e as ZMQError {
            throw .io("cannot bind host endpoints in \(dir): \(e)")
        } catch {
            throw .io("cannot bind host endpoints in \(dir): \(error)")
        }
        startNs = monotonicNs()
        try openRemote()
        defer { closeRemote() }
        try startMetrics()
        for id in order {
            guard let st = stages[id] else { continue }
            switch st.plan.placement {
            case .inProcess: startThread(id)
            case .process: try spawnWorker(id)
            case .worker: stages[id]?.startedNs = monotonicNs()  // waits for its worker to connect
            }
        }
        log.info("pipeline '\(plan.spec.name)' running: \(plan.stages.count) stages, \(plan.lanes.count) lanes; control \(RunDirectory.controlEndpoint(dir))")
        // A durable pipeline resumes after a crash; a file sink that truncates at start would then
        // lose what it had written (and acknowledged).
        if plan.spec.delivery.mode == .atLeastOnce, plan.spec.stages.contains(where: { $0.config?["durable"]?.boolValue == true }) {
            for st in plan.spec.stages where st.kind == "file-sink" && st.config?["append"]?.boolValue != true {
                log.warning("stage '\(st.id)': a file-sink without `append: true` truncates its file when the host starts again, losing what a durable source will not send again (docs/delivery.md)")
            }
        }
        loop()
        shutdown()
        return summary()
    }

    // MARK: starting runners

    func startThread(_ id: String) {
        stages[id]?.startedNs = monotonicNs()
        let runner = StageRunner(context: zmq, controlEndpoint: runnerEndpointInproc, stageID: id, registry: registry,
                                 location: "host:\(getpid())")
        let done = threadsDone
        let t = Thread {
            _ = runner.run()
            done.value.add(1, ordering: .sequentiallyConsistent)
        }
        t.name = "stage-\(id)"
        t.stackSize = 8 << 20
        threads.append(t)
        t.start()
    }

    func spawnWorker(_ id: String) throws(RuntimeError) {
        let args = [options.workerExecutable, "worker", "--connect", runnerEndpointIPC, "--stage", id]
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        // Own process group: a terminal's Ctrl-C reaches the host, which drains the workers in order.
        // A clean signal mask and default dispositions for the worker.
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attr, 0)
        var empty = sigset_t(); sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t(); sigemptyset(&defaults); sigaddset(&defaults, SIGTERM); sigaddset(&defaults, SIGPIPE)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var cargs: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, options.workerExecutable, nil, &attr, &cargs, environ)
        guard rc == 0 else { throw .io("cannot start worker for stage '\(id)' (\(options.workerExecutable)): \(String(cString: strerror(rc)))") }
        stages[id]?.pid = pid
        stages[id]?.childExited = false
        stages[id]?.assigned = false
        stages[id]?.startedNs = monotonicNs()
        log.info("stage '\(id)' started in worker process \(pid)")
    }

    // MARK: the loop

    func loop() {
        guard let rr = runnerRouter, let cr = controlRouter else { return }
        var poller = ZMQPoller()
        poller.add(rr); poller.add(cr)
        if let rm = remote {
            poller.add(rm.router)
            if let z = rm.zap { poller.add(z) }
            if let m = rm.monitor { poller.add(m) }
            if let c = rm.control { poller.add(c) }
        }
        while true {
            _ = try? poller.poll(timeoutMs: 20)
            while let parts = try? rr.receiveParts(dontWait: true) { handleRunner(parts) }
            while let parts = try? cr.receiveParts(dontWait: true) { handleControl(parts) }
            pollRemote()
            let now = monotonicNs()
            let signals = signalStop.load(ordering: .relaxed)
            if signals != 0 && !stopping {
                beginStop(reason: "signal")
                signalsAtStop = signals
            } else if stopping && signals > signalsAtStop && failure == nil {
                // A second signal while draining: the operator does not want to wait for a stuck
                // consumer. What is still in flight is lost (said in the log and the exit status).
                failure = "aborted by a second signal while draining (envelopes in flight are lost)"
                log.error("\(failure ?? "")")
            }
            reapChildren()
            if failure == nil, let silent = order.first(where: {
                guard let st = stages[$0], !st.plan.placement.isRemote else { return false }
                return st.stats == nil && !st.childExited && now > st.startedNs && now - st.startedNs > 30_000_000_000
            }) {
                failure = "stage '\(silent)' did not start within 30 s (no report from its runner)"
            }
            // A remote stage waits for its worker up to remote.worker_wait_s (also after it went down).
            if failure == nil, let rm = remote, let missing = order.first(where: {
                guard let st = stages[$0], st.plan.placement.isRemote, st.stats?.flags.contains(.finished) != true else { return false }
                let since = rm.lastFrame[$0] ?? st.startedNs
                return now > since && Double(now - since) / 1e9 > rm.spec.workerWaitSeconds
            }) {
                let w = stages[missing]?.plan.placement.workerName ?? "?"
                failure = "stage '\(missing)': no runner from worker '\(w)' for \(rm.spec.workerWaitSeconds) s (remote.worker_wait_s); `pipectl workers` shows who connected"
            }
            if failure != nil { broadcast(.abort); break }
            checkLoops()
            checkBounds(now)
            publishSubscriptions(now)
            refreshMetrics(now)
            checkAudit(now)
            if now - lastHeartbeat > 1_000_000_000 { lastHeartbeat = now; heartbeat(); sweepGrants() }
            if allFinished { broadcast(.finish); break }
        }
    }

    var allFinished: Bool {
        stages.values.allSatisfy { $0.stats?.flags.contains(.finished) == true }
    }

    func beginStop(reason: String) {
        stopping = true
        stopReason = reason
        log.info("stopping (\(reason)): sources stop, lanes drain, sinks flush")
        broadcast(.stop)
    }

    func send(_ id: String, _ frame: [UInt8]) {
        if let rm = remote, stages[id]?.plan.placement.isRemote == true {
            if let r = rm.routes[id] { _ = try? rm.router.send(parts: [r, frame], dontWait: true) }
            return
        }
        _ = try? runnerRouter?.send(parts: [Array(id.utf8), frame], dontWait: true)
    }

    func broadcast(_ code: RunnerCommand.Code, argument: UInt64 = 0) {
        for id in order { controlSeq += 1; send(id, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: code, argument: argument))) }
    }

    func heartbeat() {
        for id in order { controlSeq += 1; send(id, FrameEncoder.heartbeat(lane: FrameHeader.controlLane, seq: controlSeq, timeNs: wallNs())) }
    }

    func handleRunner(_ parts: [[UInt8]]) {
        guard parts.count == 2 else { return }
        let id = String(decoding: parts[0], as: UTF8.self)
        guard stages[id] != nil else { log.warning("frame from unknown runner '\(id)'"); return }
        parts[1].withUnsafeBytes { raw in
            guard let f = try? FrameView(raw) else { log.warning("malformed frame from runner '\(id)'"); return }
            if f.header.type == .hello {
                guard let h = try? Hello.decode(f), h.protocolVersion == Hello.protocolVersion else {
                    log.error("runner '\(id)' speaks another protocol version"); return
                }
                _ = h.pid  // informational: for child workers the pid from posix_spawn is the one we wait for
                if stages[id]?.plan.placement.isRemote == true { log.warning("runner '\(id)' is placed on a remote worker; refused locally"); return }
                assign(id)
                return
            }
            handleRunnerFrame(id, f)
        }
    }

    /// Sends a stage its ASSIGN (or ABORT when the run is ending).
    func assign(_ id: String) {
        if failure != nil || shuttingDown {
            controlSeq += 1
            send(id, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .abort)))
            return
        }
        guard var a = plan.assignment(for: id, runTag: runTag, runDir: options.runDirectory, remote: remote?.layout) else { return }
        if stages[id]?.plan.role == .source { a.maxEmit = options.maxEnvelopes }
        a.statsIntervalMs = options.statsIntervalMs
        a.byReference = options.inprocByReference
        a.restarts = stages[id]?.restarts ?? 0
        controlSeq += 1
        send(id, FrameEncoder.text(.assign, seq: controlSeq, JSON.serialize(a.json)))
        stages[id]?.assigned = true
        if stopping { controlSeq += 1; send(id, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .stop))) }
    }

    /// STATS and AUDIT from a runner, local or remote.
    func handleRunnerFrame(_ id: String, _ f: FrameView) {
        switch f.header.type {
        case .stats:
            guard var r = try? StatsReport.decode(f) else { log.warning("bad STATS from '\(id)'"); return }
            if let b = stages[id]?.base { r = Self.add(base: b, to: r) }
            if r.flags.contains(.failed), failure == nil {
                let reason = r.status.first { $0.0 == "error" }?.1.description ?? "failed"
                failure = "stage '\(id)' failed: \(reason)"
            }
            stages[id]?.stats = r
            observeLanes(of: id)
        case .audit:
            // One or more binary records (runners batch them); the writer validates each.
            guard f.body.count <= 4 << 20 else {
                log.error("stage '\(id)': AUDIT frame of \(f.body.count) bytes refused (over 4 MiB)")
                auditWriter?.submit(AuditRecord(decision: "audit-refused", stage: "host", intent: "audit.integrity",
                                                reason: "stage '\(id)' sent an AUDIT frame of \(f.body.count) bytes (over 4 MiB)",
                                                details: ["from_stage": .string(id)]))
                return
            }
            auditCount += auditWriter?.submit(frame: f.body, from: id) ?? 0
        default:
            log.warning("unexpected \(f.header.type) frame from runner '\(id)'")
        }
    }

    /// A restarted worker counts from zero; its predecessors' counts are kept as a base.
    static func add(base b: StatsReport, to r: StatsReport) -> StatsReport {
        var r = r
        r.received &+= b.received; r.emitted &+= b.emitted; r.deadLettered &+= b.deadLettered; r.errors &+= b.errors
        r.busyNs &+= b.busyNs; r.processing = r.processing.adding(b.processing)
        for i in r.lanes.indices {
            if let old = b.lanes.first(where: { $0.lane == r.lanes[i].lane && $0.role == r.lanes[i].role }) {
                r.lanes[i].count &+= old.count; r.lanes[i].blockedNs &+= old.blockedNs
                r.lanes[i].dropped &+= old.dropped; r.lanes[i].spilled &+= old.spilled
                r.lanes[i].latency = r.lanes[i].latency.adding(old.latency)
            }
        }
        return r
    }

    func reapChildren() {
        for id in order {
            guard let st = stages[id], st.plan.placement == .process, let pid = st.pid, !st.childExited else { continue }
            var status: Int32 = 0
            let rc = waitpid(pid, &status, WNOHANG)
            guard rc == pid else { continue }
            stages[id]?.childExited = true
            let signaled = (status & 0x7f) != 0
            let how = signaled ? "killed by signal \(status & 0x7f)" : "exited with status \((status >> 8) & 0xff)"
            if st.stats?.flags.contains(.finished) == true && !signaled && ((status >> 8) & 0xff) == 0 { continue }
            if st.restarts >= options.maxRestarts {
                failure = "worker for stage '\(id)' (pid \(pid)) \(how); gave up after \(st.restarts) restarts"
                log.error("\(failure ?? "")")
                continue
            }
            stages[id]?.restarts += 1
            if let s = st.stats { stages[id]?.base = s }
            stages[id]?.stats = nil
            let fate = plan.spec.delivery.mode == .atLeastOnce ? "what it had not acknowledged is sent again" : "envelopes it held are lost (delivery: at-most-once)"
            log.warning("worker for stage '\(id)' (pid \(pid)) \(how); restarting (restart \(st.restarts + 1)); \(fate)")
            do { try spawnWorker(id) } catch { failure = "\(error)" }
        }
    }

    // MARK: end of stream in loops

    /// A loop head that has ended all non-loop inputs gets `loopClosed` once the host has seen its
    /// whole strongly connected component quiescent twice, with fresh reports in between: every
    /// lane inside balanced (sent == received, nothing queued), every member idle, every input
    /// from outside the component ended.
    func checkLoops() {
        for id in order {
            guard let st = stages[id], let s = st.stats, s.flags.contains(.awaitingLoopClose) else { loopChecks[id] = nil; continue }
            guard let comp = plan.component[id] else { continue }
            let memberList = order.filter { plan.component[$0] == comp }
            let members = Set(memberList)
            var ok = true
            var vector: [UInt64] = []
            for m in memberList {
                guard let ms = stages[m]?.stats, ms.flags.contains(.idle) || ms.flags.contains(.finished) else { ok = false; break }
                for l in plan.lanes where l.to == m {
                    let consumer = ms.lanes.first { $0.lane == l.id && $0.role == .consumer }
                    if !members.contains(l.from) {
                        if consumer?.endOfStream != true { ok = false }
                    } else {
                        let producer = stages[l.from]?.stats?.lanes.first { $0.lane == l.id && $0.role == .producer }
                        guard let p = producer, let c = consumer, p.count == c.count, p.queued == 0 else { ok = false; break }
                        vector.append(p.count)
                    }
                }
                if !ok { break }
            }
            if !ok { loopChecks[id] = nil; continue }
            let now = wallNs()
            if let prev = loopChecks[id], prev.vector == vector,
               members.allSatisfy({ (stages[$0]?.stats?.timeNs ?? 0) > prev.time }) {
                loopChecks[id] = nil
                controlSeq += 1
                send(id, FrameEncoder.command(seq: controlSeq, RunnerCommand(code: .loopClosed)))
                log.debug("loop through '\(id)' is quiescent: closed")
            } else if loopChecks[id]?.vector != vector || loopChecks[id] == nil {
                loopChecks[id] = (vector, now)
            }
        }
    }

    func checkBounds(_ now: UInt64) {
        guard !stopping else { return }
        if let idle = options.untilIdleSeconds {
            let vector = lanes().map { $0.sent &+ $0.received }
            if vector != lastActivity.vector { lastActivity = (vector, now) }
            else if Double(now - lastActivity.time) / 1e9 >= idle { beginStop(reason: "--until-idle \(idle)s: no lane activity") }
        }
    }

    // MARK: views

    public func lanes() -> [LaneView] { plan.lanes.compactMap(laneView) }

    func laneView(_ l: PipelinePlan.PlannedLane) -> LaneView? {
        let p = stages[l.from]?.stats?.lanes.first { $0.lane == l.id && $0.role == .producer }
        let c = stages[l.to]?.stats?.lanes.first { $0.lane == l.id && $0.role == .consumer }
        var v = LaneView(id: l.id, from: l.fromRef, to: l.toRef, transport: l.transport, bound: l.settings.bound, bytesBound: l.settings.bytes,
                         whenFull: l.settings.whenFull.rawValue, loopBack: l.loopBack, sent: p?.count ?? 0, received: c?.count ?? 0,
                         queued: UInt64(p?.queued ?? 0), credits: UInt64(c?.credits ?? 0), endOfStream: p?.endOfStream ?? false,
                         blockedNs: p?.blockedNs ?? 0)
        v.dropped = p?.dropped ?? 0
        v.spilled = p?.spilled ?? 0
        v.spillDepth = UInt64(p?.spillDepth ?? 0)
        v.latency = c?.latency ?? DurationHistogram()
        if let p, let c, p.epoch != 0, p.epoch == c.epoch { v.inFlightCount = Int64(clamping: p.countInEpoch) - Int64(clamping: c.countInEpoch) }
        v.tap = stages[l.from]?.plan.placement.isRemote == true ? "" : plan.tapEndpoint(l.from, runDir: options.runDirectory)
        if let rm = remote, l.transport == "tcp" {
            let now = monotonicNs()
            v.down = remoteDown(l.from, now: now) || remoteDown(l.to, now: now)
            let r = rm.layout
            v.endpoint = r.laneData[l.id].map(r.connect) ?? r.stageIn[l.to].map(r.connect) ?? r.relayIn[l.id].map(r.connect) ?? ""
            if r.relayed.contains(l.id) {
                v.relay = rm.relay.map { relayWaiting(l, $0.stats()[l.id] ?? LaneRelay.LaneStats()) }.map { $0.isEmpty ? "forwarding" : $0 } ?? "closed"
            }
        }
        v.sentReportNs = stages[l.from]?.stats?.timeNs ?? 0
        v.receivedReportNs = stages[l.to]?.stats?.timeNs ?? 0
        if let m = laneMonitors[l.id] {
            v.state = m.marks.state; v.low = m.marks.low; v.high = m.marks.high; v.release = m.marks.release
            v.rateIn = m.rateIn.rate; v.rateOut = m.rateOut.rate
            v.estimatedDepth = m.estimate
            v.blockedFraction = min(1, m.blocked.rate / 1e9)
        }
        return v
    }

    public func stageViews() -> [StageView] {
        order.compactMap { id in
            guard let st = stages[id] else { return nil }
            let s = st.stats
            var state = "starting"
            if let f = s?.flags {
                state = f.contains(.failed) ? "failed" : f.contains(.finished) ? "finished" : f.contains(.awaitingLoopClose) ? "awaiting-loop-close"
                    : f.contains(.exhausted) ? "exhausted" : f.contains(.idle) ? "idle" : "busy"
            } else if st.childExited { state = "down" }
            if let w = st.plan.placement.workerName {
                if remote?.routes[id] == nil { state = "waiting for worker \(w)" }
                else if remoteDown(id, now: monotonicNs()) { state = "down (worker \(w) silent)" }
            }
            let pid: Int32? = st.plan.placement == .process ? st.pid : st.plan.placement.isRemote ? nil : getpid()
            var v = StageView(id: id, kind: st.plan.kind, placement: st.plan.placement.description, pid: pid, state: state,
                              received: s?.received ?? 0, emitted: s?.emitted ?? 0, deadLettered: s?.deadLettered ?? 0, errors: s?.errors ?? 0,
                              restarts: st.restarts, status: (s?.status ?? []).filter { $0.0 != "pid" })
            if let r = stageRates[id] { v.rateIn = r.0.rate; v.rateOut = r.1.rate; v.busyFraction = min(1, r.2.rate / 1e9) }
            v.reportNs = s?.timeNs ?? 0
            // A running stage's report says only whether its queues are empty; what an operator
            // needs is whether it waits on a full lane (which), works flat out, or has nothing to do.
            if state == "idle" || state == "busy" {
                if let (lane, _) = outputWait(id) { v.state = "blocked on lane \(lane)" }
                else if v.busyFraction >= Self.busyAbove { v.state = "busy" }
            }
            return v
        }
    }

    /// Over the last second: a stage whose code ran at least this share of the time is `busy`,
    /// and a producer that waited for credits at least this share is `blocked on lane N`.
    static let busyAbove = 0.8, blockedAbove = 0.5

    /// The output lane stage `id` waited on longest over the last second, when it waited at
    /// least ``blockedAbove`` of it (credits: the lane is full), with that share.
    func outputWait(_ id: String) -> (lane: UInt32, fraction: Double)? {
        var best: (lane: UInt32, fraction: Double)?
        for l in plan.lanes where l.from == id && !l.loopBack {
            let f = producerWait(l.id)
            if f >= Self.blockedAbove && f > (best?.fraction ?? 0) { best = (l.id, f) }
        }
        return best
    }

    /// The share of the last second lane `id`'s producer waited for its credits.
    func producerWait(_ id: UInt32) -> Double { laneMonitors[id].map { min(1, $0.blocked.rate / 1e9) } ?? 0 }

    /// The stages the pipeline waits on: each runs, is not itself blocked, and has an input lane
    /// whose producer is blocked on it (the first slow stage of a chain of full lanes; where
    /// pressure comes from). With the full lanes into it, most blocked first.
    public func bottlenecks(_ views: [StageView]) -> [(stage: String, busy: Double, state: String, lanes: [UInt32])] {
        var out: [(stage: String, busy: Double, state: String, lanes: [UInt32])] = []
        for v in views where !v.state.hasPrefix("blocked") && !["finished", "failed", "exhausted"].contains(v.state) {
            let waiting = plan.lanes.filter { $0.to == v.id && !$0.loopBack }
                .map { ($0.id, producerWait($0.id)) }.filter { $0.1 >= Self.blockedAbove }
                .sorted { $0.1 > $1.1 }.map(\.0)
            if !waiting.isEmpty { out.append((v.id, v.busyFraction, v.state, waiting)) }
        }
        return out
    }

    func summary() -> RunSummary {
        RunSummary(pipeline: plan.spec.name, elapsedSeconds: Double(monotonicNs() - startNs) / 1e9, stages: stageViews(), lanes: lanes(),
                   failure: failure)
    }

    // MARK: shutdown

    func shutdown() {
        shuttingDown = true
        // Wait for in-process runners (they exit on FINISH/ABORT) and worker processes.
        let deadline = monotonicNs() + 10_000_000_000
        while threadsDone.value.load(ordering: .sequentiallyConsistent) < threads.count && monotonicNs() < deadline {
            if let rr = runnerRouter { while let parts = try? rr.receiveParts(dontWait: true) { handleRunner(parts) } }
            usleep(2000)
        }
        for id in order {
            guard let st = stages[id], st.plan.placement == .process, let pid = st.pid, !st.childExited else { continue }
            var status: Int32 = 0
            var waited = false
            while monotonicNs() < deadline {
                if let rr = runnerRouter { while let parts = try? rr.receiveParts(dontWait: true) { handleRunner(parts) } }
                if waitpid(pid, &status, WNOHANG) == pid { waited = true; break }
                usleep(2000)
            }
            if !waited { kill(pid, SIGKILL); waitpid(pid, &status, 0); log.warning("worker \(pid) for '\(id)' did not exit; killed") }
            stages[id]?.childExited = true
        }
        if let rr = runnerRouter { while let parts = try? rr.receiveParts(dontWait: true) { handleRunner(parts) } }
        runnerRouter?.close(); controlRouter?.close()
        let remoteClosed = closeRemote()
        metricsServer?.stop()
        unlink(options.runDirectory + "/metrics.addr")
        closeAuditLog()
        unlink(options.runDirectory + "/control.sock")
        unlink(options.runDirectory + "/runners.sock")
        unlink(options.runDirectory + "/host.pid")
        if threadsDone.value.load(ordering: .sequentiallyConsistent) >= threads.count && remoteClosed {
            // Batches handed over on in-process lanes and never taken (an abort raced them): they
            // go with the context, so a later context at the same address inherits nothing.
            LocalHandoff.shared.discard(context: ObjectIdentifier(zmq))
            zmq.terminate()
        }
    }

    func installSignalHandlers() {
        signalStop.store(0, ordering: .relaxed)
        // A parent may hand us a blocked signal mask (Foundation's Process does): unblock what we
        // handle, before any runner thread inherits the mask.
        var set = sigset_t()
        sigemptyset(&set); sigaddset(&set, SIGINT); sigaddset(&set, SIGTERM); sigaddset(&set, SIGCHLD)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
        // Each signal counts: the first asks for a drain, a second one while draining aborts.
        signal(SIGINT) { _ in signalStop.add(1, ordering: .relaxed) }
        signal(SIGTERM) { _ in signalStop.add(1, ordering: .relaxed) }
        signal(SIGPIPE, SIG_IGN)
    }
}

let ZMQ_ROUTER_HANDOVER_OPT: Int32 = 56

/// A shared atomic counter (Atomic itself cannot be captured by a closure).
final class Counter: Sendable {
    let value = Atomic<Int>(0)
}
