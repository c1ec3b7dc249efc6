import Testing
import Foundation
import PipeKit
import PipeRuntime
import PipeZMQ

/// Runs `pipehost run` and returns the parsed summary JSON.
func runPipeline(_ file: String, runDir: String, extra: [String] = [], timeout: Double = 120) throws -> (ProcResult, ConfigValue) {
    let summaryPath = runDir + "/summary.json"
    let r = try runProcess(Paths.pipehost, ["run", file, "--run-dir", runDir, "--summary-json", summaryPath, "--quiet"] + extra, timeout: timeout)
    let text = (try? String(contentsOfFile: summaryPath, encoding: .utf8)) ?? "null"
    return (r, try JSON.parse(text))
}

func lanes(_ s: ConfigValue) -> [ConfigValue] { s["lanes"]?.listValue ?? [] }
func stage(_ s: ConfigValue, _ id: String) -> ConfigValue? { s["stages"]?.listValue?.first { $0["id"]?.stringValue == id } }

/// A running stage's report, as `pipectl status` gives it now.
func liveStage(_ run: String, _ id: String) throws -> ConfigValue? { stage(try pipectlJSON(["status", "--run-dir", run]), id) }

/// Whether a running stage goes on receiving: its count, `before` at first, has grown after `ms`.
func keepsReceiving(_ run: String, _ id: String, from before: Int64, ms: UInt32) throws -> Bool {
    usleep(ms * 1000)
    return (try liveStage(run, id)?["received"]?.intValue ?? 0) > before
}
func lane(_ s: ConfigValue, from: String, to: String) -> ConfigValue? {
    lanes(s).first { $0["from"]?.stringValue == from && $0["to"]?.stringValue == to }
}
/// JSONL lines of a file, with `ingest_ns` removed (timestamps aside).
func linesWithoutIngest(_ path: String) throws -> [String] {
    try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { line in
        line.replacingOccurrences(of: #","ingest_ns":[0-9]+"#, with: "", options: .regularExpression)
    }
}

/// Starts `pipehost run` in the background; the caller stops it.
func startPipeline(_ file: String, runDir: String, extra: [String] = [], netns: String? = nil) throws -> Process {
    let p = Process()
    let args = ["run", file, "--run-dir", runDir, "--summary-json", runDir + "/summary.json", "--quiet"] + extra
    if let ns = netns {
        p.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        p.arguments = ["netns", "exec", ns, Paths.pipehost] + args
    } else {
        p.executableURL = URL(fileURLWithPath: Paths.pipehost)
        p.arguments = args
    }
    p.standardOutput = FileHandle.nullDevice
    // The host's log, for when a test fails.
    _ = FileManager.default.createFile(atPath: runDir + ".host.log", contents: nil)
    p.standardError = FileHandle(forWritingAtPath: runDir + ".host.log")
    try p.run()
    // Wait for the control socket.
    let deadline = Date().addingTimeInterval(30)
    while !FileManager.default.fileExists(atPath: runDir + "/control.sock") && Date() < deadline && p.isRunning { usleep(20_000) }
    return p
}

func pipectlJSON(_ args: [String]) throws -> ConfigValue {
    let r = try runProcess(Paths.pipectl, args + ["--json"], timeout: 30)
    guard r.status == 0 else { throw StageError.halt("pipectl \(args) failed: \(r.stderr)") }
    return try JSON.parse(r.stdout)
}

func writeTemp(_ text: String, _ name: String) -> String {
    let dir = Paths.tempDir("yaml")
    let path = dir + "/" + name
    try? text.write(toFile: path, atomically: true, encoding: .utf8)
    return path
}

@Suite("End to end: pipehost and pipectl", .serialized)
struct EndToEndTests {
    @Test func everyExamplePipeline_runsToCompletionWithBalancedLanes() throws {
        let dir = Paths.root + "/pipelines"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") && !$0.hasSuffix(".test.yaml") }.sorted()
        #expect(files.count >= 4)
        for f in files {
            let (r, s) = try runPipeline(dir + "/" + f, runDir: Paths.tempDir("example"))
            #expect(r.status == 0, "\(f): \(r.stderr)")
            #expect(s["failure"] == .null, "\(f)")
            for l in lanes(s) {
                #expect(l["sent"] == l["received"], "\(f): lane \(l["from"]?.stringValue ?? "") -> \(l["to"]?.stringValue ?? "")")
                #expect(l["eos"] == .bool(true), "\(f): lane \(l["id"]?.intValue ?? 0) never ended")
            }
            let total = lanes(s).compactMap { $0["received"]?.intValue }.reduce(0, +)
            #expect(total > 0, "\(f): nothing flowed")
        }
    }

    @Test func hello_countsAndOutput() throws {
        let run = Paths.tempDir("hello")
        let (r, s) = try runPipeline(Paths.root + "/pipelines/hello.yaml", runDir: run)
        #expect(r.status == 0)
        #expect(lane(s, from: "gen.out", to: "pass.in")?["received"]?.intValue == 10_000)
        #expect(lane(s, from: "pass.out", to: "out.in")?["transport"]?.stringValue == "inproc")
        #expect(try linesWithoutIngest(run + "/hello.jsonl").count == 10_000)
    }

    @Test func processPlacement_givesTheSameOutputEnvelopeForEnvelope() throws {
        let text = try String(contentsOfFile: Paths.root + "/pipelines/hello.yaml", encoding: .utf8)
        let proc = writeTemp(text.replacingOccurrences(of: "    inputs: [gen]\n", with: "    inputs: [gen]\n    placement: process\n"), "hello-proc.yaml")
        let a = Paths.tempDir("inproc"), b = Paths.tempDir("proc")
        let (ra, sa) = try runPipeline(Paths.root + "/pipelines/hello.yaml", runDir: a)
        let (rb, sb) = try runPipeline(proc, runDir: b)
        #expect(ra.status == 0 && rb.status == 0, "\(rb.stderr)")
        // Another pid, ipc lanes.
        let passA = try #require(stage(sa, "pass")), passB = try #require(stage(sb, "pass"))
        #expect(passB["placement"]?.stringValue == "process")
        #expect(passB["pid"] != passA["pid"] && passB["pid"] != stage(sb, "gen")?["pid"])
        #expect(lane(sb, from: "gen.out", to: "pass.in")?["transport"]?.stringValue == "ipc")
        let la = try linesWithoutIngest(a + "/hello.jsonl"), lb = try linesWithoutIngest(b + "/hello.jsonl")
        #expect(la.count == 10_000)
        #expect(la == lb)
        // And with in-process lanes encoding DATA frames instead of handing batches over.
        let c = Paths.tempDir("inproc-data")
        let (rc, sc) = try runPipeline(Paths.root + "/pipelines/hello.yaml", runDir: c, extra: ["--inproc-data-frames"])
        #expect(rc.status == 0, "\(rc.stderr)")
        #expect(lane(sc, from: "gen.out", to: "pass.in")?["transport"]?.stringValue == "inproc")
        #expect(try linesWithoutIngest(c + "/hello.jsonl") == la)
    }

    @Test func aSmallEnvelopeLimit_stillLetsFullFramesCrossProcesses() throws {
        // A frame carries up to 1 MiB of envelopes whatever max_envelope_bytes says; ZeroMQ's
        // message size guard once followed the envelope limit, and a worker's socket then dropped
        // the first full frame (the run stalled with 1024 sent, 0 received).
        let yaml = """
            pipeline: small-limit
            limits: { max_envelope_bytes: 4096 }
            stages:
              - { id: gen, kind: generator, config: { count: 20000, payload_size: 100, seed: 3 } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: process }
              - { id: sink, kind: null-sink, inputs: [pass] }
            """
        let (r, s) = try runPipeline(writeTemp(yaml, "small-limit.yaml"), runDir: Paths.tempDir("small-limit"), timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(lane(s, from: "pass.out", to: "sink.in")?["received"]?.intValue == 20000)
        // The guard sits above a frame of 1 MiB of envelopes (header 16, sent_ns and count 12),
        // or of one envelope at a limit above that, and stays small where batches must be small.
        #expect(WireLimits(maxEnvelopeBytes: 4096).maxFrameBytes >= (1 << 20) + 28)
        #expect(WireLimits(maxEnvelopeBytes: 2 << 20).maxFrameBytes >= (2 << 20) + 32)
        #expect(WireLimits(maxEnvelopeBytes: 64, maxBatchEnvelopes: 16).maxFrameBytes < 8192)
    }

    @Test func aFileSource_deadLettersMalformedAndOversizedLines_withFileAndLine_andGoesOn() throws {
        let dir = Paths.tempDir("file-source-bad")
        func line(_ id: Int, _ payload: String) -> String {
            #"{"id":"\#(String(repeating: "0", count: 31))\#(id)","actor":"anna","intent":"demo.run","payload":"\#(payload)"}"#
        }
        let input = [line(1, "a"), #"{"actor": "anna", "intent": "#, line(2, String(repeating: "x", count: 6000)),
                     line(3, String(repeating: "y", count: 10000)), line(4, "b")].joined(separator: "\n") + "\n"
        try input.write(toFile: dir + "/in.jsonl", atomically: true, encoding: .utf8)
        let yaml = """
            pipeline: file-source-bad
            limits: { max_envelope_bytes: 4096 }
            stages:
              - { id: src, kind: file-source, config: { path: \(dir)/in.jsonl } }
              - { id: out, kind: file-sink, inputs: [src], config: { path: out.jsonl } }
            """
        let run = dir + "/run"
        let (r, s) = try runPipeline(writeTemp(yaml, "file-source-bad.yaml"), runDir: run, timeout: 60)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try envelopeIDs(run + "/out.jsonl") == ["00000000000000000000000000000001", "00000000000000000000000000000004"])
        let reasons = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8).split(separator: "\n")
            .map { try JSON.parse(String($0))["attrs"]?["dead_letter_reason"]?.stringValue ?? "" }
        #expect(reasons.count == 3)
        #expect(reasons[0].hasPrefix(dir + "/in.jsonl:2: JSON error"), "\(reasons)")
        #expect(reasons[1] == dir + "/in.jsonl:3: envelope is 6070 bytes, limit 4096", "\(reasons)")
        #expect(reasons[2] == dir + "/in.jsonl:4: line longer than 8192 bytes", "\(reasons)")
        #expect(stage(s, "src")?["dead_lettered"]?.intValue == 3)
    }

    @Test func loop_underBlockWithSmallBounds_endsByItself() throws {
        let run = Paths.tempDir("loop")
        let (r, s) = try runPipeline(Paths.root + "/pipelines/loop.yaml", runDir: run, timeout: 90)
        #expect(r.status == 0, "\(r.stderr)")
        // 2000 roots, each going round 3 more times: 8000 through `hop`, 6000 back on the loop.
        #expect(lane(s, from: "hop.out", to: "out.in")?["received"]?.intValue == 8000)
        #expect(lane(s, from: "hop.again", to: "relay.in")?["received"]?.intValue == 6000)
        #expect(lane(s, from: "hop.again", to: "relay.in")?["loop_back"] == .bool(true))
    }

    @Test func loop_hopLimitDeadLettersTheExcessAndTheLoopStillEnds() throws {
        let text = try String(contentsOfFile: Paths.root + "/pipelines/loop.yaml", encoding: .utf8)
            .replacingOccurrences(of: "times: 3", with: "times: 5").replacingOccurrences(of: "count: 2000", with: "count: 100")
        let run = Paths.tempDir("hoplimit")
        let (r, s) = try runPipeline(writeTemp(text, "loop5.yaml"), runDir: run, timeout: 90)
        #expect(r.status == 0, "\(r.stderr)")
        // Follow-ups with hops 4 exceed max_hops 3: one dead letter per root, none go further.
        #expect(stage(s, "relay")?["dead_lettered"]?.intValue == 100)
        #expect(lane(s, from: "hop.out", to: "out.in")?["received"]?.intValue == 400)
        let dl = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8)
        #expect(dl.split(separator: "\n").count == 100)
        #expect(dl.contains("hop-limit: hops 4 > max_hops 3"))
        let audit = try auditJSONL(run)
        #expect(audit.split(separator: "\n").filter { $0.contains(#""decision":"dead-letter""#) }.count == 100)
    }

    @Test func sigterm_withASlowSink_drainsEveryLaneAndExitsZero() throws {
        let yaml = """
        pipeline: slow
        defaults: { lane: { bound: 64 } }
        stages:
          - { id: gen, kind: generator, config: { count: 0 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: process }
          - { id: sink, kind: null-sink, inputs: [pass], config: { delay_us: 200 } }
        """
        let run = Paths.tempDir("sigterm")
        let p = try startPipeline(writeTemp(yaml, "slow.yaml"), runDir: run)
        sleep(2)
        #expect(p.isRunning)
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let s = try JSON.parse(String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        let all = lanes(s)
        #expect(!all.isEmpty)
        for l in all { #expect(l["sent"] == l["received"], "lane \(l["id"]?.intValue ?? 0)") }
        let delivered = lane(s, from: "pass.out", to: "sink.in")?["received"]?.intValue ?? 0
        #expect(delivered > 100)
        // Bounded lanes: the endless generator was held back by the slow sink.
        #expect((stage(s, "gen")?["emitted"]?.intValue ?? 0) == delivered)
    }

    @Test func pipectl_lanesAndStatus_againstARunningHost() throws {
        let yaml = """
        pipeline: watched
        stages:
          - { id: gen, kind: generator, config: { count: 0, rate: 2000 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: process }
          - { id: sink, kind: null-sink, inputs: [pass] }
        """
        let run = Paths.tempDir("pipectl")
        let p = try startPipeline(writeTemp(yaml, "watched.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(1)
        let l1 = try pipectlJSON(["lanes", "--run-dir", run])
        usleep(600_000)
        let l2 = try pipectlJSON(["lanes", "--control", "ipc://\(run)/control.sock"])
        let a = try #require(l1.listValue?.first { $0["from"]?.stringValue == "pass.out" })
        let b = try #require(l2.listValue?.first { $0["from"]?.stringValue == "pass.out" })
        #expect(a["transport"]?.stringValue == "ipc")
        #expect(a["bound"]?.intValue == 1024)
        // Counts from the worker process arrive as stats frames and keep growing.
        #expect((b["sent"]?.intValue ?? 0) > (a["sent"]?.intValue ?? 0))
        #expect((b["received"]?.intValue ?? 0) > 0)
        let st = try pipectlJSON(["status", "--run-dir", run])
        #expect(st["host"]?["pipeline"]?.stringValue == "watched")
        let pass = try #require(st["stages"]?.listValue?.first { $0["id"]?.stringValue == "pass" })
        #expect(pass["placement"]?.stringValue == "process")
        #expect(pass["pid"]?.intValue != st["host"]?["pid"]?.intValue)
        // The control socket is private.
        var sb = stat()
        #expect(stat(run + "/control.sock", &sb) == 0 && (sb.st_mode & 0o777) == 0o600)
        let text = try runProcess(Paths.pipectl, ["lanes", "--run-dir", run])
        #expect(text.stdout.contains("pass.out") && text.stdout.contains("credits"))
        // The control protocol: registry-listed commands, versioned replies, subscriptions.
        let client = try ControlClient(endpoint: "ipc://\(run)/control.sock")
        let help = try client.call("help")
        #expect(help.listValue?.compactMap { $0["name"]?.stringValue } == ["ping", "help", "status", "lanes", "workers", "grant", "stop", "subscribe", "unsubscribe"])
        #expect(try client.call("subscribe", args: .object([("interval_ms", .int(100))]))["interval_ms"] == .int(100))
        let e1 = try #require(client.nextEvent(timeoutMs: 2000)), e2 = try #require(client.nextEvent(timeoutMs: 2000))
        #expect(e1["event"]?.stringValue == "stats" && e1["result"]?["lanes"]?.listValue?.isEmpty == false)
        let sent = { (e: ConfigValue) in e["result"]?["lanes"]?.listValue?.first?["sent"]?.intValue ?? 0 }
        #expect(sent(e2) >= sent(e1))
        #expect(throws: RuntimeError.self) { try client.call("no-such-command") }
        _ = try client.call("unsubscribe")
        // A request in another protocol version is refused, naming the version this host speaks.
        let ctx = try ZMQContext()
        let raw = try ctx.socket(.dealer)
        try raw.setReceiveTimeout(ms: 5000)
        try raw.connect("ipc://\(run)/control.sock")
        _ = try raw.send(Array(#"{"v":2,"id":7,"cmd":"ping"}"#.utf8))
        let refusal = try JSON.parse(bytes: try #require(try raw.receiveParts()?.last))
        #expect(refusal["ok"]?.boolValue == false && refusal["id"]?.intValue == 7)
        #expect(refusal["error"]?.stringValue == "unsupported protocol version; this host speaks v1")
        raw.close(); ctx.terminate()
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
    }

    @Test func twinGuard_decidesEveryIntent_auditsEach_andReportsLiveStatus() throws {
        let run = Paths.tempDir("twin-guard")
        let (r, s) = try runPipeline(Paths.root + "/pipelines/twin-guard.yaml", runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        let allowed = try linesWithoutIngest(run + "/allowed.jsonl"), blocked = try linesWithoutIngest(run + "/blocked.jsonl")
        #expect(allowed.count + blocked.count == 2000)
        #expect(allowed.count > 1000 && blocked.count > 100, "\(allowed.count) allowed, \(blocked.count) blocked")
        let reasons = try blocked.map { try JSON.parse($0)["attrs"]?["twin_reason"]?.stringValue ?? "" }
        #expect(reasons.allSatisfy { $0.hasPrefix("blocked: ") })
        #expect(reasons.contains { $0.contains("drift 503 ms > 200 ms (port)") })
        #expect(reasons.contains { $0.contains("drift 503 ms > 150 ms (port)") })
        #expect(reasons.contains { $0.contains("status mismatch: physical=fault, twin=operational") })
        #expect(reasons.contains { $0.contains("load_kg deviates by 700 > tolerance 100") })
        // Every decision is one audit record, batched or not.
        let audit = try auditJSONL(run).split(separator: "\n")
        let decisions = try audit.map { try JSON.parse(String($0))["erin"]?["decision"]?.stringValue ?? "" }
        #expect(decisions.filter { $0 == "allow" }.count == allowed.count)
        #expect(decisions.filter { $0 == "block" }.count == blocked.count)
        #expect(stage(s, "guard")?["status"]?["checks"]?.intValue == 2000)

        // Live: an endless, rate-limited run shows the guard's figures through pipectl status.
        let text = try String(contentsOfFile: Paths.root + "/pipelines/twin-guard.yaml", encoding: .utf8)
            .replacingOccurrences(of: "count: 2000", with: "count: 0\n      rate: 500")
        let live = Paths.tempDir("twin-live")
        let p = try startPipeline(writeTemp(text, "twin-live.yaml"), runDir: live)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        let st = try pipectlJSON(["status", "--run-dir", live])
        let guardStatus = try #require(st["stages"]?.listValue?.first { $0["id"]?.stringValue == "guard" }?["status"])
        #expect((guardStatus["checks"]?.intValue ?? 0) > 0)
        #expect(guardStatus["devices"]?.intValue == 3)
        #expect(guardStatus["device.crane-02"]?.stringValue?.contains("checks") == true)
        let shown = try runProcess(Paths.pipectl, ["status", "--run-dir", live])
        #expect(shown.stdout.contains("guard (twin)") && shown.stdout.contains("block_rate_pct") && shown.stdout.contains("device.crane-03"))
        #expect((st["host"]?["audit_records"]?.intValue ?? 0) > 0)
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
    }

    @Test func killedWorker_isRestartedLoggedAndCounted() throws {
        let yaml = """
        pipeline: crashy
        stages:
          - { id: gen, kind: generator, config: { count: 0, rate: 20000 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: process }
          - { id: sink, kind: null-sink, inputs: [pass] }
        """
        let run = Paths.tempDir("crash")
        let p = try startPipeline(writeTemp(yaml, "crashy.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(1)
        let st = try pipectlJSON(["status", "--run-dir", run])
        let pid = try #require(st["stages"]?.listValue?.first { $0["id"]?.stringValue == "pass" }?["pid"]?.intValue)
        kill(Int32(pid), SIGKILL)
        // The host restarts it; its lanes carry envelopes again.
        var restarted: ConfigValue?
        for _ in 0..<50 {
            usleep(200_000)
            let s = try pipectlJSON(["status", "--run-dir", run])
            if let pass = s["stages"]?.listValue?.first(where: { $0["id"]?.stringValue == "pass" }),
               pass["restarts"]?.intValue == 1, pass["pid"]?.intValue != pid, (pass["received"]?.intValue ?? 0) > 0 { restarted = pass; break }
        }
        #expect(restarted != nil)
        let before = try pipectlJSON(["lanes", "--run-dir", run]).listValue?.first { $0["from"]?.stringValue == "pass.out" }?["received"]?.intValue ?? 0
        usleep(500_000)
        let after = try pipectlJSON(["lanes", "--run-dir", run]).listValue?.first { $0["from"]?.stringValue == "pass.out" }?["received"]?.intValue ?? 0
        #expect(after > before)
        // What the dead worker took without reporting it, or lost in its queue, is not depth: the
        // lane into it flows at 20k/s with next to nothing in flight, and reads so (counted from
        // the start of the run it read 1024 of 1024, overloaded, for the rest of the run).
        let settled = try poll(true, seconds: 15) {
            let l = try pipectlJSON(["lanes", "--run-dir", run]).listValue?.first { $0["from"]?.stringValue == "gen.out" }
            return l?["state"]?.stringValue == "normal" && (l?["depth"]?.intValue ?? 1024) < 200
        }
        let shown = (try? runProcess(Paths.pipectl, ["lanes", "--run-dir", run]).stdout) ?? ""
        #expect(settled, "\(shown)")
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
        #expect(lane(s, from: "gen.out", to: "pass.in")?["depth"]?.intValue == 0)
    }

    @Test func maxEnvelopesAndUntilIdle_boundEndlessRuns() throws {
        let yaml = """
        pipeline: endless
        stages:
          - { id: gen, kind: generator, config: { count: 0 } }
          - { id: sink, kind: null-sink, inputs: [gen] }
        """
        let f = writeTemp(yaml, "endless.yaml")
        let (r1, s1) = try runPipeline(f, runDir: Paths.tempDir("max"), extra: ["--max-envelopes", "5000"], timeout: 60)
        #expect(r1.status == 0)
        let n = stage(s1, "gen")?["emitted"]?.intValue ?? 0
        #expect(n == 5000)
        #expect(lane(s1, from: "gen.out", to: "sink.in")?["received"]?.intValue == 5000)
        let idle = """
        pipeline: idle
        stages:
          - { id: gen, kind: generator, config: { count: 0, rate: 1000 } }
          - { id: sink, kind: null-sink, inputs: [gen] }
        """
        // A source that stops producing (rate 0.5/s after the first) lets --until-idle end the run.
        let slow = writeTemp(idle.replacingOccurrences(of: "rate: 1000", with: "rate: 0.2"), "idle.yaml")
        let start = Date()
        let (r2, _) = try runPipeline(slow, runDir: Paths.tempDir("idle"), extra: ["--until-idle", "1"], timeout: 60)
        #expect(r2.status == 0)
        #expect(Date().timeIntervalSince(start) < 20)
    }

    @Test func garbageOnALane_isDeadLetteredCountedAuditedAndThePipelineGoesOn() throws {
        let yaml = """
        pipeline: garbage
        stages:
          - { id: gen, kind: generator, config: { count: 0, rate: 500 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: process }
          - { id: sink, kind: null-sink, inputs: [pass] }
        """
        let run = Paths.tempDir("garbage")
        let p = try startPipeline(writeTemp(yaml, "garbage.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(1)
        // Speak to the worker's input socket directly: a garbage frame, a DATA frame for lane 1
        // with a malformed envelope, one with an oversized envelope length, and a HANDOFF (an
        // in-process frame whose token would name a batch in memory) on this ipc lane.
        let inject = """
        import zmq, struct, sys
        s = zmq.Context().socket(zmq.PUSH); s.connect(sys.argv[1])
        hdr = lambda t, lane, seq: b"PL" + bytes([1, t]) + struct.pack("<IQ", lane, seq)
        s.send(b"garbage!" * 4)
        s.send(hdr(1, 1, 999) + struct.pack("<QI", 0, 1) + struct.pack("<I", 3) + b"\\x01\\x80\\x00")
        s.send(hdr(1, 1, 1000) + struct.pack("<QI", 0, 1) + struct.pack("<I", 2000000) + b"\\x00" * 2000000)
        s.send(hdr(11, 1, 1001) + struct.pack("<QIQ", 0, 1, 12345))
        s.close(linger=2000)
        # A hostile CREDIT to the generator's return path: a limit near 2^64 must not crash it.
        r = zmq.Context().socket(zmq.PUSH); r.connect(sys.argv[2])
        r.send(hdr(3, 1, 1) + struct.pack("<IQ", 7, 0xFFFFFFFFFFFFFFF0))
        r.close(linger=2000)
        """
        let py = try runProcess("/usr/bin/python3", ["-c", inject, "ipc://\(run)/sock/pass.in", "ipc://\(run)/sock/gen.ret"], timeout: 30)
        #expect(py.status == 0, "\(py.stderr)")
        // Four refusals, reported within 100 ms of each; a loaded machine may take a while to
        // read a 2 MB frame, so wait for them (and then a moment for any extra one).
        func passStage() throws -> ConfigValue { try #require(try liveStage(run, "pass")) }
        let waitUntil = Date().addingTimeInterval(20)
        while (try passStage())["dead_lettered"]?.intValue ?? 0 < 4 && Date() < waitUntil { usleep(100_000) }
        usleep(300_000)
        let pass = try passStage()
        #expect(pass["dead_lettered"]?.intValue == 4)
        #expect(pass["state"]?.stringValue != "failed")
        #expect(try keepsReceiving(run, "pass", from: pass["received"]?.intValue ?? 0, ms: 500))
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        let dl = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8)
        #expect(dl.contains("malformed frame: bad frame magic"))
        #expect(dl.contains("malformed envelope on lane 1"))
        #expect(dl.contains("envelope too large: 2000000 > limit 1048576"))
        #expect(dl.contains("refused a HANDOFF frame on lane 1, whose producer is not in this process"))
        let audit = try auditJSONL(run)
        #expect(audit.split(separator: "\n").filter { $0.contains(#""decision":"dead-letter""#) }.count == 4)
    }

    @Test func replicas_spreadRoundRobinAndLoseNothing() throws {
        let run = Paths.tempDir("replicas")
        // Paced so that no replica's lane fills even when the machine is busy with other tests:
        // then round-robin gives each replica a third, give or take what a full lane skipped.
        let paced = try String(contentsOfFile: Paths.root + "/pipelines/replicas.yaml", encoding: .utf8)
            .replacingOccurrences(of: "seed: 11 }", with: "seed: 11, rate: 20000 }")
        let (r, s) = try runPipeline(writeTemp(paced, "replicas.yaml"), runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        var total: Int64 = 0
        for i in 0..<3 {
            let w = try #require(stage(s, "work.\(i)"))
            let n = w["received"]?.intValue ?? 0
            #expect(n > 8000 && n < 12000, "replica \(i) took \(n)")   // round-robin: a third each
            #expect(w["placement"]?.stringValue == "process")
            total += n
        }
        #expect(total == 30_000)
        let lines = try linesWithoutIngest(run + "/replicas.jsonl")
        #expect(lines.count == 30_000)
        let ids = Set(lines.map { $0.prefix(45) })
        #expect(ids.count == 30_000)
        // The same envelopes as without replicas (order aside).
        let single = writeTemp(try String(contentsOfFile: Paths.root + "/pipelines/replicas.yaml", encoding: .utf8)
            .replacingOccurrences(of: "replicas: 3", with: "replicas: 1"), "single.yaml")
        let run1 = Paths.tempDir("single")
        let (r1, _) = try runPipeline(single, runDir: run1)
        #expect(r1.status == 0)
        #expect(Set(try linesWithoutIngest(run1 + "/replicas.jsonl")) == Set(lines))
    }

    @Test func replicas_onASink_areRefused() throws {
        let yaml = """
        stages:
          - { id: gen, kind: generator }
          - { id: out, kind: file-sink, inputs: [gen], replicas: 2, config: { path: x.jsonl } }
        """
        let r = try runProcess(Paths.pipectl, ["validate", writeTemp(yaml, "badrep.yaml")])
        #expect(r.status == 1)
        #expect(r.stdout.contains(":3:11: stage 'out': replicas > 1 is for transform stages"))
    }

    @Test func sigterm_endsAnIdleRateLimitedSourcePromptly() throws {
        let yaml = """
        pipeline: sleepy
        stages:
          - { id: gen, kind: generator, config: { count: 0, rate: 0.05 } }
          - { id: sink, kind: null-sink, inputs: [gen] }
        """
        let run = Paths.tempDir("sleepy")
        let p = try startPipeline(writeTemp(yaml, "sleepy.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(1)
        let t0 = Date()
        kill(p.processIdentifier, SIGTERM)
        while p.isRunning && Date().timeIntervalSince(t0) < 10 { usleep(20_000) }
        #expect(!p.isRunning)
        #expect(Date().timeIntervalSince(t0) < 5)
        #expect(p.terminationStatus == 0)
    }

    @Test func pipectl_withoutAHost_isAOneLineError() throws {
        let r = try runProcess(Paths.pipectl, ["lanes", "--run-dir", "/nonexistent/run"], timeout: 30)
        #expect(r.status == 1)
        #expect(r.stderr == "pipectl: no pipehost is running at ipc:///nonexistent/run/control.sock (socket file missing)\n")
        for cmd in [["top", "--once"], ["tap", "1"], ["workers"], ["status"], ["graph"]] {
            let x = try runProcess(Paths.pipectl, cmd + ["--run-dir", "/nonexistent/run"], timeout: 30)
            #expect(x.status == 1 && x.stderr.hasPrefix("pipectl: no pipehost is running at ") && x.stderr.split(separator: "\n").count == 1, "\(cmd): \(x.stderr)")
        }
        let usage = try runProcess(Paths.pipectl, ["lanes", "--bogus"], timeout: 30)
        #expect(usage.status == 64)
        #expect(usage.stderr.contains("Usage:"))
        // No subcommand at all is a usage error too, for both tools.
        for (tool, name) in [(Paths.pipectl, "pipectl"), (Paths.pipehost, "pipehost")] {
            let bare = try runProcess(tool, [], timeout: 30)
            #expect(bare.status == 64 && bare.stderr.contains("missing subcommand") && bare.stderr.contains("See '\(name) --help'"), "\(bare.stderr)")
        }
    }

    @Test func pipectl_validateAndStages() throws {
        let ok = try runProcess(Paths.pipectl, ["validate", Paths.root + "/pipelines/hello.yaml"])
        #expect(ok.status == 0)
        let bad = try runProcess(Paths.pipectl, ["validate", Paths.fixture("broken.yaml")])
        #expect(bad.status == 1)
        #expect(bad.stdout.split(separator: "\n").count == 10)
        // What the README runs: every example and its test file (checked as a test file).
        let examples = try FileManager.default.contentsOfDirectory(atPath: Paths.root + "/pipelines").filter { $0.hasSuffix(".yaml") }.sorted()
        let all = try runProcess(Paths.pipectl, ["validate"] + examples.map { Paths.root + "/pipelines/" + $0 })
        #expect(all.status == 0, "\(all.stdout)")
        #expect(all.stdout.contains("hello.test.yaml: valid test file (3 tests of "), "\(all.stdout)")
        let dir = try runProcess(Paths.pipectl, ["validate", Paths.root + "/pipelines"])
        #expect(dir.status == 1 && dir.stdout.contains("pipelines:1:1: is a directory; give pipeline files (e.g. "), "\(dir.stdout)")
        let stages = try pipectlJSON(["stages"])
        let kinds = stages.listValue?.compactMap { $0["kind"]?.stringValue } ?? []
        #expect(kinds == ["aligner", "causal-time", "executor", "external", "file-sink", "file-source", "gateway-events", "generator", "hop", "inbox", "intake-sim",
                          "mux", "null-sink", "passthrough", "police", "quarantine-sink", "reject-sink", "reseal-sink", "slot-injector", "sniffer",
                          "stdout-sink", "triage-sink", "twin", "twin-sim", "verify", "zmq-inbox"])
        let sniffer = try #require(stages.listValue?.first { $0["kind"]?.stringValue == "sniffer" })
        #expect(sniffer["outputs"] == .list(["ignore", "reject", "quarantine", "trusted-candidate", "triage-disguised", "reseal-candidate",
                                             "observed", "dead_letter"].map { .string($0) }))
        let hop = try #require(stages.listValue?.first { $0["kind"]?.stringValue == "hop" })
        #expect(hop["outputs"] == .list([.string("out"), .string("again"), .string("dead_letter")]))
        let gen = try #require(stages.listValue?.first { $0["kind"]?.stringValue == "generator" })
        #expect(gen["config"]?.listValue?.first { $0["name"]?.stringValue == "count" }?["default"] == .int(1000))
        let badRun = try runProcess(Paths.pipehost, ["run", Paths.fixture("broken.yaml")])
        #expect(badRun.status == 1)
        #expect(badRun.stderr.contains("broken.yaml:5:11: unknown stage kind 'generater'"))
    }

    @Test func keygen_writesKeyFilesWithMode0600() throws {
        let dir = Paths.tempDir("keys") + "/k"
        let r = try runProcess(Paths.pipehost, ["keygen", "-o", dir])
        #expect(r.status == 0, "\(r.stderr)")
        for f in ["signing.key", "signing.pub", "curve.key", "curve.pub"] {
            var sb = stat()
            #expect(stat(dir + "/" + f, &sb) == 0)
            #expect(sb.st_mode & 0o777 == 0o600, "\(f)")
        }
        #expect(try String(contentsOfFile: dir + "/signing.key", encoding: .utf8).count == 129)
        #expect(try String(contentsOfFile: dir + "/curve.pub", encoding: .utf8).count == 41)
        let again = try runProcess(Paths.pipehost, ["keygen", "-o", dir])
        #expect(again.status == 1 && again.stderr.contains("--force"))
    }
}
