import Testing
import Foundation
import PipeKit

/// Against a live host: the Prometheus endpoint, lane states, top, tap.
@Suite("Observability against a running host", .serialized)
struct ObservabilityTests {
    static let backedUp = """
    pipeline: backed-up
    metrics: { listen: 127.0.0.1:0 }
    stages:
      - { id: gen, kind: generator, config: { count: 0, rate: 3000, payload: '{"n":{n}}' } }
      - { id: pass, kind: passthrough, inputs: [gen], placement: process }
      - { id: slow, kind: null-sink, inputs: [pass], config: { delay_us: 1000 } }
    lanes:
      - { from: pass, to: slow, bound: 100 }
    """

    /// The exposition parsed by an independent parser (python3-prometheus-client).
    @Test func metrics_exposition_parsesAndAddsUp() throws {
        let run = Paths.tempDir("metrics")
        let p = try startPipeline(writeTemp(Self.backedUp, "backed-up.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        let addr = try String(contentsOfFile: run + "/metrics.addr", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(addr.hasPrefix("127.0.0.1:"))
        let script = """
        import json, sys, urllib.request, urllib.error
        from prometheus_client.parser import text_string_to_metric_families
        base = "http://" + sys.argv[1]
        text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
        out = {"families": {}, "samples": []}
        for f in text_string_to_metric_families(text):
            out["families"][f.name] = f.type
            for s in f.samples:
                out["samples"].append([s.name, s.labels, s.value])
        try:
            urllib.request.urlopen(base + "/nope", timeout=5)
            out["nope"] = 200
        except urllib.error.HTTPError as e:
            out["nope"] = e.code
        print(json.dumps(out))
        """
        let r = try runProcess("/usr/bin/python3", ["-c", script, addr], timeout: 30)
        #expect(r.status == 0, "\(r.stderr)")
        let v = try JSON.parse(r.stdout)
        let families = v["families"]?.mapEntries ?? []
        func type(_ n: String) -> String? { families.first { $0.key == n }?.value.stringValue }
        #expect(type("pipehost_stage_received") == "counter")
        #expect(type("pipehost_stage_processing_seconds") == "histogram")
        #expect(type("pipehost_lane_depth") == "gauge")
        #expect(type("pipehost_lane_latency_seconds") == "histogram")
        #expect(type("pipehost_lane_blocked_seconds") == "counter")
        #expect(v["nope"]?.intValue == 404)
        let samples = (v["samples"]?.listValue ?? []).compactMap { s -> (String, [String: String], Double)? in
            guard let l = s.listValue, l.count == 3, let n = l[0].stringValue, let v = l[2].doubleValue else { return nil }
            var labels: [String: String] = [:]
            for e in l[1].mapEntries ?? [] { labels[e.key] = e.value.stringValue }
            return (n, labels, v)
        }
        func value(_ n: String, _ match: [String: String]) -> Double? {
            samples.first { s in s.0 == n && match.allSatisfy { k, v in s.1[k] == v } }?.2
        }
        #expect((value("pipehost_stage_received_total", ["stage": "slow"]) ?? 0) > 100)
        #expect(value("pipehost_stage_restarts_total", ["stage": "pass", "placement": "process"]) == 0)
        // Lane states are one-hot per lane.
        let states = samples.filter { $0.0 == "pipehost_lane_state" && $0.1["from"] == "pass.out" }
        #expect(states.count == 4 && states.map(\.2).reduce(0, +) == 1)
        // Histograms: cumulative buckets, +Inf bucket equals _count.
        let buckets = samples.filter { $0.0 == "pipehost_lane_latency_seconds_bucket" && $0.1["from"] == "pass.out" }
        #expect(buckets.count == 28)
        #expect(zip(buckets, buckets.dropFirst()).allSatisfy { $0.2 <= $1.2 })
        let count = value("pipehost_lane_latency_seconds_count", ["from": "pass.out"]) ?? -1
        #expect(count > 0 && buckets.last?.2 == count && buckets.last?.1["le"] == "+Inf")
        // The slow consumer backs the lane up: the producer was blocked and the lane is not normal.
        #expect((value("pipehost_lane_blocked_seconds_total", ["from": "pass.out"]) ?? 0) > 0.1)
        #expect(value("pipehost_lane_state", ["from": "pass.out", "state": "normal"]) == 0)
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        #expect(!FileManager.default.fileExists(atPath: run + "/metrics.addr"))
        // Every watermark transition is audited.
        let audit = try auditJSONL(run)
        #expect(audit.contains(#""decision":"lane-state""#) && audit.contains("pass.out -> slow.in: normal -> "))
    }
    /// `pipectl top --once` prints one frame; the live view runs in a terminal and quits on q.
    @Test func top_onceAndLive() throws {
        let run = Paths.tempDir("top")
        let p = try startPipeline(writeTemp(Self.backedUp, "backed-up.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        let once = try runProcess(Paths.pipectl, ["top", "--once", "--run-dir", run])
        #expect(once.status == 0, "\(once.stderr)")
        let lines = once.stdout.split(separator: "\n").map(String.init)
        #expect(lines.first?.hasPrefix("pipehost top: pipeline backed-up") == true)
        #expect(!once.stdout.contains("\u{1B}["))   // no colour or screen control for scripts
        let slowRow = try #require(lines.first { $0.hasPrefix("slow ") })
        #expect(slowRow.contains("null-sink") && slowRow.contains("in-process"))
        let laneRow = try #require(lines.first { $0.contains("pass.out -> slow.in") })
        #expect(laneRow.contains("overloaded") || laneRow.contains("recovering"))
        #expect(laneRow.contains("[") && laneRow.contains("/100"))
        // Live, in a pseudo-terminal: a few refreshes, then q.
        let live = try runProcess("/bin/sh", ["-c", "(sleep 1.5; printf q) | env -u NO_COLOR script -qfec '\(Paths.pipectl) top --interval 0.3 --run-dir \(run)' /dev/null"], timeout: 20)
        #expect(live.status == 0, "\(live.stderr)")
        #expect(live.stdout.components(separatedBy: "\u{1B}[H\u{1B}[2J").count >= 3, "expected several refreshes")
        #expect(live.stdout.contains("\u{1B}[31;1moverloaded") || live.stdout.contains("\u{1B}[36mrecovering"), "\(live.stdout.suffix(600).debugDescription)")
        let noTerminal = try runProcess(Paths.pipectl, ["top", "--run-dir", run])
        #expect(noTerminal.status == 64 && noTerminal.stderr.contains("--once"))
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
    }

    /// `pipectl tap` shows envelopes of one lane, in-process producer and worker producer alike,
    /// and a slow or absent reader never holds the lane up.
    @Test func tap_samplesALane_withoutSlowingIt() throws {
        let run = Paths.tempDir("tap")
        let p = try startPipeline(writeTemp(Self.backedUp, "backed-up.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(1)
        let a = try runProcess(Paths.pipectl, ["tap", "gen.out->pass.in", "--limit", "3", "--run-dir", run], timeout: 30)
        #expect(a.status == 0, "\(a.stderr)")
        let rows = a.stdout.split(separator: "\n")
        #expect(rows.count == 3 && rows.allSatisfy { $0.contains("actor=generator") && $0.contains("payload(") && $0.contains("{\"n\":") })
        let b = try runProcess(Paths.pipectl, ["tap", "pass.out", "--limit", "2", "--json", "--run-dir", run], timeout: 30)
        #expect(b.status == 0, "\(b.stderr)")
        let envs = try b.stdout.split(separator: "\n").map { try JSON.parse(String($0)) }
        #expect(envs.count == 2 && envs.allSatisfy { $0["payload"]?["n"]?.intValue != nil })
        let bad = try runProcess(Paths.pipectl, ["tap", "nowhere", "--run-dir", run])
        #expect(bad.status == 64 && bad.stderr.contains("no lane match 'nowhere'") && bad.stderr.contains("gen.out->pass.in"))
        // A reader that subscribes and never reads: the lane keeps its pace.
        let stuck = Process()
        stuck.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        stuck.arguments = ["-c", "import zmq,time,sys; s=zmq.Context().socket(zmq.SUB); s.setsockopt(zmq.RCVHWM,1); s.connect(sys.argv[1]); s.setsockopt(zmq.SUBSCRIBE, bytes([0,0,0,1])); time.sleep(30)",
                           "ipc://\(run)/sock/gen.tap"]
        try stuck.run()
        defer { stuck.terminate() }
        let before = try pipectlJSON(["status", "--run-dir", run])["stages"]?.listValue?.first { $0["id"]?.stringValue == "gen" }?["emitted"]?.intValue ?? 0
        sleep(2)
        let after = try pipectlJSON(["status", "--run-dir", run])["stages"]?.listValue?.first { $0["id"]?.stringValue == "gen" }?["emitted"]?.intValue ?? 0
        #expect(after - before > 1000, "the source kept emitting while a tap reader was stuck (\(after - before) in 2 s)")
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
    }
}
