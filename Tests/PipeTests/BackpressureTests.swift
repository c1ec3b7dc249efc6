import Testing
import Foundation
import PipeKit

/// Slow-consumer tests for each `when_full` policy, with the consumer in-process and in a worker
/// process.
@Suite("Backpressure policies", .serialized)
struct BackpressureTests {
    static func rssKiB(_ pid: Int32) -> Int {
        guard let s = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8),
              let line = s.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return -1 }
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? -1
    }

    /// `block`: over a 60 s stall of a process consumer (and 15 s of an in-process one), the lane's
    /// depth never exceeds its bound (plus the credits the producer may hold), the source slows to
    /// the consumer's pace, and the host's memory stays flat.
    @Test(arguments: [("process", 60), ("in-process", 15)])
    func block_slowsTheSource_boundsTheLane_keepsMemoryFlat(placement: String, seconds: Int) throws {
        let yaml = """
        pipeline: stalled
        stages:
          - { id: gen, kind: generator, config: { count: 0, payload_size: 1000 } }
          - { id: slow, kind: passthrough, inputs: [gen], placement: \(placement), config: { delay_us: 50000 } }
          - { id: sink, kind: null-sink, inputs: [slow] }
        lanes:
          - { from: gen, to: slow, bound: 64 }
        """
        let run = Paths.tempDir("block")
        let p = try startPipeline(writeTemp(yaml, "stalled.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(5)
        let rssStart = Self.rssKiB(p.processIdentifier)
        var maxInFlight: Int64 = 0
        var samples = 0
        var states: [String] = []
        var firstViolation: String?
        let end = Date().addingTimeInterval(Double(seconds))
        while Date() < end {
            let lanes = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
            if let l = lanes.first(where: { $0["from"]?.stringValue == "gen.out" && $0["to"]?.stringValue == "slow.in" }) {
                // Raw counts from the two ends' reports, which are taken at different moments:
                // while the consumer's report is older, it kept taking 20/s.
                let lag = max(0, (l["sent_report_ns"]?.intValue ?? 0) - (l["received_report_ns"]?.intValue ?? 0))
                let inFlight = (l["sent"]?.intValue ?? 0) - (l["received"]?.intValue ?? 0) - lag * 20 / 1_000_000_000
                if inFlight > maxInFlight && inFlight > 66 && firstViolation == nil { firstViolation = JSON.serialize(.list(lanes)) }
                maxInFlight = max(maxInFlight, inFlight)
                samples += 1
                states.append(l["state"]?.stringValue ?? "?")
            }
            usleep(1_000_000)
        }
        let rssEnd = Self.rssKiB(p.processIdentifier)
        let st = try pipectlJSON(["status", "--run-dir", run])
        let gen = st["stages"]?.listValue?.first { $0["id"]?.stringValue == "gen" }
        let slow = st["stages"]?.listValue?.first { $0["id"]?.stringValue == "slow" }
        #expect(samples >= seconds * 8 / 10)
        // The stalled lane reads as under pressure throughout (its depth swings between half and
        // all of the bound as credits come back half a window at a time).
        #expect(states.filter { $0 == "normal" }.count * 10 <= samples, "\(states)")
        #expect(states.contains("overloaded"))
        let lanesNow = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        let blockedPct = lanesNow.first { $0["from"]?.stringValue == "gen.out" }?["blocked_pct"]?.doubleValue ?? 0
        #expect(blockedPct > 50, "the source waits on the stalled lane most of the time (\(blockedPct)%)")
        #expect(maxInFlight <= 64 + 2, "in flight reached \(maxInFlight) with bound 64: \(firstViolation ?? "")")
        #expect(slow?["restarts"]?.intValue == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8))?.split(separator: "\n").filter { !$0.contains("lane 1") }.suffix(8).joined(separator: "\n") ?? "")")
        // The source emitted only what the stalled consumer took, plus one lane's worth.
        let emitted = gen?["emitted"]?.intValue ?? 0, taken = slow?["received"]?.intValue ?? 0
        let lag = max(0, (gen?["report_ns"]?.intValue ?? 0) - (slow?["report_ns"]?.intValue ?? 0)) * 20 / 1_000_000_000
        #expect(emitted <= taken + lag + 64 + 2, "emitted \(emitted), consumer took \(taken) (+\(lag) while its report aged)")
        let expected = Int64(seconds + 5) * 20
        #expect(taken > expected * 6 / 10 && taken < expected * 14 / 10, "consumer took \(taken) in ~\(seconds + 5) s at 20/s")
        #expect(rssStart > 0 && rssEnd - rssStart < 8 * 1024, "host RSS \(rssStart) KiB -> \(rssEnd) KiB")
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
    }

    /// A byte bound holds a lane of big envelopes to what fits in it, far below its count bound.
    /// A chain behind one slow stage says where it is stuck: each stage upstream of it is
    /// `blocked on lane N` (its full output lane: a transform that stops taking input for want
    /// of credit counts as blocked, not only one with envelopes queued), the slow one is `busy`,
    /// and the host names it as what the pipeline waits on, with the full lane into it.
    @Test(arguments: ["process", "in-process"])
    func aChainBehindASlowStage_namesTheStageItWaitsOn(placement: String) throws {
        let yaml = """
        pipeline: stuck
        defaults:
          lane: { bound: 64 }
        stages:
          - { id: gen, kind: generator, config: { count: 0, payload_size: 100, rate: 2000 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: \(placement) }
          - { id: out, kind: null-sink, inputs: [pass], config: { delay_us: 2000 } }
        """
        let run = Paths.tempDir("stuck-\(placement)")
        let p = try startPipeline(writeTemp(yaml, "stuck.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        let lanes = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        let toPass = try #require(lanes.first { $0["to"]?.stringValue == "pass.in" }?["id"]?.intValue)
        let toOut = try #require(lanes.first { $0["to"]?.stringValue == "out.in" }?["id"]?.intValue)
        var last = ConfigValue.null
        func state(_ id: String) -> String {
            (last["stages"]?.listValue ?? []).first { $0["id"]?.stringValue == id }?["state"]?.stringValue ?? "?"
        }
        let named = try poll(true, seconds: 20, everyMs: 250) {
            last = try pipectlJSON(["status", "--run-dir", run])
            let waitedOn = last["bottlenecks"]?.listValue ?? []
            return state("gen") == "blocked on lane \(toPass)" && state("pass") == "blocked on lane \(toOut)" && state("out") == "busy"
                && waitedOn.count == 1 && waitedOn.first?["stage"]?.stringValue == "out"
                && waitedOn.first?["full_lanes"]?.listValue?.compactMap(\.intValue) == [toOut]
        }
        #expect(named, "\(JSON.serialize(last))")
        // The lane the transform waits on reads as blocked at its producer, as the source's does.
        let now = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        for id in [toPass, toOut] {
            let pct = now.first { $0["id"]?.intValue == id }?["blocked_pct"]?.doubleValue ?? 0
            #expect(pct > 50, "lane \(id): blocked \(pct)%")
        }
        let text = try runProcess(Paths.pipectl, ["status", "--run-dir", run])
        #expect(text.stdout.contains("waiting on: out (busy "), "\(text.stdout)")
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
    }

    @Test func byteBound_limitsTheLaneInBytes() throws {
        let yaml = """
        pipeline: bytes
        stages:
          - { id: gen, kind: generator, config: { count: 0, payload_size: 1000 } }
          - { id: slow, kind: passthrough, inputs: [gen], placement: process, config: { delay_us: 20000 } }
          - { id: sink, kind: null-sink, inputs: [slow] }
        lanes:
          - { from: gen, to: slow, bound: 1024, bytes: 4096 }
        """
        let run = Paths.tempDir("bytes")
        let p = try startPipeline(writeTemp(yaml, "bytes.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        var worst: Int64 = 0
        for _ in 0..<8 {
            let l = try #require(try pipectlJSON(["lanes", "--run-dir", run]).listValue?.first { $0["from"]?.stringValue == "gen.out" })
            #expect(l["bytes"]?.intValue == 4096)
            let lag = max(0, (l["sent_report_ns"]?.intValue ?? 0) - (l["received_report_ns"]?.intValue ?? 0)) * 50 / 1_000_000_000
            worst = max(worst, (l["sent"]?.intValue ?? 0) - (l["received"]?.intValue ?? 0) - lag)
            usleep(300_000)
        }
        // Envelopes of ~1.1 KB: 4096 bytes hold 3, and one more may go when nothing is in flight.
        #expect(worst >= 1 && worst <= 5, "in flight reached \(worst) envelopes under a 4096-byte bound")
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
    }

    /// `drop_newest` and `drop_oldest`: every envelope is either delivered or dropped, counted
    /// exactly and audited once.
    @Test(arguments: ["drop_newest", "drop_oldest"], ["in-process", "process"])
    func drops_areExact_andAddUp(policy: String, placement: String) throws {
        let yaml = """
        pipeline: dropping
        stages:
          - { id: gen, kind: generator, config: { count: 5000, payload: '{"n":{n}}', seed: 3 } }
          - { id: slow, kind: passthrough, inputs: [gen], placement: \(placement), config: { delay_us: 200 } }
          - { id: out, kind: file-sink, inputs: [slow], config: { path: out.jsonl, include_ingest: false } }
        lanes:
          - { from: gen, to: slow, bound: 16, when_full: \(policy) }
        """
        let run = Paths.tempDir("drop")
        let (r, s) = try runPipeline(writeTemp(yaml, "dropping.yaml"), runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        let l = try #require(lane(s, from: "gen.out", to: "slow.in"))
        let sent = l["sent"]?.intValue ?? -1, dropped = l["dropped"]?.intValue ?? -1
        #expect(dropped > 0, "a 5000-envelope burst into a bound of 16 must drop")
        #expect(sent + dropped == 5000, "sent \(sent) + dropped \(dropped)")
        #expect(l["received"]?.intValue == sent)
        let lines = try linesWithoutIngest(run + "/out.jsonl")
        #expect(lines.count == Int(sent))
        // What arrived is in order, with gaps where envelopes were dropped.
        let ns = try lines.map { try JSON.parse($0)["payload"]?["n"]?.intValue ?? 0 }
        #expect(zip(ns, ns.dropFirst()).allSatisfy { $0 < $1 })
        if policy == "drop_newest" { #expect(ns.first == 1) }
        if policy == "drop_oldest" { #expect(ns.last == 5000) }
        let audit = try auditJSONL(run)
        let drops = audit.split(separator: "\n").filter { $0.contains(#""decision":"drop""#) && $0.contains("(\(policy))") }
        #expect(drops.count == Int(dropped))
    }

    /// `spill`: the overflow goes to disk in order; a graceful stop leaves it there; the next run
    /// with the same run directory sends it first. Nothing lost, nothing reordered. Under
    /// at-least-once too, where the spilling stage keeps read-back rows until acknowledged: the
    /// stop must still end promptly, leaving the unread rest on disk.
    @Test(arguments: [("in-process", "at-most-once"), ("process", "at-most-once"), ("in-process", "at-least-once")])
    func spill_keepsOrder_andSurvivesAHostRestart(placement: String, delivery: String) throws {
        func yaml(_ gen: String, seed: Int = 9) -> String {
            """
            pipeline: spilling
            delivery: \(delivery)
            stages:
              - { id: gen, kind: generator, config: { \(gen), seed: \(seed) } }
              - { id: slow, kind: passthrough, inputs: [gen], placement: \(placement), config: { delay_us: 300 } }
              - { id: out, kind: file-sink, inputs: [slow], config: { path: out.jsonl, append: true, include_ingest: false } }
            lanes:
              - { from: gen, to: slow, bound: 32, when_full: spill }
            """
        }
        let run = Paths.tempDir("spill")
        let first = run + "/first.json"
        let p = try startPipeline(writeTemp(yaml(#"count: 0, rate: 8000, payload: '{"n":{n}}'"#), "spill1.yaml"), runDir: run,
                                  extra: ["--summary-json", first])
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        kill(p.processIdentifier, SIGTERM)
        let stopAsked = Date()
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        // Reading the whole spill back through the slow stage would take several seconds.
        #expect(Date().timeIntervalSince(stopAsked) < 3, "the stop drained the spill instead of leaving it")
        let s1 = try JSON.parse(try String(contentsOfFile: first, encoding: .utf8))
        let l1 = try #require(lane(s1, from: "gen.out", to: "slow.in"))
        let emitted = try #require(stage(s1, "gen")?["emitted"]?.intValue)
        let left = l1["spill_depth"]?.intValue ?? 0
        #expect(left > 1000, "the stop should leave a spill behind (left \(left))")
        #expect((l1["sent"]?.intValue ?? 0) + left == emitted)
        #expect(FileManager.default.fileExists(atPath: run + "/spill/gen.out--slow.in.sqlite"))

        // Second run: one more envelope after whatever was left (another seed: the same seed would
        // give the first run's first id, which an at-least-once sink has seen).
        let (r2, s2) = try runPipeline(writeTemp(yaml(#"count: 1, payload: '{"n":"end"}'"#, seed: 10), "spill2.yaml"), runDir: run)
        #expect(r2.status == 0, "\(r2.stderr)")
        #expect(lane(s2, from: "gen.out", to: "slow.in")?["spill_depth"]?.intValue == 0)
        let ns = try linesWithoutIngest(run + "/out.jsonl").map { try JSON.parse($0)["payload"]?["n"] ?? .null }
        #expect(ns.count == Int(emitted) + 1)
        let ints = ns.dropLast().map { $0.intValue ?? 0 }
        let firstWrong = ints.enumerated().first { $0.element != Int64($0.offset + 1) }
        #expect(firstWrong == nil, "out of order or missing from position \(firstWrong?.offset ?? -1): got \(firstWrong?.element ?? -1)")
        #expect(ns.last == .string("end"))
    }
    /// A drain behind a stuck consumer can take long; a second signal aborts it, saying so.
    @Test func secondSignalWhileDraining_aborts() throws {
        let yaml = """
        pipeline: stuck
        stages:
          - { id: gen, kind: generator, config: { count: 0 } }
          - { id: slow, kind: passthrough, inputs: [gen], config: { delay_us: 50000 } }
          - { id: sink, kind: null-sink, inputs: [slow] }
        """
        let run = Paths.tempDir("abort")
        let p = try startPipeline(writeTemp(yaml, "stuck.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        kill(p.processIdentifier, SIGTERM)
        sleep(1)
        #expect(p.isRunning, "a full lane of 1024 at 20/s takes ~50 s to drain")
        let t0 = Date()
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(Date().timeIntervalSince(t0) < 10)
        #expect(p.terminationStatus == 1)
        let log = (try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? ""
        #expect(log.contains("aborted by a second signal while draining"))
    }
}
