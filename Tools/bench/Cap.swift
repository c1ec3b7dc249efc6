import AlignerStages
import CausalStages
import ExecutorStages
import GatewayStages
import MuxStages
import SlotStages
import Foundation
import PipeKit
import PipeKitTesting
import PipeRuntime
import PipeSeal
import PipeStore

/// The cap pipeline stages built so far, each in the embedded harness (audit records captured),
/// and the causal-time -> executor loop through a running pipeline with the audit log on. The
/// peer's figure (bench_capbus.py, ~5,000 caps/s) is for the whole chain (placer, mux, slots,
/// aligner, executor); until those stages exist no ratio against it is printed.
enum CapBench {
    static func caps(_ n: Int) -> [Envelope] {
        (0..<n).map { i in
            var e = Envelope(actor: "operator.\(i % 4)", intent: "crane.inspect", payload: Array("inspect bay \(i)".utf8))
            e.attrs["continuation"] = .string("receipt")
            return e
        }
    }

    static func rate(_ h: StageHarness, _ input: [Envelope], seconds: Double, drainOutputs: [String]) throws -> Double {
        var ops = 0
        let start = DispatchTime.now().uptimeNanoseconds
        let deadline = start + UInt64(seconds * 1e9)
        var now = start
        while now < deadline {
            for e in input { try h.feed(e) }
            for o in drainOutputs { _ = h.take(o) }
            _ = h.takeAudits()
            ops += input.count
            now = DispatchTime.now().uptimeNanoseconds
        }
        return Double(ops) / (Double(now - start) / 1e9)
    }

    /// The peer's figure, measured now: `bench_capbus.py` case A in the peer virtualenv when present.
    static func peer() -> (rate: Double, measured: Bool) { peerRate(script: "bench_capbus.py", caseMarker: "A capbus emit+run_cap", fallback: 5_000) }

    static func chainYAML(caps n: Int, signed: Bool) -> String {
        """
        pipeline: cap-bench
        audit: decisions
        stages:
          - { id: caps, kind: generator, config: { count: \(n), seed: 3, actor: operator.anna, intent: crane.inspect, payload: "inspect {n}", attrs: { continuation: receipt } } }
          - { id: place, kind: causal-time, inputs: [caps], config: { vector_clocks: true } }
          - { id: mux, kind: mux, inputs: [place], config: { lanes: { main: { lane_collision_policy: queue } }, default_lane: main } }
          - { id: slots, kind: slot-injector, inputs: [mux.main] }
          - { id: align, kind: aligner, inputs: [slots], config: { max_wait_ms: 5 } }
          - { id: exec, kind: executor, inputs: [align], config: { \(signed ? "key: keys/executor.key, create_key: true, " : "")batch_size: 64 } }
          - { id: sink, kind: null-sink, inputs: [exec.receipts] }
        """
    }

    static func report(quick: Bool) throws {
        let peer = peer()
        print(String(format: "peer: tibet-cap-bus emit+run_cap (bench_capbus.py case A): %.0f caps/s %@", peer.rate,
                     peer.measured ? "(measured now)" : "(not installed here: the documented figure)"))
        let secs = quick ? 1.0 : 3.0
        let input = caps(4096)
        let dir = NSTemporaryDirectory() + "pipe-bench-cap-\(getpid())"
        _ = try KeyFiles.loadOrCreateSigningKey(dir + "/executor.key", create: true)
        var laned = input
        for i in laned.indices { laned[i].lane = "main"; laned[i].rank = UInt64(i + 1) }
        let stages: [(String, StageHarness, [Envelope], [String])] = [
            ("causal-time (vector clocks)", try StageHarness(CausalTimeStage.descriptor, config: .object([("vector_clocks", .bool(true))])), input, ["out", "triage"]),
            ("mux (one queue lane)", try StageHarness(MuxStage.descriptor, config: .object([("lanes", .object([("main", .object([]))])), ("default_lane", .string("main"))])), input, ["main", "triage_reject"]),
            ("slot-injector (SQLite write-behind)", try StageHarness(SlotInjectorStage.descriptor, store: try SQLiteKeyValueStore(path: dir + "/slots.sqlite")), laned, ["out"]),
            ("executor, echo, unsigned receipts", try StageHarness(ExecutorStage.descriptor), input, ["receipts", "followups"]),
            ("executor, echo, batch-signed (64)", try StageHarness(ExecutorStage.descriptor, config: .object([("key", .string("executor.key")), ("batch_size", .int(64))]), runDirectory: dir), input, ["receipts", "followups"]),
        ]
        for (name, h, inp, outs) in stages {
            let r = try rate(h, inp, seconds: secs, drainOutputs: outs)
            print(String(format: "  embedded %@: %.0f caps/s", name, r))
        }
        // The aligner with one input releases each envelope at once; fed ranks in order.
        let align = try StageHarness(AlignerStage.descriptor)
        var ranked = input
        var rank: UInt64 = 0
        var ops = 0
        let t0 = DispatchTime.now().uptimeNanoseconds
        while DispatchTime.now().uptimeNanoseconds - t0 < UInt64(secs * 1e9) {
            for i in ranked.indices { rank += 1; ranked[i].rank = rank }
            for e in ranked { try align.feed(e) }
            _ = align.take(); ops += ranked.count
        }
        print(String(format: "  embedded aligner (one input): %.0f caps/s", Double(ops) / (Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)))
        let n = quick ? 20_000 : 100_000
        var results: [(String, Double)] = []
        for signed in [false, true] {
            var runs: [Double] = []
            for _ in 0..<3 { runs.append(try runPipeline(chainYAML(caps: n, signed: signed), name: "cap").rate) }
            let r = runs.sorted()[1]
            results.append((signed ? "batch-signed" : "unsigned", r))
            print(String(format: "chain caps -> causal-time -> mux -> slot-injector -> aligner -> executor (%@) -> null sink, in-process, audit on: %.0f caps/s (median of 3, %d caps)",
                         signed ? "batch-signed" : "unsigned", r, n))
        }
        print("")
        print(String(format: "ratio unsigned chain / peer:      %.1f x  (target >= 50)", results[0].1 / peer.rate))
        print(String(format: "ratio batch-signed chain / peer:  %.1f x  (target >= 25)", results[1].1 / peer.rate))
        try? FileManager.default.removeItem(atPath: dir)
    }
}
