import Testing
import Yams
import Foundation
import Glibc
import PipeKit
@testable import PipeRuntime
import PipeSeal
import PipeZMQ

/// A directory with host and worker keys from `pipehost keygen`, and a pipeline whose middle
/// stage runs on remote worker `edge`, listening on a free loopback port.
struct RemoteFixture {
    let dir: String
    let port: Int
    var endpoint: String { "tcp://127.0.0.1:\(port)" }
    var pipeline: String { dir + "/remote.yaml" }

    init(_ tag: String, extraWorkers: [String] = [], insecure: Bool = false, count: Int = 5000, rate: Int? = nil,
         delivery: String? = nil, downAfterMs: Int? = nil, grants: Bool = false, metrics: Bool = false) throws {
        dir = Paths.tempDir(tag)
        port = try reserveTCPPort(host: "127.0.0.1")
        for k in ["host", "edge", "stranger", "owner"] + extraWorkers {
            let r = try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k])
            #expect(r.status == 0, "\(r.stderr)")
        }
        // With grants, edge is listed without a key: only an owner's grant admits it.
        var workers = grants ? "    edge: {}\n" : "    edge: { key: keys/edge/curve.pub }\n"
        for w in extraWorkers { workers += "    \(w): { key: keys/\(w)/curve.pub }\n" }
        let rateLine = rate.map { ", rate: \($0)" } ?? ""
        let yaml = """
            pipeline: remote-test
            \(delivery.map { "delivery: \($0)\n" } ?? "")\(metrics ? "metrics: { listen: 127.0.0.1:0 }\n" : "")remote:
              listen: \(endpoint)
            \(insecure ? "  insecure: true" : "  key: keys/host/curve.key")
            \(downAfterMs.map { "  down_after_ms: \($0)\n" } ?? "")\(grants ? "  owners: [keys/owner/signing.pub]\n" : "")  workers:
            \(workers)stages:
              - id: gen
                kind: generator
                config: { count: \(count), seed: 11\(rateLine) }
              - id: pass
                kind: passthrough
                inputs: [gen]
                placement: { worker: edge }
              - id: out
                kind: file-sink
                inputs: [pass]
                config: { path: out.jsonl, append: true }
            """
        try yaml.write(toFile: pipeline, atomically: true, encoding: .utf8)
    }

    /// The head of a test pipeline (name, optional top-level lines, `remote:` on this fixture's
    /// port with the host key) whose workers are `workers`, each with its own key; `stages:` follows.
    func head(_ name: String, workers: [String], top: String = "", remote: String = "") -> String {
        "pipeline: \(name)\n" + top + "remote:\n  listen: \(endpoint)\n  key: keys/host/curve.key\n" + remote + "  workers:\n"
            + workers.map { "    \($0): { key: keys/\($0)/curve.pub }\n" }.joined()
    }

    /// `pipehost worker` as a process; the caller waits for it or kills it.
    func startWorker(_ key: String, extra: [String] = [], log: String) throws -> Process {
        var args = ["worker", "--connect", endpoint, "--run-dir", dir + "/w-" + key]
        if !extra.contains("--insecure") { args += ["--key", dir + "/keys/\(key)/curve.key", "--server-key", dir + "/keys/host/curve.pub"] }
        return try Self.spawn(args + extra, log: log)
    }

    /// `pipehost ARGS` as a process, its stderr in `log`.
    static func spawn(_ args: [String], log: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Paths.pipehost)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        p.standardError = FileHandle(forWritingAtPath: log)
        try p.run()
        return p
    }

    /// A socket in `ctx` that is a CURVE client of the host as worker `key` (tests posing as a worker).
    func clientSocket(_ kind: ZMQSocket.Kind, as key: String, in ctx: ZMQContext) throws -> ZMQSocket {
        let keys = try CurveKeys.loadSecret(dir + "/keys/\(key)/curve.key")
        let s = try ctx.socket(kind)
        try s.makeCurveClient(publicKey: keys.publicKey, secretKey: keys.secretKey, serverKey: try CurveKeys.loadPublic(dir + "/keys/host/curve.pub", base: "/"))
        return s
    }

    /// Poses as a runner of worker `key` asking for `stage` (a HELLO): the COMMAND code the host
    /// answers with (abort when it refuses), or nil when the answer is not a COMMAND.
    func askForStage(_ stage: String, as key: String) throws -> RunnerCommand.Code? {
        let ctx = try ZMQContext()
        defer { ctx.terminate() }
        let d = try clientSocket(.dealer, as: key, in: ctx)
        defer { d.close() }
        try d.setReceiveTimeout(ms: 5000)
        try d.connect(endpoint)
        try d.send(Hello(pid: 1, worker: stage).encode(seq: 1))
        return try d.receive().flatMap { bytes in try withFrame(bytes) { f in f.header.type == .command ? try f.command().code : nil } }
    }

    func worker(_ key: String, extra: [String] = [], timeout: Double = 60) throws -> ProcResult {
        var args = ["worker", "--connect", endpoint, "--run-dir", dir + "/w-" + key, "--handshake-timeout", "3"]
        if !extra.contains("--insecure") { args += ["--key", dir + "/keys/\(key)/curve.key", "--server-key", dir + "/keys/host/curve.pub"] }
        return try runProcess(Paths.pipehost, args + extra, timeout: timeout)
    }
}

/// The value of one sample line (`name{labels} value`) from a running host's /metrics.
func scrapeSample(_ run: String, _ series: String) throws -> Double? {
    let addr = try String(contentsOfFile: run + "/metrics.addr", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
    let r = try runProcess("/usr/bin/python3", ["-c", "import urllib.request,sys; print(urllib.request.urlopen('http://' + sys.argv[1] + '/metrics', timeout=5).read().decode())", addr], timeout: 20)
    for line in r.stdout.split(separator: "\n") where line.hasPrefix(series + " ") { return Double(line.dropFirst(series.count + 1)) }
    return nil
}

/// Waits (up to `seconds`: the host renders its metrics at most once a second) for a sample to
/// read `value`; returns the last value read.
func waitSample(_ run: String, _ series: String, _ value: Double, seconds: Double = 5) throws -> Double? {
    var v = try scrapeSample(run, series)
    let deadline = Date().addingTimeInterval(seconds)
    while v != value && Date() < deadline { usleep(200_000); v = try scrapeSample(run, series) }
    return v
}

/// What stage `out` of a running host has received.
func outReceived(_ run: String) throws -> Int64 {
    let st = try pipectlJSON(["status", "--run-dir", run])
    return (st["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == "out" }?["received"]?.intValue ?? 0
}

/// Waits for a process to exit, killing it after `timeout` seconds; returns its status.
@discardableResult
/// Calls `probe` every `everyMs` until it gives `want` or `seconds` pass; returns its last answer.
func poll<T: Equatable>(_ want: T, seconds: Double, everyMs: UInt32 = 100, _ probe: () throws -> T) rethrows -> T {
    let deadline = Date().addingTimeInterval(seconds)
    var got = try probe()
    while got != want && Date() < deadline { usleep(everyMs * 1000); got = try probe() }
    return got
}

/// Kills a worker outright once the sink of `run` has taken 1000 envelopes; returns how many it had.
func killWorkerMidRun(_ worker: Process, run: String) throws -> Int64 {
    let got = try poll(true, seconds: 30, everyMs: 50) { try outReceived(run) >= 1000 }
    kill(worker.processIdentifier, SIGKILL)
    worker.waitUntilExit()
    return got ? try outReceived(run) : 0
}

func waitExit(_ p: Process, timeout: Double) -> Int32 {
    let deadline = Date().addingTimeInterval(timeout)
    while p.isRunning && Date() < deadline { usleep(20_000) }
    if p.isRunning { kill(p.processIdentifier, SIGKILL) }
    p.waitUntilExit()
    return p.terminationStatus
}

func envelopeIDs(_ path: String) throws -> [String] {
    try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").compactMap { line in
        (try? JSON.parse(String(line)))?["id"]?.stringValue
    }
}

extension ExclusivePipelines {
@Suite("Remote workers over tcp with CURVE", .serialized)
struct RemoteWorkerTests {
    @Test func remoteMiddleStage_givesTheSameOutputAsInProcess() throws {
        let fx = try RemoteFixture("remote-same")
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        let worker = try fx.startWorker("edge", log: fx.dir + "/worker.log")
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(worker, timeout: 20) == 0, "\((try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? "")")
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "pass")?["placement"]?.stringValue == "worker:edge")
        #expect(stage(s, "pass")?["received"]?.intValue == 5000)
        for l in lanes(s) { #expect(l["sent"] != nil && l["sent"] == l["received"], "lane \(l["id"]?.intValue ?? 0)") }
        #expect(lane(s, from: "gen.out", to: "pass.in")?["transport"]?.stringValue == "tcp")
        #expect(lane(s, from: "pass.out", to: "out.in")?["transport"]?.stringValue == "tcp")
        // The same pipeline with every stage in the host: the same envelopes, in the same order.
        let local = try String(contentsOfFile: fx.pipeline, encoding: .utf8).replacingOccurrences(of: "placement: { worker: edge }", with: "placement: in-process")
        let localFile = fx.dir + "/local.yaml"
        try local.write(toFile: localFile, atomically: true, encoding: .utf8)
        let (r, _) = try runPipeline(localFile, runDir: fx.dir + "/run-local")
        #expect(r.status == 0, "\(r.stderr)")
        let remoteIDs = try envelopeIDs(run + "/out.jsonl"), localIDs = try envelopeIDs(fx.dir + "/run-local/out.jsonl")
        #expect(remoteIDs.count == 5000)
        #expect(remoteIDs == localIDs)
        let audit = try auditJSONL(run)
        #expect(audit.contains("worker 'edge' registered for pass"))
    }

    @Test(arguments: [("edge.yaml", 7800, ["edge"], "edge.jsonl"), ("two-workers.yaml", 7801, ["edge", "edge2"], "two-workers.jsonl")])
    func theExamplePipelines_runWithTheirWorkers(file: String, examplePort: Int, workers: [String], output: String) throws {
        // pipelines/remote/FILE as its comment runs it, on a free port, keys made here.
        let dir = Paths.tempDir("remote-example")
        let port = try reserveTCPPort(host: "127.0.0.1")
        let text = try String(contentsOfFile: Paths.root + "/pipelines/remote/" + file, encoding: .utf8)
        #expect(text.contains("tcp://127.0.0.1:\(examplePort)"))
        try text.replacingOccurrences(of: "tcp://127.0.0.1:\(examplePort)", with: "tcp://127.0.0.1:\(port)")
            .replacingOccurrences(of: "rate: 5000", with: "rate: 50000")
            .write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        for k in ["host"] + workers { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k]).status == 0) }
        let run = dir + "/run"
        let host = try startPipeline(dir + "/p.yaml", runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let procs = try workers.map { w in
            try RemoteFixture.spawn(["worker", "--connect", "tcp://127.0.0.1:\(port)", "--key", dir + "/keys/\(w)/curve.key",
                                     "--server-key", dir + "/keys/host/curve.pub", "--run-dir", dir + "/w-" + w], log: dir + "/\(w).log")
        }
        defer { for p in procs where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        #expect(waitExit(host, timeout: 60) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        for (w, p) in zip(workers, procs) { #expect(waitExit(p, timeout: 20) == 0, "\((try? String(contentsOfFile: dir + "/\(w).log", encoding: .utf8)) ?? "")") }
        let ids = try envelopeIDs(run + "/" + output)
        #expect(ids.count == 20000)
        #expect(Set(ids).count == 20000)
    }

    @Test func strangers_wrongKeys_plaintext_andOtherWorkersStages_areRefusedAndAudited() throws {
        let fx = try RemoteFixture("remote-refuse", extraWorkers: ["spare"])
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        // A key the host does not list: ZAP says no, and the worker says so.
        let stranger = try fx.worker("stranger")
        #expect(stranger.status == 2)
        #expect(stranger.stderr.contains("refused this key"), "\(stranger.stderr)")
        // The right worker key with the wrong server key: the handshake cannot decrypt.
        let bad = try runProcess(Paths.pipehost, ["worker", "--connect", fx.endpoint, "--key", fx.dir + "/keys/edge/curve.key",
                                                  "--server-key", fx.dir + "/keys/stranger/curve.pub", "--handshake-timeout", "2",
                                                  "--run-dir", fx.dir + "/w-bad"], timeout: 30)
        #expect(bad.status == 2)
        #expect(bad.stderr.contains("--server-key"), "\(bad.stderr)")
        // Plaintext against a CURVE host.
        let plain = try fx.worker("edge", extra: ["--insecure", "--name", "edge"])
        #expect(plain.status == 2)
        #expect(plain.stderr.contains("expects CURVE"), "\(plain.stderr)")
        // An allowed worker asking for a stage placed on another worker.
        #expect(try fx.askForStage("pass", as: "spare") == .abort)
        // The host still runs the pipeline when its own worker comes.
        let worker = try fx.startWorker("edge", log: fx.dir + "/worker.log")
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(worker, timeout: 20) == 0)
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "out")?["received"]?.intValue == 5000)
        let audit = try auditJSONL(run)
        #expect(audit.contains("unknown worker key"))
        #expect(audit.contains("the client's server key is not this host's key"))
        // The plaintext client: libzmq reports a mechanism mismatch, or a broken handshake when the
        // client hung up first (timing); either is a refused, audited handshake.
        #expect(audit.contains("security mechanism mismatch") || audit.contains("handshake failed (Broken pipe)"))
        #expect(audit.contains("worker 'spare' asked for stage 'pass', which is placed on worker 'edge'"))
        #expect(audit.contains("worker-joined"))
    }

    @Test func insecure_runsPlaintextWithAWarning() throws {
        let fx = try RemoteFixture("remote-insecure", insecure: true)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        // Without a key nothing names the worker: plaintext workers say who they are.
        let worker = try fx.startWorker("edge", extra: ["--insecure", "--name", "edge"], log: fx.dir + "/worker.log")
        #expect(waitExit(host, timeout: 90) == 0)
        #expect(waitExit(worker, timeout: 20) == 0)
        let log = try String(contentsOfFile: run + ".host.log", encoding: .utf8)
        #expect(log.contains("plaintext tcp"), "\(log)")
        #expect(try envelopeIDs(run + "/out.jsonl").count == 5000)
        // A CURVE worker cannot talk to a plaintext host either.
        let curve = try fx.worker("edge")
        #expect(curve.status == 2)
    }

    @Test func lanePortsAdmitOnlyTheirWorkers_andAFrameOnAnotherWorkersLaneIsRefused() throws {
        // Two workers each run a branch into one host sink: both may connect to the sink's input
        // port, but each only on its own lane; neither may connect to the other's data port.
        let fx = try RemoteFixture("remote-foreign", extraWorkers: ["spare"])
        try (fx.head("remote-foreign", workers: ["edge", "spare"]) + """
            stages:
              - { id: gen, kind: generator, config: { count: 3000, seed: 11 } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: { worker: edge } }
              - { id: pass2, kind: passthrough, inputs: [gen], placement: { worker: spare } }
              - { id: out, kind: file-sink, inputs: [pass, pass2], config: { path: out.jsonl } }
            """).write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let lanesNow = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        let toPass = try #require(lanesNow.first { $0["to"]?.stringValue == "pass.in" })
        let passOut = try #require(lanesNow.first { $0["from"]?.stringValue == "pass.out" })
        let dataPort = try #require(toPass["endpoint"]?.stringValue), sinkPort = try #require(passOut["endpoint"]?.stringValue)
        let laneID = UInt32(passOut["id"]?.intValue ?? 0)
        let ctx = try ZMQContext()
        defer { ctx.terminate() }
        // spare tries to read edge's lane (gen -> pass): ZAP refuses it on that port.
        let pull = try fx.clientSocket(.pull, as: "spare", in: ctx)
        defer { pull.close() }
        try pull.setReceiveTimeout(ms: 300)
        try pull.connect(dataPort)
        // spare may reach the sink's input port (its own lane pass2 -> out ends there), but a
        // frame on edge's lane pass -> out is refused.
        let push = try fx.clientSocket(.push, as: "spare", in: ctx)
        defer { push.close() }
        try push.connect(sinkPort)
        let env = Envelope(intent: "forged", payload: Array("not yours".utf8))
        let frame = [env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: laneID, seq: 1, envelopes: $0) }
        for _ in 0..<3 { try push.send(frame) }
        var refused: Int64 = 0
        let deadline = Date().addingTimeInterval(10)
        while refused < 3 && Date() < deadline {
            usleep(100_000)
            let st = try pipectlJSON(["status", "--run-dir", run])
            refused = (st["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == "out" }?["status"]?["refused_frames"]?.intValue ?? 0
        }
        #expect(refused == 3)
        // A plaintext client, and a CURVE client with the wrong server key, on the sink's lane
        // port: ZeroMQ drops both in the handshake, telling only the socket's monitor; the host
        // audits each (as it does on its registration port).
        try expectBadHandshakesAudited(on: sinkPort, run: run, ctx: ctx, frame: frame)
        // spare's reader on edge's data port is refused by ZAP, which audits that itself: the
        // lane-port monitor leaves refused authentications alone.
        #expect(!(try auditJSONL(run)).contains("lane port \(dataPort)"))
        let a = try fx.startWorker("edge", log: fx.dir + "/edge.log")
        let b = try fx.startWorker("spare", log: fx.dir + "/spare.log")
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(a, timeout: 20) == 0)
        #expect(waitExit(b, timeout: 20) == 0)
        // The would-be reader got nothing, edge got every envelope of its lane, nothing forged arrived.
        #expect(try pull.receive() == nil)
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "pass")?["received"]?.intValue == 3000)
        #expect(stage(s, "pass2")?["received"]?.intValue == 3000)
        let out = try String(contentsOfFile: run + "/out.jsonl", encoding: .utf8)
        #expect(!out.contains("forged"))
        #expect(try envelopeIDs(run + "/out.jsonl").count == 6000)
        let audit = try auditJSONL(run)
        #expect(audit.contains("refused a frame from worker 'spare' on lane \(laneID), which belongs to 'edge'"))
        #expect(audit.contains("worker 'spare' has no lane on port \(dataPort.split(separator: ":").last.map(String.init) ?? "?")"))
    }

    /// A producer whose frames go missing one at a time (a PUSH round-robining onto a connection
    /// that is dying while its peer's new one works) costs the lane one new credit epoch, taken
    /// once the gap has lasted a second, not one per gap: each epoch makes the producer send
    /// everything unacknowledged again, and one per gap ran envelopes out of attempts.
    @Test func framesMissingOneAtATime_startOneNewEpoch_afterAGrace() throws {
        let fx = try RemoteFixture("remote-gaps")
        try (fx.head("remote-gaps", workers: ["edge"]) + """
            stages:
              - { id: gen, kind: generator, config: { count: 100, seed: 11 } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: { worker: edge } }
              - { id: out, kind: file-sink, inputs: [pass], config: { path: out.jsonl } }
            """).write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let lanesNow = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        let passOut = try #require(lanesNow.first { $0["from"]?.stringValue == "pass.out" })
        let port = try #require(passOut["endpoint"]?.stringValue), lane = UInt32(passOut["id"]?.intValue ?? 0)
        // The test is edge's producer on pass -> out: an incarnation, then frames 2, 4, 6, 8.
        let ctx = try ZMQContext()
        defer { ctx.terminate() }
        let push = try fx.clientSocket(.push, as: "edge", in: ctx)
        defer { push.close() }
        try push.connect(port)
        try push.send(FrameEncoder.heartbeat(lane: lane, seq: 1, timeNs: 42))
        let start = Date()
        for seq in [2, 4, 6, 8] as [UInt64] {
            let env = Envelope(intent: "gappy", payload: Array("frame \(seq)".utf8))
            try push.send([env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: lane, seq: seq, envelopes: $0) })
            usleep(100_000)
        }
        func outStatus() throws -> ConfigValue? {
            try pipectlJSON(["status", "--run-dir", run])["stages"]?.listValue?.first { $0["id"]?.stringValue == "out" }
        }
        let lost = try poll(3, seconds: 10, everyMs: 50) { try outStatus()?["status"]?["lost_frames"]?.intValue ?? 0 }
        let tookLost = Date().timeIntervalSince(start)
        #expect(lost == 3)
        // Taken for lost only after the grace, and in one go: one warning, one new epoch.
        #expect(tookLost >= 0.9, "lost frames counted \(tookLost) s after the first gap")
        let log = try String(contentsOfFile: run + ".host.log", encoding: .utf8)
        let warnings = log.split(separator: "\n").filter { $0.contains("lane \(lane) from pass.out:") && $0.contains("lost in transit") }
        #expect(warnings.count == 1 && warnings.first?.contains("3 frame(s) lost") == true, "\(warnings)")
        // Every frame that did arrive was delivered.
        #expect(try outStatus()?["received"]?.intValue == 4)
        // A frame that comes late (10, then 9) fills its gap: nothing is taken for lost.
        for seq in [10, 9] as [UInt64] {
            let env = Envelope(intent: "late", payload: Array("frame \(seq)".utf8))
            try push.send([env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: lane, seq: seq, envelopes: $0) })
        }
        #expect(try poll(6, seconds: 10, everyMs: 50) { try outStatus()?["received"]?.intValue ?? 0 } == 6)
        usleep(1_500_000)
        #expect(try outStatus()?["status"]?["lost_frames"]?.intValue == 3)
        // A gap right before the end of the stream is counted at once (nothing more can fill it).
        let env = Envelope(intent: "last", payload: Array("frame 12".utf8))
        try push.send([env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: lane, seq: 12, envelopes: $0) })
        let eos = Date()
        try push.send(FrameEncoder.endOfStream(lane: lane, seq: 13, total: 7))
        #expect(try poll(4, seconds: 10, everyMs: 20) { try outStatus()?["status"]?["lost_frames"]?.intValue ?? 0 } == 4)
        #expect(Date().timeIntervalSince(eos) < 0.9, "counted \(Date().timeIntervalSince(eos)) s after the end of the stream")
    }

    @Test func lanesBetweenRemoteStages_areRelayedByTheHost_andWhatIsNotTheProtocolIsRefused() throws {
        // gen (host) -> a (edge) -> b (edge2) -> c (edge2) -> p (process) -> d (edge) -> out (host):
        // a -> b joins two workers, b -> c two stages of one worker, c -> p and p -> d a worker and
        // a child process of the host; the host carries all four.
        let fx = try RemoteFixture("remote-relay", extraWorkers: ["edge2"], count: 4000)
        let yaml = fx.head("remote-relay", workers: ["edge", "edge2"]) + """
            stages:
              - { id: gen, kind: generator, config: { count: 4000, seed: 11 } }
              - { id: a, kind: passthrough, inputs: [gen], placement: { worker: edge } }
              - { id: b, kind: passthrough, inputs: [a], placement: { worker: edge2 } }
              - { id: c, kind: passthrough, inputs: [b], placement: { worker: edge2 } }
              - { id: p, kind: passthrough, inputs: [c], placement: process }
              - { id: d, kind: passthrough, inputs: [p], placement: { worker: edge } }
              - { id: out, kind: file-sink, inputs: [d], config: { path: out.jsonl } }
            """
        try yaml.write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let lanesNow = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        #expect(lanesNow.first { $0["from"]?.stringValue == "a.out" }?["relay"]?.stringValue == "forwarding")
        #expect(lanesNow.first { $0["from"]?.stringValue == "gen.out" }?["relay"] == .null)
        let relays = try pipectlJSON(["workers", "--run-dir", run])["relays"]?.listValue ?? []
        #expect(relays.map { $0["from"]?.stringValue ?? "" } == ["a.out", "b.out", "c.out", "p.out"])
        // The process stage's ends are ipc sockets of the relay, in the run directory.
        #expect(relays.first { $0["from"]?.stringValue == "c.out" }?["consumer_takes_from"]?.stringValue == "ipc://\(run)/sock/p.in")
        let ab = try #require(relays.first { $0["from"]?.stringValue == "a.out" })
        let abLane = UInt32(ab["lane"]?.intValue ?? 0)
        let sendsTo = try #require(ab["producer_sends_to"]?.stringValue)
        // Before the workers come, edge (the producer of a -> b, so admitted to that port) sends
        // what is not the protocol: garbage, a frame for another lane, a CREDIT on the data path.
        let ctx = try ZMQContext()
        defer { ctx.terminate() }
        let push = try fx.clientSocket(.push, as: "edge", in: ctx)
        defer { push.close() }
        try push.connect(sendsTo)
        let env = Envelope(intent: "forged", payload: Array("not the protocol".utf8))
        try push.send([1, 2, 3])
        try push.send([env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: 999, seq: 1, envelopes: $0) })
        try push.send(FrameEncoder.credit(lane: abLane, seq: 1, epoch: 1, limit: 5))
        // edge2 sends DATA up the return path, where only CREDIT and ACK may travel.
        let back = try fx.clientSocket(.push, as: "edge2", in: ctx)
        defer { back.close() }
        try back.connect(try #require(ab["consumer_returns_to"]?.stringValue))
        try back.send([env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: abLane, seq: 1, envelopes: $0) })
        // Neither may use the other's ports: edge2 does not send on a -> b, and edge, which
        // does, may not read it (it would take a round-robin share of b's envelopes).
        let stranger = try fx.clientSocket(.push, as: "edge2", in: ctx)
        try stranger.connect(sendsTo)
        try stranger.send([env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: abLane, seq: 1, envelopes: $0) }, dontWait: true)
        let takesFrom = try #require(ab["consumer_takes_from"]?.stringValue)
        let reader = try fx.clientSocket(.pull, as: "edge", in: ctx)
        defer { reader.close() }
        try reader.setReceiveTimeout(ms: 300)
        try reader.connect(takesFrom)
        var refused: Int64 = 0
        let deadline = Date().addingTimeInterval(10)
        while refused < 4 && Date() < deadline {
            usleep(100_000)
            refused = (try pipectlJSON(["workers", "--run-dir", run])["relays"]?.listValue ?? []).first { $0["lane"]?.intValue == Int64(abLane) }?["refused"]?.intValue ?? 0
        }
        #expect(refused == 4)
        let workers = try pipectlJSON(["workers", "--run-dir", run])["workers"]?.listValue ?? []
        #expect(workers.first { $0["name"]?.stringValue == "edge" }?["bad_frames"]?.intValue == 3)
        #expect(workers.first { $0["name"]?.stringValue == "edge2" }?["bad_frames"]?.intValue == 1)
        stranger.close()
        // The relay's ports are watched as the runners' are: bad handshakes on both of a -> b's.
        let junk = [env].withUnsafeBufferPointer { DataFrameBuilder.build(lane: abLane, seq: 1, envelopes: $0) }
        try expectBadHandshakesAudited(on: sendsTo, run: run, ctx: ctx, frame: junk)
        try expectBadHandshakesAudited(on: try #require(ab["consumer_returns_to"]?.stringValue), run: run, ctx: ctx, frame: junk)
        let w1 = try fx.startWorker("edge", log: fx.dir + "/edge.log")
        let w2 = try fx.startWorker("edge2", log: fx.dir + "/edge2.log")
        defer { for w in [w1, w2] where w.isRunning { kill(w.processIdentifier, SIGKILL) } }
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(w1, timeout: 20) == 0, "\((try? String(contentsOfFile: fx.dir + "/edge.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(w2, timeout: 20) == 0, "\((try? String(contentsOfFile: fx.dir + "/edge2.log", encoding: .utf8)) ?? "")")
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        for l in lanes(s) { #expect(l["sent"] != nil && l["sent"] == l["received"], "lane \(l["id"]?.intValue ?? 0)") }
        #expect(lane(s, from: "a.out", to: "b.in")?["transport"]?.stringValue == "tcp")
        #expect(stage(s, "b")?["received"]?.intValue == 4000)
        #expect(stage(s, "c")?["received"]?.intValue == 4000)
        #expect(stage(s, "p")?["placement"]?.stringValue == "process")
        #expect(stage(s, "d")?["received"]?.intValue == 4000)
        #expect(lane(s, from: "c.out", to: "p.in")?["transport"]?.stringValue == "tcp")
        // The same envelopes in the same order as with every stage in the host; nothing forged.
        let local = yaml.replacingOccurrences(of: "placement: { worker: edge2 }", with: "placement: in-process")
                        .replacingOccurrences(of: "placement: { worker: edge }", with: "placement: in-process")
                        .replacingOccurrences(of: "placement: process", with: "placement: in-process")
        try local.write(toFile: fx.dir + "/local.yaml", atomically: true, encoding: .utf8)
        let (r, _) = try runPipeline(fx.dir + "/local.yaml", runDir: fx.dir + "/run-local")
        #expect(r.status == 0, "\(r.stderr)")
        let ids = try envelopeIDs(run + "/out.jsonl")
        #expect(ids.count == 4000)
        #expect(ids == (try envelopeIDs(fx.dir + "/run-local/out.jsonl")))
        #expect(!(try String(contentsOfFile: run + "/out.jsonl", encoding: .utf8)).contains("forged"))
        let audit = try auditJSONL(run)
        #expect(audit.contains("a 3-byte message on lane \(abLane) that is not a frame of the lane protocol"))
        #expect(audit.contains("a frame for lane 999 on the port of lane \(abLane)"))
        #expect(audit.contains("a frame of type CREDIT on the data path of lane \(abLane)"))
        #expect(audit.contains("a frame of type DATA on the return path of lane \(abLane)"))
        #expect(audit.contains("worker 'edge2' has no lane on port \(sendsTo.split(separator: ":").last.map(String.init) ?? "?")"))
        #expect(audit.contains("worker 'edge' has no lane on port \(takesFrom.split(separator: ":").last.map(String.init) ?? "?")"))
        // The would-be reader got nothing of b's.
        #expect(try reader.receive() == nil)
    }

    @Test func aRelayedLanesKilledConsumer_returns_andUnderAtLeastOnceNothingIsLostOrRepeated() throws {
        let fx = try RemoteFixture("remote-relay-kill", extraWorkers: ["edge2"])
        try (fx.head("remote-relay-kill", workers: ["edge", "edge2"], top: "delivery: { mode: at-least-once, ack_timeout_ms: 500 }\n",
                    remote: "  down_after_ms: 600\n") + """
            stages:
              - { id: gen, kind: generator, config: { count: 9000, seed: 11, rate: 3000 } }
              - { id: a, kind: passthrough, inputs: [gen], placement: { worker: edge } }
              - { id: b, kind: passthrough, inputs: [a], placement: { worker: edge2 } }
              - { id: out, kind: file-sink, inputs: [b], config: { path: out.jsonl, append: true } }
            """).write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let w1 = try fx.startWorker("edge", log: fx.dir + "/edge.log")
        defer { if w1.isRunning { kill(w1.processIdentifier, SIGKILL) } }
        let first = try fx.startWorker("edge2", log: fx.dir + "/edge2-1.log")
        #expect(try killWorkerMidRun(first, run: run) >= 1000)
        let state = try poll("down", seconds: 10) {
            (try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []).first { $0["from"]?.stringValue == "a.out" }?["state"]?.stringValue ?? ""
        }
        #expect(state == "down")
        // The relay holds what a still sends (at least its heartbeats), and says for whom.
        let waiting = try poll(true, seconds: 10) {
            ((try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []).first { $0["from"]?.stringValue == "a.out" }?["relay"]?.stringValue ?? "")
                .contains("a data frame waits: b (worker edge2) is absent or slow")
        }
        #expect(waiting)
        let text = try runProcess(Paths.pipectl, ["lanes", "--run-dir", run]).stdout
        #expect(text.contains("lane 2 a.out -> b.in: relayed by the host; a data frame waits: b (worker edge2) is absent or slow"), "\(text)")
        let second = try fx.startWorker("edge2", log: fx.dir + "/edge2-2.log")
        defer { if second.isRunning { kill(second.processIdentifier, SIGKILL) } }
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(w1, timeout: 20) == 0)
        #expect(waitExit(second, timeout: 20) == 0)
        let ids = try envelopeIDs(run + "/out.jsonl")
        #expect(ids.count == 9000)
        #expect(Set(ids).count == 9000)
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "b")?["restarts"]?.intValue == 1)
        #expect(stage(s, "a")?["restarts"]?.intValue == 0)
    }

    @Test func aWorkerSendingGarbage_isCutOff_andTheOthersRunOn() throws {
        let fx = try RemoteFixture("remote-garbage", extraWorkers: ["spare"])
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let ctx = try ZMQContext()
        defer { ctx.terminate() }
        let d = try fx.clientSocket(.dealer, as: "spare", in: ctx)
        defer { d.close() }
        try d.connect(fx.endpoint)
        var rng = SystemRandomNumberGenerator()
        for i in 0..<120 { try d.send((0..<(i % 40 + 1)).map { _ in UInt8.random(in: 0...255, using: &rng) }) }
        var state = ""
        let deadline = Date().addingTimeInterval(10)
        while state != "cut-off" && Date() < deadline {
            usleep(100_000)
            let w = try pipectlJSON(["workers", "--run-dir", run])
            state = w["workers"]?.listValue?.first { $0["name"]?.stringValue == "spare" }?["state"]?.stringValue ?? ""
        }
        #expect(state == "cut-off")
        // Its key is refused from now on.
        let again = try fx.worker("spare")
        #expect(again.status == 2)
        #expect(again.stderr.contains("refused this key"), "\(again.stderr)")
        // The pipeline's own worker is unaffected.
        let worker = try fx.startWorker("edge", log: fx.dir + "/worker.log")
        #expect(waitExit(host, timeout: 90) == 0)
        #expect(waitExit(worker, timeout: 20) == 0)
        #expect(try envelopeIDs(run + "/out.jsonl").count == 5000)
        let audit = try auditJSONL(run)
        #expect(audit.contains("worker-cut-off"))
        #expect(audit.contains("worker 'spare' was cut off for sending garbage"))
    }

    @Test func aWorkerSendingOversizedEnvelopesAndGarbageOnItsOwnLane_isCutOff_andTheOthersRunOn() throws {
        // spare owns the lane pass2 -> out, so ZAP lets it reach the sink's input port: there it
        // sends an envelope over max_envelope_bytes, then a flood of what is not the protocol.
        let fx = try RemoteFixture("remote-flood", extraWorkers: ["spare"])
        try (fx.head("remote-flood", workers: ["edge", "spare"], top: "limits: { max_envelope_bytes: 4096 }\n") + """
            stages:
              - { id: gen, kind: generator, config: { count: 3000, seed: 11 } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: { worker: edge } }
              - { id: gen2, kind: generator, config: { count: 10, seed: 12 } }
              - { id: pass2, kind: passthrough, inputs: [gen2], placement: { worker: spare } }
              - { id: out, kind: file-sink, inputs: [pass, pass2], config: { path: out.jsonl } }
            """).write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let lane = try #require((try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []).first { $0["from"]?.stringValue == "pass2.out" })
        let port = try #require(lane["endpoint"]?.stringValue), laneID = UInt32(lane["id"]?.intValue ?? 0)
        let ctx = try ZMQContext()
        defer { ctx.terminate() }
        let push = try fx.clientSocket(.push, as: "spare", in: ctx)
        defer { push.close() }
        try push.connect(port)
        let big = Envelope(intent: "oversized", payload: [UInt8](repeating: 0x41, count: 8192))
        try push.send([big].withUnsafeBufferPointer { DataFrameBuilder.build(lane: laneID, seq: 1, envelopes: $0) })
        var rng = SystemRandomNumberGenerator()
        for i in 0..<150 { try push.send((0..<(i % 40 + 1)).map { _ in UInt8.random(in: 0...255, using: &rng) }) }
        let state = try poll("cut-off", seconds: 15) {
            (try pipectlJSON(["workers", "--run-dir", run]))["workers"]?.listValue?.first { $0["name"]?.stringValue == "spare" }?["state"]?.stringValue ?? ""
        }
        #expect(state == "cut-off")
        // Every frame is counted by the stage that refused it, also those after the cut-off.
        let refused = try poll(Int64(151), seconds: 10) {
            let st = try pipectlJSON(["status", "--run-dir", run])
            return (st["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == "out" }?["status"]?["refused_frames"]?.intValue ?? 0
        }
        #expect(refused == 151)
        let again = try fx.worker("spare")
        #expect(again.status == 2)
        #expect(again.stderr.contains("refused this key"), "\(again.stderr)")
        let audit = try auditJSONL(run)
        #expect(audit.contains("worker-cut-off"))
        // Refusals reach the host tallied per worker: the cut-off names how many it had by then.
        let cut = audit.split(separator: "\n").first { $0.contains("\"worker-cut-off\"") }.map(String.init) ?? ""
        let sent = cut.range(of: "worker 'spare' sent ").map { Int(cut[$0.upperBound...].prefix { $0.isNumber }) ?? 0 } ?? 0
        #expect(sent >= 100 && sent <= 151 && cut.contains(" bad frames"), "\(cut)")
        #expect(audit.contains("refused a malformed frame"))
        #expect(audit.contains("refused a DATA frame on lane \(laneID) holding what is not an envelope within the limits (envelope too large"))
        // The oversized envelope is dead-lettered (nothing is lost), not written to the sink.
        #expect(audit.contains("\"decision\":\"dead-letter\""))
        #expect(audit.contains("malformed envelope on lane \(laneID) from pass2.out: envelope too large: 8257 > limit 4096"))
        // The host and the other worker run on: edge's stage gets and passes on every envelope.
        let edge = try fx.startWorker("edge", log: fx.dir + "/edge.log")
        defer { if edge.isRunning { kill(edge.processIdentifier, SIGKILL) } }
        let passed = try poll(Int64(3000), seconds: 60) {
            let st = try pipectlJSON(["status", "--run-dir", run])
            return (st["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == "pass" }?["emitted"]?.intValue ?? 0
        }
        #expect(passed == 3000)
        #expect(host.isRunning)
        #expect(!(try String(contentsOfFile: run + "/out.jsonl", encoding: .utf8)).contains("oversized"))
    }

    @Test func aWorkerThatKeepsRunning_waitsForItsHost_andServesOneRunAfterAnother() throws {
        let fx = try RemoteFixture("remote-keep", count: 500)
        let w = try fx.startWorker("edge", extra: ["--keep-running", "--handshake-timeout", "1"], log: fx.dir + "/worker.log")
        defer { if w.isRunning { kill(w.processIdentifier, SIGKILL) } }
        // No host yet: the worker keeps trying instead of exiting.
        let waiting = poll(true, seconds: 20) { ((try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? "").contains("trying again in") }
        #expect(waiting && w.isRunning)
        for n in 1...2 {
            let run = fx.dir + "/run\(n)"
            let host = try startPipeline(fx.pipeline, runDir: run)
            defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
            if n == 2 {
                // A refused key still ends a worker that keeps running: retrying cannot help.
                let stranger = try fx.worker("stranger", extra: ["--keep-running"])
                #expect(stranger.status == 2 && stranger.stderr.contains("refused this key"), "\(stranger.stderr)")
            }
            #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
            #expect(try envelopeIDs(run + "/out.jsonl").count == 500)
        }
        #expect(w.isRunning)
        let log = (try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? ""
        #expect(log.components(separatedBy: "stages finished").count - 1 == 2, "\(log)")
    }

    /// deploy/: the systemd unit's ExecStart and the Kubernetes manifest's args are what
    /// `pipehost worker` accepts (paths swapped for real keys, the host for an absent one): the
    /// unit's worker gives up with exit 2 saying nobody answered (not a usage error, 64); the
    /// manifest's keeps trying.
    @Test func theDeployFiles_startAWorkerWithArgumentsItAccepts() throws {
        let dir = Paths.tempDir("deploy")
        for k in ["worker", "host"] { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/" + k]).status == 0) }
        let port = try reserveTCPPort(host: "127.0.0.1")
        let unit = try String(contentsOfFile: Paths.root + "/deploy/pipehost-worker.service", encoding: .utf8)
        let exec = try #require(unit.replacingOccurrences(of: "\\\n", with: " ").split(separator: "\n").first { $0.hasPrefix("ExecStart=") })
        var args = exec.dropFirst("ExecStart=".count).split(separator: " ").map(String.init)
        #expect(args.first == "/usr/local/bin/pipehost")
        args = Array(args.dropFirst()).map {
            $0.replacingOccurrences(of: "%i", with: "127.0.0.1:\(port)")
              .replacingOccurrences(of: "/etc/pipehost/worker/curve.key", with: dir + "/worker/curve.key")
              .replacingOccurrences(of: "/etc/pipehost/host-curve.pub", with: dir + "/host/curve.pub")
              .replacingOccurrences(of: "/var/lib/pipehost-worker", with: dir + "/state")
        }
        let r = try runProcess(Paths.pipehost, args + ["--handshake-timeout", "1"], timeout: 30)
        #expect(r.status == 2 && r.stderr.contains("no answer from tcp://127.0.0.1:\(port)"), "\(args) \(r.stderr)")
        // The manifest: valid YAML, a Deployment whose container args run a worker that stays up.
        let manifest = try String(contentsOfFile: Paths.root + "/deploy/k8s-worker.yaml", encoding: .utf8)
        let doc = try #require(try Yams.load(yaml: manifest) as? [String: Any])
        #expect(doc["kind"] as? String == "Deployment")
        let spec = (doc["spec"] as? [String: Any])?["template"] as? [String: Any]
        let container = (((spec?["spec"] as? [String: Any])?["containers"]) as? [[String: Any]])?.first
        let kargs = try #require(container?["args"] as? [String]).map {
            $0.replacingOccurrences(of: "tcp://pipehost.example.internal:7800", with: "tcp://127.0.0.1:\(port)")
              .replacingOccurrences(of: "/keys/curve.key", with: dir + "/worker/curve.key")
              .replacingOccurrences(of: "/keys/host-curve.pub", with: dir + "/host/curve.pub")
              .replacingOccurrences(of: "/state", with: dir + "/k8s-state")
        }
        #expect(kargs.contains("--keep-running"))
        let w = try RemoteFixture.spawn(kargs + ["--handshake-timeout", "1"], log: dir + "/k8s.log")
        defer { if w.isRunning { kill(w.processIdentifier, SIGKILL) } }
        let retrying = poll(true, seconds: 20) { ((try? String(contentsOfFile: dir + "/k8s.log", encoding: .utf8)) ?? "").contains("trying again in") }
        #expect(retrying && w.isRunning, "\((try? String(contentsOfFile: dir + "/k8s.log", encoding: .utf8)) ?? "")")
    }

    /// deploy/Dockerfile: its runtime stage installs the package of every shared library that
    /// pipehost and pipectl need outside the Swift runtime (which the image links statically)
    /// and nothing else but libstdc++6 (which that static runtime needs), puts them where the
    /// unit and the manifest run them, and runs as the manifest's user and group. Package names
    /// are Debian 12's, the image's base (other releases rename some: libssl3t64).
    @Test(.enabled(if: debianCodename() == "bookworm", "the image's runtime package names are Debian 12's"))
    func theImage_installsEveryLibraryTheBinariesNeed() throws {
        let text = try String(contentsOfFile: Paths.root + "/deploy/Dockerfile", encoding: .utf8)
        let lines = text.replacingOccurrences(of: "\\\n", with: " ").split(separator: "\n").map(String.init)
        let runtimeStart = try #require(lines.lastIndex { $0.hasPrefix("FROM ") })
        let runtime = lines[runtimeStart...]
        let install = try #require(runtime.first { $0.contains("apt-get install") })
        let packages = Set(install.components(separatedBy: "apt-get install").last?
            .components(separatedBy: "&&").first?.split(separator: " ").map(String.init).filter { !$0.hasPrefix("-") } ?? [])
        #expect(runtime.contains { $0.hasPrefix("COPY --from=build /out/ /usr/local/bin/") })
        #expect(runtime.contains("USER 10001:10001"))
        #expect(runtime.contains { $0.contains("groupadd --system --gid 10001 pipehost") && $0.contains("useradd --system --uid 10001 --gid 10001") })
        #expect(text.contains("--static-swift-stdlib --product pipehost") && text.contains("--static-swift-stdlib --product pipectl"))
        // The C libraries, as the binaries under test name them (the Swift runtime's own, and
        // glibc's, which every Debian image has, aside).
        let base: Set<String> = ["libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1"]
        var needed: Set<String> = []
        for exe in [Paths.pipehost, Paths.pipectl] {
            let r = try runProcess("/usr/bin/readelf", ["-d", exe])
            #expect(r.status == 0, "readelf (binutils): \(r.stderr)")
            for line in r.stdout.split(separator: "\n") where line.contains("(NEEDED)") {
                guard let open = line.lastIndex(of: "["), let close = line.lastIndex(of: "]"), open < close else { continue }
                let lib = String(line[line.index(after: open)..<close])
                if base.contains(lib) || lib.hasPrefix("ld-linux") || lib.hasPrefix("libswift") || lib.hasPrefix("libFoundation")
                    || lib.hasPrefix("lib_Foundation") || lib.hasPrefix("libdispatch") || lib.hasPrefix("libBlocksRuntime") { continue }
                needed.insert(lib)
            }
        }
        #expect(needed.isSuperset(of: ["libzmq.so.5", "libsodium.so.23", "libmagic.so.1", "libsqlite3.so.0"]), "\(needed.sorted())")
        var wanted: Set<String> = ["libstdc++6"]
        for lib in needed.sorted() {
            let r = try runProcess("/usr/bin/dpkg", ["-S", "*/" + lib])
            let package = r.stdout.split(separator: "\n").first.flatMap { $0.split(separator: ":").first }.map(String.init) ?? "?"
            #expect(packages.contains(package), "\(lib) comes from \(package), which deploy/Dockerfile does not install (it installs \(packages.sorted()))")
            wanted.insert(package)
        }
        #expect(packages == wanted, "deploy/Dockerfile installs \(packages.subtracting(wanted).sorted()) that no binary needs")
    }

    @Test func aKilledWorker_showsDown_andAReturningOneFinishesTheRunLosingNothing() throws {
        let fx = try RemoteFixture("remote-kill", count: 12000, rate: 3000,
                                   delivery: "{ mode: at-least-once, ack_timeout_ms: 500 }", downAfterMs: 600, metrics: true)
        let upSeries = #"pipehost_worker_up{pipeline="remote-test",worker="edge"}"#
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let first = try fx.startWorker("edge", log: fx.dir + "/worker1.log")
        // Let some flow (the worker shows up meanwhile), then kill the worker outright.
        #expect(try poll(true, seconds: 30, everyMs: 50) { try outReceived(run) >= 1000 })
        #expect(try waitSample(run, upSeries, 1) == 1)
        #expect(try killWorkerMidRun(first, run: run) >= 1000)
        // The host sees it go: the worker and the lanes to it are down.
        let state = try poll("down", seconds: 10) {
            (try pipectlJSON(["workers", "--run-dir", run]))["workers"]?.listValue?.first?["state"]?.stringValue ?? ""
        }
        #expect(state == "down")
        #expect(try waitSample(run, upSeries, 0) == 0)
        let lanesNow = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        #expect(lanesNow.first { $0["from"]?.stringValue == "gen.out" }?["state"]?.stringValue == "down")
        // A new worker takes the stage; what the dead one held is sent again, and the sink drops repeats.
        let second = try fx.startWorker("edge", log: fx.dir + "/worker2.log")
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(second, timeout: 20) == 0)
        let ids = try envelopeIDs(run + "/out.jsonl")
        #expect(ids.count == 12000)
        #expect(Set(ids).count == 12000)
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "pass")?["restarts"]?.intValue == 1)
    }
}
}

extension ExclusivePipelines {
@Suite("Remote workers admitted by grants", .serialized)
struct GrantPipelineTests {
    func issue(_ fx: RemoteFixture, key: String, stages: String, epoch: Int, expires: String = "1h", owner: String = "owner", file: String) throws -> String {
        let path = fx.dir + "/" + file
        let r = try runProcess(Paths.pipehost, ["grant", "issue", "--owner-key", fx.dir + "/keys/\(owner)/signing.key", "--worker", fx.dir + "/keys/\(key)/curve.pub",
                                                "--name", "edge", "--stages", stages, "--expires", expires, "--epoch", String(epoch), "-o", path])
        #expect(r.status == 0, "\(r.stderr)")
        return path
    }

    @Test func grants_admitTheirWorker_andRefuseStrangersOthersGrantsExpiryReplaysAndRevocation_acrossARestart() throws {
        let fx = try RemoteFixture("remote-grants", count: 2000, grants: true)
        let run = fx.dir + "/run"
        let g5 = try issue(fx, key: "edge", stages: "pass", epoch: 5, file: "g5.json")
        let g3 = try issue(fx, key: "edge", stages: "pass", epoch: 3, file: "g3.json")
        let old = try issue(fx, key: "edge", stages: "pass", epoch: 9, expires: "2020-01-01T00:00:00Z", file: "old.json")
        var host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let noGrant = try fx.worker("stranger")
        #expect(noGrant.status == 2 && noGrant.stderr.contains("unknown worker key and no grant"), "\(noGrant.stderr)")
        let stolen = try fx.worker("stranger", extra: ["--grant", g5])
        #expect(stolen.status == 2 && stolen.stderr.contains("grant for another worker's key"), "\(stolen.stderr)")
        let expired = try fx.worker("edge", extra: ["--grant", old])
        #expect(expired.status == 2 && expired.stderr.contains("grant expired at 2020-01-01"), "\(expired.stderr)")
        // Signed by a key remote.owners does not list (at a higher epoch, which must not count).
        let forged = try issue(fx, key: "edge", stages: "pass", epoch: 8, owner: "stranger", file: "forged.json")
        let untrusted = try fx.worker("edge", extra: ["--grant", forged])
        #expect(untrusted.status == 2 && untrusted.stderr.contains("grant not signed by a trusted owner"), "\(untrusted.stderr)")
        let good = try fx.worker("edge", extra: ["--grant", g5])
        #expect(good.status == 0, "\(good.stderr)")
        #expect(waitExit(host, timeout: 60) == 0)
        #expect(try envelopeIDs(run + "/out.jsonl").count == 2000)

        // The host again, same run directory: the epoch watermark survived.
        host = try startPipeline(fx.pipeline, runDir: run)
        let replay = try fx.worker("edge", extra: ["--grant", g3])
        #expect(replay.status == 2 && replay.stderr.contains("replayed grant: epoch 3 is below the highest seen for this worker (5)"), "\(replay.stderr)")
        // The owner revokes (epoch 6, no stages): epoch 5 no longer admits the worker.
        let revoke = try issue(fx, key: "edge", stages: "", epoch: 6, file: "g6.json")
        let applied = try runProcess(Paths.pipectl, ["grant", "apply", revoke, "--run-dir", run])
        #expect(applied.status == 0 && applied.stdout.contains("revoked"), "\(applied.stdout)\(applied.stderr)")
        let revoked = try fx.worker("edge", extra: ["--grant", g5])
        #expect(revoked.status == 2 && revoked.stderr.contains("epoch 5 is below the highest seen for this worker (6)"), "\(revoked.stderr)")
        // A new grant at a higher epoch admits it again.
        let g7 = try issue(fx, key: "edge", stages: "pass", epoch: 7, file: "g7.json")
        let back = try fx.worker("edge", extra: ["--grant", g7])
        #expect(back.status == 0, "\(back.stderr)")
        #expect(waitExit(host, timeout: 60) == 0)
        let audit = try auditJSONL(run)
        for reason in ["unknown worker key and no grant", "grant for another worker's key", "grant expired at", "grant not signed by a trusted owner", "replayed grant: epoch 3",
                       "grant-revoked", "epoch 5 is below the highest seen for this worker (6)"] {
            #expect(audit.contains(reason), "audit log lacks '\(reason)'")
        }
    }

    @Test func aGrantNamingSomeOfAWorkersStages_letsItRunOnlyThose() throws {
        let fx = try RemoteFixture("remote-grant-part", count: 500, grants: true)
        // pass and pass2 are both placed on edge; the grant names pass only.
        let yaml = try String(contentsOfFile: fx.pipeline, encoding: .utf8)
            + "\n  - { id: gen2, kind: generator, config: { count: 10 } }\n  - { id: pass2, kind: passthrough, inputs: [gen2], placement: { worker: edge } }\n  - { id: out2, kind: null-sink, inputs: [pass2] }\n"
        try yaml.write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let g = try issue(fx, key: "edge", stages: "pass", epoch: 1, file: "g1.json")
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let worker = try fx.startWorker("edge", extra: ["--grant", g], log: fx.dir + "/worker.log")
        defer { if worker.isRunning { kill(worker.processIdentifier, SIGKILL) } }
        let told = poll(true, seconds: 30) { ((try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? "").contains("stages: pass\n") }
        #expect(told, "\((try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? "")")
        // Asking for pass2 anyway, with the admitted key: refused with the reason.
        #expect(try fx.askForStage("pass2", as: "edge") == .abort)
        #expect(try poll(Int64(500), seconds: 30) { try outReceived(run) } == 500)
        let audit = try auditJSONL(run)
        #expect(audit.contains("worker 'edge' asked for stage 'pass2', which its grant does not name"))
        let st = try pipectlJSON(["status", "--run-dir", run])
        #expect((st["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == "pass2" }?["received"]?.intValue ?? 0 == 0)
    }

    @Test func aRevocationAndAnExpiry_stopARunningWorker() throws {
        let fx = try RemoteFixture("remote-revoke", count: 40000, rate: 4000, grants: true)
        let run = fx.dir + "/run"
        let g5 = try issue(fx, key: "edge", stages: "pass", epoch: 5, file: "g5.json")
        let host = try startPipeline(fx.pipeline, runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        func passState() throws -> String {
            let st = try pipectlJSON(["status", "--run-dir", run])
            return (st["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == "pass" }?["state"]?.stringValue ?? ""
        }
        func waitFor(_ what: (String) -> Bool, _ seconds: Double) throws -> String {
            var s = try passState()
            let deadline = Date().addingTimeInterval(seconds)
            while !what(s) && Date() < deadline { usleep(100_000); s = try passState() }
            return s
        }
        let first = try fx.startWorker("edge", extra: ["--grant", g5], log: fx.dir + "/w1.log")
        #expect(["busy", "idle"].contains(try waitFor({ $0 == "busy" || $0 == "idle" }, 20)))
        // The owner revokes while it runs: its runner is aborted, the stage waits for a worker.
        let revoke = try issue(fx, key: "edge", stages: "", epoch: 6, file: "g6.json")
        let applied = try runProcess(Paths.pipectl, ["grant", "apply", revoke, "--run-dir", run])
        #expect(applied.stdout.contains("revoked; aborted pass"), "\(applied.stdout)\(applied.stderr)")
        // Its runner was told to stop; the worker process ends (its supervisor would start it again).
        #expect(waitExit(first, timeout: 20) == 0)
        #expect(try waitFor({ $0.hasPrefix("waiting for worker") }, 10).hasPrefix("waiting for worker"))
        // A grant that expires in 5 s: the worker runs, then the host stops it when it expires.
        let short = try issue(fx, key: "edge", stages: "pass", epoch: 7, expires: "5s", file: "g7.json")
        let second = try fx.startWorker("edge", extra: ["--grant", short], log: fx.dir + "/w2.log")
        #expect(["busy", "idle"].contains(try waitFor({ $0 == "busy" || $0 == "idle" }, 20)))
        #expect(waitExit(second, timeout: 20) == 0)
        #expect(try waitFor({ $0.hasPrefix("waiting for worker") }, 10).hasPrefix("waiting for worker"))
        // A fresh grant finishes the run.
        let g8 = try issue(fx, key: "edge", stages: "pass", epoch: 8, file: "g8.json")
        let third = try fx.startWorker("edge", extra: ["--grant", g8], log: fx.dir + "/w3.log")
        #expect(waitExit(host, timeout: 60) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(third, timeout: 20) == 0)
        let audit = try auditJSONL(run)
        #expect(audit.contains("grant-revoked"))
        #expect(audit.contains("grant epoch 7 for worker 'edge' expired"))
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "pass")?["restarts"]?.intValue == 2)
    }
}
}

@Suite("Grants")
struct GrantTests {
    @Test func aGrantVerifiesWithItsOwner_andNotWhenAnyFieldChanges() throws {
        let owner = try SigningKey.generate(), other = try SigningKey.generate()
        let key = try ZMQCurve.keyPair().publicKey
        let g = Grant.issue(owner: owner, worker: key, name: "edge", stages: ["b", "a"], expires: 2_000_000_000, epoch: 4)
        #expect(g.stages == ["a", "b"])
        #expect(g.verify(owners: [owner.publicKey]))
        #expect(!g.verify(owners: [other.publicKey]))
        let back = try Grant.parse(Array(g.text.utf8))
        #expect(back == g)
        #expect(back.verify(owners: [other.publicKey, owner.publicKey]))
        var t = g; t.stages = ["a", "b", "c"]; #expect(!t.verify(owners: [owner.publicKey]))
        t = g; t.epoch = 5; #expect(!t.verify(owners: [owner.publicKey]))
        t = g; t.expires += 1; #expect(!t.verify(owners: [owner.publicKey]))
        t = g; t.name = "edge2"; #expect(!t.verify(owners: [owner.publicKey]))
        t = g; t.worker = try ZMQCurve.keyPair().publicKey; #expect(!t.verify(owners: [owner.publicKey]))
        // Signed by another key that claims to be the owner.
        t = g; t.signature = other.sign(g.signedBytes); #expect(!t.verify(owners: [owner.publicKey]))
        #expect(Grant.issue(owner: owner, worker: key, name: "edge", stages: [], expires: 1, epoch: 9).isRevocation)
        #expect(throws: SealError.self) { try Grant.parse(Array("{\"v\":1}".utf8)) }
        #expect(throws: SealError.self) { try Grant.parse(Array("not json".utf8)) }
        #expect(throws: SealError.self) { try Grant.parse([UInt8](repeating: 0x20, count: 70_000)) }
    }
}

@Suite("Remote workers: configuration")
struct RemoteConfigTests {
    /// `pipehost run` of `yaml`, expected to be refused at start (no worker ever connects).
    func runRefused(_ yaml: String, _ tag: String) throws -> ProcResult {
        let dir = Paths.tempDir(tag)
        try yaml.write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        return try runProcess(Paths.pipehost, ["run", dir + "/p.yaml", "--run-dir", dir + "/run"], timeout: 30)
    }

    func validate(_ yaml: String, _ tag: String) throws -> ProcResult {
        let dir = Paths.tempDir(tag)
        let f = dir + "/p.yaml"
        try yaml.write(toFile: f, atomically: true, encoding: .utf8)
        return try runProcess(Paths.pipectl, ["validate", f])
    }

    @Test func placementOnAWorkerNeedsARemoteSectionThatListsIt() throws {
        let base = """
            stages:
              - id: gen
                kind: generator
              - id: pass
                kind: passthrough
                inputs: [gen]
                placement: { worker: edg }
            """
        let none = try validate(base, "rv-none")
        #expect(none.status == 1)
        #expect((none.stdout + none.stderr).contains("p.yaml:4:9: stage 'pass': placement { worker: edg } needs a `remote:` section"), "\(none.stdout)\(none.stderr)")
        let listed = try validate("""
            remote:
              listen: tcp://127.0.0.1:7800
              key: host.key
              workers:
                edge: { key: edge.pub }
            """ + "\n" + base, "rv-listed")
        #expect(listed.status == 1)
        #expect((listed.stdout + listed.stderr).contains("which remote.workers does not list (did you mean 'edge'?)"), "\(listed.stdout)\(listed.stderr)")
    }

    @Test func badRemoteSections_nameLineColumnAndWhatWasExpected() throws {
        let r = try validate("""
            remote:
              listen: 127.0.0.1:7800
              workerz: {}
            stages:
              - id: gen
                kind: generator
            """, "rv-bad")
        #expect(r.status == 1)
        let text = r.stdout + r.stderr
        #expect(text.contains("p.yaml:2:11: remote.listen must be tcp://HOST:PORT"), "\(text)")
        #expect(text.contains("p.yaml:3:3: unknown remote key 'workerz' (did you mean 'workers'?)"), "\(text)")
        #expect(text.contains("remote needs key:"), "\(text)")
        let wild = try validate("""
            remote: { listen: "tcp://0.0.0.0:7800", insecure: true }
            stages:
              - id: gen
                kind: generator
            """, "rv-wild")
        #expect((wild.stdout + wild.stderr).contains("say advertise: ADDRESS"))
    }

    @Test func aLoopThroughARemoteWorker_isRefusedAtStart() throws {
        let r = try runRefused("""
            remote:
              listen: tcp://127.0.0.1:7800
              insecure: true
              workers: { a: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" }
            stages:
              - { id: gen, kind: generator, config: { count: 10 } }
              - id: relay
                kind: passthrough
                inputs: [gen, { from: hop.again, loop_back: { max_hops: 3 } }]
              - { id: hop, kind: hop, inputs: [relay], placement: { worker: a } }
              - { id: out, kind: null-sink, inputs: [hop] }
            """, "rv-loop")
        #expect(r.status != 0)
        #expect(r.stderr.contains("is inside a loop and crosses to a remote worker"), "\(r.stderr)")
    }
}

@Suite("ZAP and CURVE helpers")
struct ZAPTests {
    @Test func zapRequestParsesAndRepliesPerRFC27() throws {
        let kp = try ZMQCurve.keyPair()
        #expect(ZMQCurve.publicKey(secretKey: kp.secretKey) == kp.publicKey)
        #expect(ZMQCurve.publicKey(secretKey: "short") == nil)
        #expect(ZMQCurve.isKey(kp.publicKey))
        #expect(!ZMQCurve.isKey(String(repeating: "~", count: 41)))
        var raw = [UInt8](repeating: 0, count: 32)
        for i in raw.indices { raw[i] = UInt8(i * 7 & 0xff) }
        let parts: [[UInt8]] = [[0, 1, 2, 3, 4], [], Array("1.0".utf8), Array("7".utf8), Array("pipehost".utf8), Array("10.0.0.2".utf8),
                                [], Array("CURVE".utf8), raw]
        let req = try #require(ZAPRequest.parse(parts))
        #expect(req.domain == "pipehost")
        #expect(req.address == "10.0.0.2")
        #expect(req.mechanism == "CURVE")
        #expect(req.clientKey == ZMQCurve.z85(raw))
        #expect(req.clientKey?.count == 40)
        let ok = req.reply(allow: "edge", reason: "OK")
        #expect(ok == [[0, 1, 2, 3, 4], [], Array("1.0".utf8), Array("7".utf8), Array("200".utf8), Array("OK".utf8), Array("edge".utf8), []])
        let no = req.reply(allow: nil, reason: "unknown worker key")
        #expect(no[4] == Array("400".utf8))
        #expect(no[6] == [])
        // Another version, or no delimiter: not ZAP.
        #expect(ZAPRequest.parse([[1], [], Array("2.0".utf8), [], [], [], [], Array("NULL".utf8)]) == nil)
        #expect(ZAPRequest.parse([Array("1.0".utf8)]) == nil)
    }
}

@Suite("CURVE key files")
struct CurveKeyFileTests {
    @Test func aSecretKeyOthersCanRead_isRefused_andAGoodOneGivesItsPublicKey() throws {
        let dir = Paths.tempDir("curve-keys")
        let r = try runProcess(Paths.pipehost, ["keygen", "-o", dir])
        #expect(r.status == 0)
        let kp = try CurveKeys.loadSecret(dir + "/curve.key")
        #expect(kp.publicKey == (try CurveKeys.loadPublic(dir + "/curve.pub", base: "/")))
        #expect(try CurveKeys.loadPublic("curve.pub", base: dir) == kp.publicKey)
        #expect(try CurveKeys.loadPublic(kp.publicKey, base: "/nonexistent") == kp.publicKey)
        chmod(dir + "/curve.key", 0o644)
        #expect(throws: RuntimeError.self) { try CurveKeys.loadSecret(dir + "/curve.key") }
        chmod(dir + "/curve.key", 0o440)
        #expect(try CurveKeys.loadSecret(dir + "/curve.key") == kp)
        // A signing key is not a CURVE key.
        #expect(throws: RuntimeError.self) { try CurveKeys.loadSecret(dir + "/signing.key") }
        #expect(throws: RuntimeError.self) { try CurveKeys.loadPublic(dir + "/signing.pub", base: "/") }
    }
}

/// Two network namespaces joined by a veth pair: the host in one, the worker in the other, on
/// addresses that exist only inside them. Made and removed by the test.
struct NetnsPair {
    let host: String, worker: String
    let hostAddress = "10.231.7.1", workerAddress = "10.231.7.2"
    var hostVeth: String { "pth\(getpid() % 100000)" }
    var workerVeth: String { "ptw\(getpid() % 100000)" }

    static func ip(_ args: [String]) throws -> ProcResult { try runProcess("/usr/sbin/ip", args, timeout: 20) }

    /// nil (and a line saying why the test is skipped) where namespaces cannot be made.
    static func make(for test: String) throws -> NetnsPair? {
        let pair = NetnsPair(host: "pt-host-\(getpid())", worker: "pt-work-\(getpid())")
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") else {
            FileHandle.standardError.write(Data("\(test) skipped: iproute2 (/usr/sbin/ip) is not installed\n".utf8)); return nil
        }
        let add = try ip(["netns", "add", pair.host])
        guard add.status == 0 else {
            FileHandle.standardError.write(Data("\(test) skipped: cannot make a network namespace (\(add.stderr.trimmingCharacters(in: .whitespacesAndNewlines)))\n".utf8))
            return nil
        }
        for step in [["netns", "add", pair.worker],
                     ["link", "add", pair.hostVeth, "type", "veth", "peer", "name", pair.workerVeth],
                     ["link", "set", pair.hostVeth, "netns", pair.host], ["link", "set", pair.workerVeth, "netns", pair.worker],
                     ["-n", pair.host, "addr", "add", pair.hostAddress + "/24", "dev", pair.hostVeth],
                     ["-n", pair.worker, "addr", "add", pair.workerAddress + "/24", "dev", pair.workerVeth],
                     ["-n", pair.host, "link", "set", pair.hostVeth, "up"], ["-n", pair.worker, "link", "set", pair.workerVeth, "up"],
                     ["-n", pair.host, "link", "set", "lo", "up"], ["-n", pair.worker, "link", "set", "lo", "up"]] {
            let r = try ip(step)
            guard r.status == 0 else {
                pair.remove()
                FileHandle.standardError.write(Data("\(test) skipped: ip \(step.joined(separator: " ")) failed (\(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines)))\n".utf8))
                return nil
            }
        }
        return pair
    }

    func remove() {
        _ = try? Self.ip(["netns", "del", host])
        _ = try? Self.ip(["netns", "del", worker])
        _ = try? Self.ip(["netns", "del", second])
    }

    /// A second worker namespace, on a subnet of its own (10.231.8.0/24) whose gateway is the
    /// host namespace: its worker reaches the host's address through it. False (and a line saying
    /// why) where it cannot be made.
    var second: String { "pt-wk2-\(getpid())" }
    let secondAddress = "10.231.8.2"
    func addSecondWorker(for test: String) throws -> Bool {
        let hv = "pt2h\(getpid() % 100000)", wv = "pt2w\(getpid() % 100000)"
        for step in [["netns", "add", second], ["link", "add", hv, "type", "veth", "peer", "name", wv],
                     ["link", "set", hv, "netns", host], ["link", "set", wv, "netns", second],
                     ["-n", host, "addr", "add", "10.231.8.1/24", "dev", hv], ["-n", second, "addr", "add", secondAddress + "/24", "dev", wv],
                     ["-n", host, "link", "set", hv, "up"], ["-n", second, "link", "set", wv, "up"], ["-n", second, "link", "set", "lo", "up"],
                     ["-n", second, "route", "add", "default", "via", "10.231.8.1"]] {
            let r = try Self.ip(step)
            guard r.status == 0 else {
                FileHandle.standardError.write(Data("\(test) skipped: ip \(step.joined(separator: " ")) failed (\(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines)))\n".utf8))
                return false
            }
        }
        return true
    }

    /// Cuts (or restores) the second worker namespace's link.
    func secondLink(up: Bool) throws {
        _ = try Self.ip(["-n", second, "link", "set", "pt2w\(getpid() % 100000)", up ? "up" : "down"])
        // A link going down takes the routes through it along; the default route comes back by hand.
        if up { _ = try Self.ip(["-n", second, "route", "replace", "default", "via", "10.231.8.1"]) }
    }

    /// `pipehost worker` as `key` inside namespace `ns`, connecting to the host's address.
    func spawnWorker(_ fx: RemoteFixture, _ key: String, in ns: String, log: String) throws -> Process {
        let w = Process()
        w.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        w.arguments = ["netns", "exec", ns, Paths.pipehost, "worker", "--connect", "tcp://\(hostAddress):\(fx.port)", "--key", fx.dir + "/keys/\(key)/curve.key",
                       "--server-key", fx.dir + "/keys/host/curve.pub", "--run-dir", fx.dir + "/w-" + key]
        w.standardOutput = FileHandle.nullDevice
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        w.standardError = FileHandle(forWritingAtPath: log)
        try w.run()
        return w
    }

    /// Makes the fixture's pipeline listen on the host namespace's veth address.
    func listenInside(_ fx: RemoteFixture) throws {
        let yaml = try String(contentsOfFile: fx.pipeline, encoding: .utf8).replacingOccurrences(of: "tcp://127.0.0.1:", with: "tcp://\(hostAddress):")
        try yaml.write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
    }

    /// `pipehost worker` in the worker namespace as `key` (with CURVE unless `--insecure`), to its end.
    func runWorker(_ fx: RemoteFixture, _ key: String, extra: [String] = []) throws -> ProcResult {
        var args = ["netns", "exec", worker, Paths.pipehost, "worker", "--connect", "tcp://\(hostAddress):\(fx.port)", "--run-dir", fx.dir + "/w-" + key,
                    "--handshake-timeout", "3"]
        if !extra.contains("--insecure") { args += ["--key", fx.dir + "/keys/\(key)/curve.key", "--server-key", fx.dir + "/keys/host/curve.pub"] }
        return try runProcess("/usr/sbin/ip", args + extra, timeout: 90)
    }

    /// Runs the fixture's pipeline in the host namespace, listening on its veth address (the
    /// fixture's free loopback port is free there too), and its worker in the other namespace.
    /// `python`: the Python reference worker (Tools/ref_worker.py) instead of `pipehost worker`.
    func start(_ fx: RemoteFixture, run: String, python: String? = nil) throws -> (host: Process, worker: Process) {
        try listenInside(fx)
        let host = try startPipeline(fx.pipeline, runDir: run, netns: self.host)
        let w = Process()
        w.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        let keys = ["--key", fx.dir + "/keys/edge/curve.key", "--server-key", fx.dir + "/keys/host/curve.pub"]
        if let python {
            w.arguments = ["netns", "exec", worker, python, Paths.root + "/Tools/ref_worker.py", "--connect", "tcp://\(hostAddress):\(fx.port)"] + keys
        } else {
            w.arguments = ["netns", "exec", worker, Paths.pipehost, "worker", "--connect", "tcp://\(hostAddress):\(fx.port)"] + keys + ["--run-dir", fx.dir + "/w"]
        }
        w.standardOutput = FileHandle.nullDevice
        _ = FileManager.default.createFile(atPath: fx.dir + "/worker.log", contents: nil)
        w.standardError = FileHandle(forWritingAtPath: fx.dir + "/worker.log")
        try w.run()
        return (host, w)
    }

    /// Cuts (or restores) the link on the worker's side.
    func link(up: Bool) throws { _ = try Self.ip(["-n", worker, "link", "set", workerVeth, up ? "up" : "down"]) }
}

extension ExclusivePipelines {
@Suite("Remote workers across network namespaces", .serialized)
struct NetnsTests {
    /// Host, edge and edge2 each in a namespace of their own; the lane from edge's stage to
    /// edge2's is relayed by the host across both links. A 2 s cut of edge2's link loses nothing
    /// and keeps the order.
    @Test func workersInTwoNamespaces_passALaneThroughTheHost_inOrder_acrossACutOfOne() throws {
        guard let ns = try NetnsPair.make(for: "netns two workers") else { return }
        defer { ns.remove() }
        guard try ns.addSecondWorker(for: "netns two workers") else { return }
        let fx = try RemoteFixture("remote-netns-two", extraWorkers: ["edge2"], count: 6000, rate: 2000, downAfterMs: 500)
        try (fx.head("remote-netns-two", workers: ["edge", "edge2"], remote: "  down_after_ms: 500\n") + """
            stages:
              - { id: gen, kind: generator, config: { count: 6000, seed: 21, rate: 2000 } }
              - { id: a, kind: passthrough, inputs: [gen], placement: { worker: edge } }
              - { id: b, kind: passthrough, inputs: [a], placement: { worker: edge2 } }
              - { id: out, kind: file-sink, inputs: [b], config: { path: out.jsonl } }
            """).write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        try ns.listenInside(fx)
        let run = fx.dir + "/run"
        let host = try startPipeline(fx.pipeline, runDir: run, netns: ns.host)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let w1 = try ns.spawnWorker(fx, "edge", in: ns.worker, log: fx.dir + "/edge.log")
        let w2 = try ns.spawnWorker(fx, "edge2", in: ns.second, log: fx.dir + "/edge2.log")
        defer { for p in [w1, w2] where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        #expect(try poll(true, seconds: 30, everyMs: 50) { try outReceived(run) >= 1000 })
        let workers = try pipectlJSON(["workers", "--run-dir", run])["workers"]?.listValue ?? []
        #expect(workers.first { $0["name"]?.stringValue == "edge" }?["address"]?.stringValue == ns.workerAddress)
        #expect(workers.first { $0["name"]?.stringValue == "edge2" }?["address"]?.stringValue == ns.secondAddress)
        let relayed = try pipectlJSON(["lanes", "--run-dir", run]).listValue?.first { $0["from"]?.stringValue == "a.out" }
        #expect(relayed?["transport"]?.stringValue == "tcp" && relayed?["relay"] != nil)
        try ns.secondLink(up: false)
        sleep(2)
        let atCut = try outReceived(run)
        try ns.secondLink(up: true)
        #expect(waitExit(host, timeout: 120) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(w1, timeout: 30) == 0)
        #expect(waitExit(w2, timeout: 30) == 0)
        #expect(atCut < 6000)
        // Everything, in the generator's order: the same ids as the pipeline run in one process.
        let local = """
            pipeline: local
            stages:
              - { id: gen, kind: generator, config: { count: 6000, seed: 21 } }
              - { id: out, kind: file-sink, inputs: [gen], config: { path: out.jsonl } }
            """
        let (r, _) = try runPipeline(writeTemp(local, "two-ns-local.yaml"), runDir: fx.dir + "/run-local")
        #expect(r.status == 0)
        #expect(try envelopeIDs(run + "/out.jsonl") == (try envelopeIDs(fx.dir + "/run-local/out.jsonl")))
    }

    @Test func aPipelineSpanningTwoNamespaces_deliversEverythingInOrder_acrossACutLink() throws {
        guard let ns = try NetnsPair.make(for: "netns remote worker") else { return }
        defer { ns.remove() }
        let fx = try RemoteFixture("remote-netns", count: 8000, rate: 2000, downAfterMs: 500)
        let run = fx.dir + "/run"
        let (host, w) = try ns.start(fx, run: run)
        defer { for p in [host, w] where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        func received() throws -> Int64 { try outReceived(run) }
        var deadline = Date().addingTimeInterval(30)
        while try received() < 1000 && Date() < deadline { usleep(50_000) }
        #expect(try received() >= 1000)
        // The worker's address is the one inside its namespace.
        let workers = try pipectlJSON(["workers", "--run-dir", run])
        #expect(workers["workers"]?.listValue?.first?["address"]?.stringValue == ns.workerAddress)
        // Cut the link for 2 s: the host sees the worker's lanes go down, then the flow resumes.
        try ns.link(up: false)
        var sawDown = false
        deadline = Date().addingTimeInterval(2)
        while Date() < deadline {
            let l = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
            if l.first(where: { $0["from"]?.stringValue == "gen.out" })?["state"]?.stringValue == "down" { sawDown = true }
            usleep(100_000)
        }
        let atCut = try received()
        try ns.link(up: true)
        #expect(sawDown)
        #expect(waitExit(host, timeout: 90) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(w, timeout: 30) == 0, "\((try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? "")")
        #expect(atCut < 8000)
        // Everything arrived, in the generator's order.
        let ids = try envelopeIDs(run + "/out.jsonl")
        let local = try String(contentsOfFile: fx.pipeline, encoding: .utf8)
            .replacingOccurrences(of: "placement: { worker: edge }", with: "placement: in-process")
            .replacingOccurrences(of: "rate: 2000", with: "rate: 0")
        try local.write(toFile: fx.dir + "/local.yaml", atomically: true, encoding: .utf8)
        let (r, _) = try runPipeline(fx.dir + "/local.yaml", runDir: fx.dir + "/run-local")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(ids == (try envelopeIDs(fx.dir + "/run-local/out.jsonl")))
        #expect(ids.count == 8000)
    }

    @Test func acrossNamespaces_strangersPlaintextStolenAndReplayedGrantsAreRefusedAndAudited() throws {
        guard let ns = try NetnsPair.make(for: "netns refusals") else { return }
        defer { ns.remove() }
        let fx = try RemoteFixture("remote-netns-refuse", count: 2000, grants: true)
        try ns.listenInside(fx)
        func grant(_ epoch: Int) throws -> String {
            let path = fx.dir + "/g\(epoch).json"
            let r = try runProcess(Paths.pipehost, ["grant", "issue", "--owner-key", fx.dir + "/keys/owner/signing.key", "--worker", fx.dir + "/keys/edge/curve.pub",
                                                    "--name", "edge", "--stages", "pass", "--expires", "1h", "--epoch", String(epoch), "-o", path])
            #expect(r.status == 0, "\(r.stderr)")
            return path
        }
        let g5 = try grant(5), g3 = try grant(3)
        let run = fx.dir + "/run"
        var host = try startPipeline(fx.pipeline, runDir: run, netns: ns.host)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let stranger = try ns.runWorker(fx, "stranger")
        #expect(stranger.status == 2 && stranger.stderr.contains("unknown worker key and no grant"), "\(stranger.stderr)")
        let plaintext = try ns.runWorker(fx, "edge", extra: ["--insecure", "--name", "edge"])
        #expect(plaintext.status == 2 && plaintext.stderr.contains("expects CURVE"), "\(plaintext.stderr)")
        let stolen = try ns.runWorker(fx, "stranger", extra: ["--grant", g5])
        #expect(stolen.status == 2 && stolen.stderr.contains("grant for another worker's key"), "\(stolen.stderr)")
        let good = try ns.runWorker(fx, "edge", extra: ["--grant", g5])
        #expect(good.status == 0, "\(good.stderr)")
        #expect(waitExit(host, timeout: 60) == 0)
        // The host again, same run directory: the lower epoch is still refused.
        host = try startPipeline(fx.pipeline, runDir: run, netns: ns.host)
        let replay = try ns.runWorker(fx, "edge", extra: ["--grant", g3])
        #expect(replay.status == 2 && replay.stderr.contains("replayed grant: epoch 3 is below the highest seen for this worker (5)"), "\(replay.stderr)")
        #expect(try ns.runWorker(fx, "edge", extra: ["--grant", g5]).status == 0)
        #expect(waitExit(host, timeout: 60) == 0)
        let audit = try auditJSONL(run)
        // (Across a real link the plaintext client's failure reaches the host as a broken handshake
        // rather than a mechanism mismatch; either way it is refused and audited.)
        for reason in ["unknown worker key and no grant", "handshake failed on tcp://\(ns.hostAddress):\(fx.port)", "grant for another worker's key",
                       "replayed grant: epoch 3"] {
            #expect(audit.contains(reason), "audit log lacks '\(reason)'")
        }
        // Addresses in the audit log are the worker namespace's.
        #expect(audit.contains(ns.workerAddress))
    }

    @Test func aLinkCutLongerThanTheHeartbeatTimeout_losesNothingUnderAtLeastOnce() throws {
        guard let ns = try NetnsPair.make(for: "netns long cut") else { return }
        defer { ns.remove() }
        let fx = try RemoteFixture("remote-netns-long", count: 6000, rate: 1000, delivery: "{ mode: at-least-once, ack_timeout_ms: 1000 }",
                                   downAfterMs: 1000)
        let run = fx.dir + "/run"
        let (host, w) = try ns.start(fx, run: run)
        defer { for p in [host, w] where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        func received() throws -> Int64 { try outReceived(run) }
        let deadline = Date().addingTimeInterval(30)
        while try received() < 1500 && Date() < deadline { usleep(50_000) }
        // 7 s: ZeroMQ's heartbeats (5 s) drop the connections and what was queued on them.
        try ns.link(up: false)
        sleep(7)
        try ns.link(up: true)
        #expect(waitExit(host, timeout: 120) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        #expect(waitExit(w, timeout: 30) == 0, "\((try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? "")")
        let ids = try envelopeIDs(run + "/out.jsonl")
        #expect(Set(ids).count == 6000)
        #expect(ids.count == 6000)
        // The same runner went on after the cut (its route survived): no restart.
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(stage(s, "pass")?["restarts"]?.intValue == 0)
    }

    @Test(arguments: [false, true])
    func thePythonReferenceWorker_followsTheTcpLossRules_acrossALongCut(atLeastOnce: Bool) throws {
        // At-most-once: what was in flight during the cut is lost, but both lanes flow again and
        // both ends learn the end, so the run finishes. At-least-once: nothing is lost (the source
        // sends again what the Python stage never acknowledged) and nothing is written twice.
        guard let python = pythonWithZMQ() else {
            FileHandle.standardError.write(Data("python loss-rules test skipped: no python3 with pyzmq\n".utf8)); return
        }
        guard let ns = try NetnsPair.make(for: "netns python cut") else { return }
        defer { ns.remove() }
        let fx = try RemoteFixture("remote-netns-python", count: 6000, rate: 1000,
                                   delivery: atLeastOnce ? "{ mode: at-least-once, ack_timeout_ms: 1000 }" : nil, downAfterMs: 1000)
        let text = try String(contentsOfFile: fx.pipeline, encoding: .utf8)
        #expect(text.contains("    kind: passthrough\n"))
        try text.replacingOccurrences(of: "    kind: passthrough\n", with: "    kind: external\n    config: { program: tag, settings: { via: python } }\n")
            .write(toFile: fx.pipeline, atomically: true, encoding: .utf8)
        let run = fx.dir + "/run"
        let (host, w) = try ns.start(fx, run: run, python: python)
        defer { for p in [host, w] where p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        #expect(try poll(true, seconds: 30, everyMs: 50) { try outReceived(run) >= 1500 })
        try ns.link(up: false)
        let before = try outReceived(run)
        sleep(7)
        try ns.link(up: true)
        #expect(waitExit(host, timeout: 120) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        let log = (try? String(contentsOfFile: fx.dir + "/worker.log", encoding: .utf8)) ?? ""
        #expect(waitExit(w, timeout: 30) == 0, "\(log)")
        let ids = try envelopeIDs(run + "/out.jsonl")
        #expect(Set(ids).count == ids.count && ids.count <= 6000)
        #expect(ids.count > Int(before) + 1000, "the lanes flowed again after the cut (\(before) before it, \(ids.count) in all)")
        if atLeastOnce { #expect(ids.count == 6000) }
        let out = try String(contentsOfFile: run + "/out.jsonl", encoding: .utf8)
        #expect(out.contains("\"via\":\"python\""))
    }
}
}

/// A python3 that has pyzmq (Debian's python3-zmq, which `.ci/run` installs), or nil.
func pythonWithZMQ() -> String? {
    var candidates = ["/usr/bin/python3", "/usr/local/bin/python3"]
    if let path = ProcessInfo.processInfo.environment["PATH"] {
        candidates += path.split(separator: ":").map { $0 + "/python3" }
    }
    for c in candidates where FileManager.default.isExecutableFile(atPath: c) {
        if let r = try? runProcess(c, ["-c", "import zmq; assert zmq.has('curve')"], timeout: 20), r.status == 0 { return c }
    }
    return nil
}

extension ExclusivePipelines {
@Suite("External stages: the Python reference worker", .serialized)
struct ExternalWorkerTests {
    @Test(arguments: ["at-most-once", "at-least-once"])
    func aPythonWorkerInTheMiddle_transformsEveryEnvelope_overCURVE(delivery: String) throws {
        guard let python = pythonWithZMQ() else {
            FileHandle.standardError.write(Data("external worker test skipped: no python3 with pyzmq (apt-get install python3-zmq)\n".utf8)); return
        }
        let dir = Paths.tempDir("external-py")
        let port = try reserveTCPPort(host: "127.0.0.1")
        for k in ["host", "py"] { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k]).status == 0) }
        let yaml = """
            pipeline: external-test
            delivery: \(delivery)
            remote:
              listen: tcp://127.0.0.1:\(port)
              key: keys/host/curve.key
              workers:
                py: { key: keys/py/curve.pub }
            stages:
              - { id: gen, kind: generator, config: { count: 3000, seed: 5 } }
              - { id: up, kind: external, inputs: [gen], placement: { worker: py }, config: { program: upper } }
              - { id: mid, kind: passthrough, inputs: [up] }
              - { id: tag, kind: external, inputs: [mid], placement: { worker: py }, config: { program: tag, settings: { lang: python, step: two } } }
              - { id: out, kind: file-sink, inputs: [tag], config: { path: out.jsonl } }
            """
        // (A host stage sits between the two Python stages; a lane between them would be relayed by the host.)
        try yaml.write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        let run = dir + "/run"
        let host = try startPipeline(dir + "/p.yaml", runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let w = try runProcess(python, [Paths.root + "/Tools/ref_worker.py", "--connect", "tcp://127.0.0.1:\(port)", "--key", dir + "/keys/py/curve.key",
                                        "--server-key", dir + "/keys/host/curve.pub"], timeout: 120)
        #expect(w.status == 0, "\(w.stderr)")
        #expect(w.stderr.contains("stages: up, tag") || w.stderr.contains("stages: tag, up"), "\(w.stderr)")
        #expect(waitExit(host, timeout: 60) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        for l in lanes(s) { #expect(l["sent"] != nil && l["sent"] == l["received"], "lane \(l["id"]?.intValue ?? 0)") }
        if delivery == "at-least-once" {
            // The source ended, so every root was acknowledged through both Python stages, each
            // on its first attempt (nothing waited for a timeout).
            let g = stage(s, "gen")?["status"]
            #expect(g?["delivery.unacked"]?.intValue == 0 && g?["delivery.redelivered"]?.intValue == 0, "\(g.map { JSON.serialize($0) } ?? "")")
            #expect(g?["delivery.acks_received"]?.intValue == 3000)
        }
        // The same generator in the host alone: the same ids in the same order; the Python stages
        // upper-cased each payload and tagged it.
        let local = """
            pipeline: external-ref
            stages:
              - { id: gen, kind: generator, config: { count: 3000, seed: 5 } }
              - { id: out, kind: file-sink, inputs: [gen], config: { path: out.jsonl } }
            """
        try local.write(toFile: dir + "/ref.yaml", atomically: true, encoding: .utf8)
        let (r, _) = try runPipeline(dir + "/ref.yaml", runDir: dir + "/ref")
        #expect(r.status == 0)
        let got = try String(contentsOfFile: run + "/out.jsonl", encoding: .utf8).split(separator: "\n").map { try JSON.parse(String($0)) }
        let want = try String(contentsOfFile: dir + "/ref/out.jsonl", encoding: .utf8).split(separator: "\n").map { try JSON.parse(String($0)) }
        #expect(got.count == 3000)
        #expect(got.map { $0["id"] } == want.map { $0["id"] })
        for (g, w) in zip(got, want).prefix(3000) {
            let payload = Data(base64Encoded: g["payload_b64"]?.stringValue ?? "") ?? Data()
            let original = Data(base64Encoded: w["payload_b64"]?.stringValue ?? "") ?? Data()
            #expect(String(decoding: payload, as: UTF8.self) == String(decoding: original, as: UTF8.self).uppercased())
            #expect(g["attrs"]?["program"]?.stringValue == "upper")
            #expect(g["attrs"]?["lang"]?.stringValue == "python")
            #expect(g["attrs"]?["step"]?.stringValue == "two")
            if payload.isEmpty { break }
        }
    }

    @Test func anExternalStageOutsideARemoteWorker_isAValidationError() throws {
        let dir = Paths.tempDir("external-val")
        try """
            stages:
              - { id: gen, kind: generator }
              - { id: ext, kind: external, inputs: [gen], config: { program: upper } }
            """.write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        let r = try runProcess(Paths.pipectl, ["validate", dir + "/p.yaml"])
        #expect(r.status == 1)
        #expect((r.stdout + r.stderr).contains("p.yaml:3:11: stage 'ext' (external) runs only on a remote worker that implements it"), "\(r.stdout)\(r.stderr)")
    }
}
}

extension ExclusivePipelines {
@Suite("Sealed send to a peer's zmq-inbox", .serialized)
struct SealedSendTests {
    @Test func aSealedDirectory_sentOverCURVE_isVerifiedAndFiled_andAStrangerIsRefused() throws {
        // pipelines/remote/sealed-send.yaml as its comment runs it, on a free port, keys made here.
        let dir = Paths.tempDir("sealed-send")
        let port = try reserveTCPPort(host: "127.0.0.1")
        let text = try String(contentsOfFile: Paths.root + "/pipelines/remote/sealed-send.yaml", encoding: .utf8)
        #expect(text.contains("tcp://127.0.0.1:7810"))
        try text.replacingOccurrences(of: "tcp://127.0.0.1:7810", with: "tcp://127.0.0.1:\(port)").write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        for k in ["peer", "alice", "mallory"] { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k]).status == 0) }
        try FileManager.default.createDirectory(atPath: dir + "/state", withIntermediateDirectories: true)
        try "continuity state\n".write(toFile: dir + "/state/a.txt", atomically: true, encoding: .utf8)
        let run = dir + "/run"
        let host = try startPipeline(dir + "/p.yaml", runDir: run, extra: ["--until-idle", "3"])
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let to = "tcp://127.0.0.1:\(port)"
        let ok = try runProcess(Paths.pipehost, ["send", dir + "/state", "--to", to, "--key", dir + "/keys/alice", "--server-key", dir + "/keys/peer/curve.pub"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("stored as state.tza"), "\(ok.stdout)")
        let stranger = try runProcess(Paths.pipehost, ["send", dir + "/state", "--to", to, "--key", dir + "/keys/mallory",
                                                       "--server-key", dir + "/keys/peer/curve.pub", "--timeout", "3"])
        #expect(stranger.status == 2)
        #expect(stranger.stderr.contains("refused this key"), "\(stranger.stderr)")
        #expect(waitExit(host, timeout: 60) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        // It arrived under its surface name: verified and filed as trusted.
        #expect(FileManager.default.fileExists(atPath: run + "/trusted/state.tza"))
        let receipts = try String(contentsOfFile: run + "/received.jsonl", encoding: .utf8)
        #expect(receipts.split(separator: "\n").count == 1)
        #expect(receipts.contains("\"sender\":\"alice\""))
        let audit = try auditJSONL(run)
        #expect(audit.contains("from 'alice' stored as state.tza"))
        #expect(audit.contains("send-refused"))
        #expect(audit.contains("unknown sender key"))
    }

    @Test func aSecondDeliveryOfOneName_getsASuffix_andNeverReplacesTheFirst() throws {
        // No inbox stage drains the drop directory here, so the first file is certainly still
        // there when the second arrives (behind an inbox, the first may already have been filed).
        let dir = Paths.tempDir("sealed-twice")
        let port = try reserveTCPPort(host: "127.0.0.1")
        for k in ["peer", "alice"] { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k]).status == 0) }
        try """
            pipeline: sealed-twice
            stages:
              - id: net
                kind: zmq-inbox
                config:
                  listen: tcp://127.0.0.1:\(port)
                  key: ${PIPELINE_DIR}/keys/peer/curve.key
                  senders: { alice: "${PIPELINE_DIR}/keys/alice/curve.pub" }
                  dir: drop
              - { id: receipts, kind: file-sink, inputs: [net], config: { path: received.jsonl, include_ingest: false } }
            """.write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        try "first\n".write(toFile: dir + "/state.txt", atomically: true, encoding: .utf8)
        let run = dir + "/run"
        let host = try startPipeline(dir + "/p.yaml", runDir: run, extra: ["--until-idle", "3"])
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let send = ["send", dir + "/state.txt", "--to", "tcp://127.0.0.1:\(port)", "--key", dir + "/keys/alice", "--server-key", dir + "/keys/peer/curve.pub"]
        let one = try runProcess(Paths.pipehost, send)
        #expect(one.status == 0, "\(one.stderr)")
        #expect(one.stdout.hasSuffix("stored as state.txt.tza\n"), "\(one.stdout)")
        try "second, longer\n".write(toFile: dir + "/state.txt", atomically: true, encoding: .utf8)
        let two = try runProcess(Paths.pipehost, send)
        #expect(two.status == 0, "\(two.stderr)")
        #expect(two.stdout.hasSuffix("stored as state.txt.tza.1\n"), "\(two.stdout)")
        #expect(waitExit(host, timeout: 60) == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
        let first = try Data(contentsOf: URL(fileURLWithPath: run + "/drop/state.txt.tza"))
        let second = try Data(contentsOf: URL(fileURLWithPath: run + "/drop/state.txt.tza.1"))
        #expect(first != second)
        let receipts = try String(contentsOfFile: run + "/received.jsonl", encoding: .utf8).split(separator: "\n").map { try JSON.parse(String($0)) }
        #expect(receipts.map { $0["attrs"]?["filename"]?.stringValue } == ["state.txt.tza", "state.txt.tza.1"])
        #expect(receipts.map { $0["attrs"]?["size_bytes"]?.intValue } == [first.count, second.count].map { Int64($0) })
    }
}
}

extension ExclusivePipelines {
@Suite("Remote pipectl over CURVE", .serialized)
struct RemoteControlTests {
    @Test func anOperatorReadsStatusRemotely_butCannotStopTheRun_andStrangersAreRefused() throws {
        let dir = Paths.tempDir("remote-control")
        for k in ["host", "ops", "eve"] { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k]).status == 0) }
        // Two distinct free ports (a reserver keeps each bound until released).
        let ports = PortReserver(host: "127.0.0.1")
        let listen = try ports.reserve(), control = try ports.reserve()
        ports.releaseAll()
        try """
            pipeline: remote-control
            remote:
              listen: tcp://127.0.0.1:\(listen)
              control: tcp://127.0.0.1:\(control)
              key: keys/host/curve.key
              operators: { ops: keys/ops/curve.pub }
            stages:
              - { id: gen, kind: generator, config: { count: 200000, rate: 10000 } }
              - { id: out, kind: null-sink, inputs: [gen] }
            """.write(toFile: dir + "/p.yaml", atomically: true, encoding: .utf8)
        let run = dir + "/run"
        let host = try startPipeline(dir + "/p.yaml", runDir: run)
        defer { if host.isRunning { kill(host.processIdentifier, SIGKILL) } }
        let ep = "tcp://127.0.0.1:\(control)"
        let remote = ["--control", ep, "--key", dir + "/keys/ops/curve.key", "--server-key", dir + "/keys/host/curve.pub"]
        let st = try pipectlJSON(["status"] + remote)
        #expect(st["host"]?["pipeline"]?.stringValue == "remote-control")
        #expect(try pipectlJSON(["lanes"] + remote).listValue?.isEmpty == false)
        // A remote caller is never local: stop is refused, audited, and the run goes on.
        let client = try ControlClient(endpoint: ep, keys: try CurveKeys.loadSecret(dir + "/keys/ops/curve.key"),
                                       serverKey: try CurveKeys.loadPublic(dir + "/keys/host/curve.pub", base: "/"))
        #expect(throws: RuntimeError.self) { try client.call("stop") }
        do { _ = try client.call("stop") } catch { #expect("\(error)".contains("'stop' is local only"), "\(error)") }
        #expect(try client.call("ping")["pipeline"]?.stringValue == "remote-control")
        // An unknown key and a plaintext client get nothing.
        let eve = try runProcess(Paths.pipectl, ["status", "--control", ep, "--key", dir + "/keys/eve/curve.key", "--server-key", dir + "/keys/host/curve.pub"])
        #expect(eve.status == 1)
        #expect(eve.stderr.contains("remote.operators"), "\(eve.stderr)")
        let plain = try ControlClient(endpoint: ep)
        #expect(throws: RuntimeError.self) { try plain.call("ping", timeoutMs: 1000) }
        // The local operator can stop it.
        let stop = try ControlClient(endpoint: "ipc://" + run + "/control.sock")
        _ = try stop.call("stop")
        #expect(waitExit(host, timeout: 30) == 0)
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect((stage(s, "out")?["received"]?.intValue ?? 0) < 200000)
        let audit = try auditJSONL(run)
        #expect(audit.contains("'stop' is local only; remote operator 'ops' refused"))
        #expect(audit.contains("unknown operator key"))
    }
}
}

@Suite("The executor's external kind", .serialized)
struct ExternalExecutorTests {
    func receipts(_ path: String) throws -> [ConfigValue] {
        try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").compactMap { try JSON.parse(String($0))["payload"]?["receipt"] }
    }

    @Test func capsArePerformedByAPythonService_overIpcAndOverCURVE_andTimeOutWithoutOne() throws {
        guard let python = pythonWithZMQ() else {
            FileHandle.standardError.write(Data("external executor test skipped: no python3 with pyzmq (apt-get install python3-zmq)\n".utf8)); return
        }
        let dir = Paths.tempDir("external-exec")
        func pipeline(_ name: String, executor: String, count: Int) throws -> String {
            let f = dir + "/\(name).yaml"
            try """
                pipeline: \(name)
                stages:
                  - { id: gen, kind: generator, config: { count: \(count), seed: 1 } }
                  - { id: exec, kind: executor, inputs: [gen], config: { executor: external, \(executor) } }
                  - { id: receipts, kind: file-sink, inputs: [exec.receipts], config: { path: receipts.jsonl } }
                """.write(toFile: f, atomically: true, encoding: .utf8)
            return f
        }
        func service(_ args: [String]) throws -> Process {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: python)
            p.arguments = [Paths.root + "/Tools/ref_executor.py"] + args
            p.standardOutput = FileHandle.nullDevice; p.standardError = FileHandle.nullDevice
            try p.run()
            usleep(300_000)
            return p
        }
        // Over ipc, each execution taking 20 ms: the receipts say executed, with the service's
        // output and a latency of at least 20 ms.
        let sock = "ipc://\(dir)/exec.sock"
        let svc = try service(["--bind", sock, "--delay-ms", "20"])
        defer { if svc.isRunning { kill(svc.processIdentifier, SIGKILL) } }
        let (r1, _) = try runPipeline(try pipeline("ipc", executor: "endpoint: \"\(sock)\", timeout_ms: 5000", count: 10), runDir: dir + "/run-ipc")
        #expect(r1.status == 0, "\(r1.stderr)")
        let got = try receipts(dir + "/run-ipc/receipts.jsonl")
        #expect(got.count == 10)
        for r in got {
            #expect(r["outcome"]?.stringValue == "executed")
            #expect(r["executor"]?.stringValue == "external")
            #expect((r["latency_us"]?.intValue ?? 0) >= 20_000)
            #expect(r["output"]?.stringValue?.hasPrefix("ABCDEFGHIJ") == true)
        }
        kill(svc.processIdentifier, SIGKILL); svc.waitUntilExit()
        // Over tcp with CURVE: the service admits only the host's key.
        for k in ["host", "svc"] { #expect(try runProcess(Paths.pipehost, ["keygen", "-o", dir + "/keys/" + k]).status == 0) }
        let port = try reserveTCPPort(host: "127.0.0.1")
        let svc2 = try service(["--bind", "tcp://127.0.0.1:\(port)", "--key", dir + "/keys/svc/curve.key", "--clients", dir + "/keys/host/curve.pub"])
        defer { if svc2.isRunning { kill(svc2.processIdentifier, SIGKILL) } }
        let curve = "endpoint: \"tcp://127.0.0.1:\(port)\", curve_key: \(dir)/keys/host/curve.key, server_key: \(dir)/keys/svc/curve.pub, timeout_ms: 5000"
        let (r2, _) = try runPipeline(try pipeline("curve", executor: curve, count: 5), runDir: dir + "/run-curve")
        #expect(r2.status == 0, "\(r2.stderr)")
        #expect(try receipts(dir + "/run-curve/receipts.jsonl").map { $0["outcome"]?.stringValue } == Array(repeating: "executed", count: 5))
        kill(svc2.processIdentifier, SIGKILL); svc2.waitUntilExit()
        // Nobody answers: each cap is rejected as timed out, and the receipt says so.
        let (r3, _) = try runPipeline(try pipeline("none", executor: "endpoint: \"ipc://\(dir)/nobody.sock\", timeout_ms: 100", count: 3), runDir: dir + "/run-none")
        #expect(r3.status == 0, "\(r3.stderr)")
        let none = try receipts(dir + "/run-none/receipts.jsonl")
        #expect(none.count == 3)
        for r in none {
            #expect(r["outcome"]?.stringValue == "rejected")
            #expect(r["reason"]?.stringValue?.contains("timed out after 100 ms") == true)
        }
    }
}

@Suite("Grant epoch watermark")
struct GrantEpochsTests {
    @Test func theWatermarkNeverFalls_survivesReopening_andEvictsRevokedKeysLast() throws {
        let path = Paths.tempDir("grant-epochs") + "/e.sqlite"
        do {
            let e = try GrantEpochs(path: path, limit: 3)
            try e.raise("k-revoked", to: 9, nowS: 1, revoked: true)
            try e.raise("k-old", to: 1, nowS: 2)
            try e.raise("k-mid", to: 4, nowS: 3)
            try e.raise("k-mid", to: 2, nowS: 4)   // lower: the watermark stays
            #expect(try e.highest("k-mid") == 4)
            try e.raise("k-new", to: 7, nowS: 5)   // over the limit: the oldest non-revoked key goes
            #expect(try e.highest("k-old") == nil)
            #expect(try e.highest("k-revoked") == 9)
        }
        let again = try GrantEpochs(path: path, limit: 3)
        #expect(try again.highest("k-mid") == 4)
        #expect(try again.highest("k-new") == 7)
        #expect(try again.highest("nobody") == nil)
    }
}

/// A plaintext client and a CURVE client with the wrong server key connect to tcp port `port`
/// of a CURVE host and send `frame`: ZeroMQ drops both in the handshake, telling only the
/// socket's monitor, and the host must audit each (`remote.lane-handshake`) within 10 s.
func expectBadHandshakesAudited(on port: String, run: String, ctx: ZMQContext, frame: [UInt8],
                                sourceLocation: SourceLocation = #_sourceLocation) throws {
    let plain = try ctx.socket(.push)
    defer { plain.close() }
    try plain.setLinger(ms: 0)
    try plain.connect(port)
    _ = try? plain.send(frame, dontWait: true)
    let stranger = try ZMQCurve.keyPair(), notTheHost = try ZMQCurve.keyPair()
    let wrongServer = try ctx.socket(.push)
    defer { wrongServer.close() }
    try wrongServer.setLinger(ms: 0)
    try wrongServer.makeCurveClient(publicKey: stranger.publicKey, secretKey: stranger.secretKey, serverKey: notTheHost.publicKey)
    try wrongServer.connect(port)
    _ = try? wrongServer.send(frame, dontWait: true)
    // (The plaintext client: a mechanism mismatch, or a broken handshake when it hung up first.)
    let seen = try poll(true, seconds: 10, everyMs: 100) {
        let audit = try auditJSONL(run)
        return (audit.contains("handshake failed on lane port \(port): security mechanism mismatch")
                || audit.contains("handshake failed on lane port \(port): handshake failed (Broken pipe)"))
            && audit.contains("handshake failed on lane port \(port): CURVE handshake did not decrypt")
    }
    #expect(seen, "\((try? auditJSONL(run)) ?? "")", sourceLocation: sourceLocation)
}

/// VERSION_CODENAME of /etc/os-release ("bookworm" on Debian 12), or "" when there is none.
func debianCodename() -> String {
    let text = (try? String(contentsOfFile: "/etc/os-release", encoding: .utf8)) ?? ""
    let line = text.split(separator: "\n").first { $0.hasPrefix("VERSION_CODENAME=") } ?? ""
    return String(line.dropFirst("VERSION_CODENAME=".count)).trimmingCharacters(in: CharacterSet(charactersIn: "\""))
}
