import CapStages
import Foundation
import PipeKit
import PipeKitTesting
import PipeRuntime
import PipeSeal

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

    static func report(quick: Bool) throws {
        let secs = quick ? 1.0 : 3.0
        let input = caps(4096)
        let place = try StageHarness(CausalTimeStage.descriptor, config: .object([("vector_clocks", .bool(true))]))
        let p = try rate(place, input, seconds: secs, drainOutputs: ["out", "triage"])
        let unsigned = try StageHarness(ExecutorStage.descriptor)
        let u = try rate(unsigned, input, seconds: secs, drainOutputs: ["receipts", "followups"])
        let dir = NSTemporaryDirectory() + "pipe-bench-cap-\(getpid())"
        _ = try KeyFiles.loadOrCreateSigningKey(dir + "/executor.key", create: true)
        let signed = try StageHarness(ExecutorStage.descriptor, config: .object([("key", .string("executor.key")), ("batch_size", .int(64))]), runDirectory: dir)
        let s = try rate(signed, input, seconds: secs, drainOutputs: ["receipts", "followups"])
        print(String(format: "causal-time embedded (vector clocks):        %.0f caps/s", p))
        print(String(format: "executor embedded, echo, unsigned receipts:   %.0f caps/s", u))
        print(String(format: "executor embedded, echo, batch-signed (64):   %.0f caps/s = %.2fx unsigned", s, s / u))
        let n = quick ? 20_000 : 100_000
        let yaml = """
        pipeline: cap-bench
        audit: decisions
        stages:
          - { id: caps, kind: generator, config: { count: \(n), seed: 3, actor: operator.anna, intent: crane.inspect, payload: "inspect {n}", attrs: { continuation: receipt } } }
          - { id: place, kind: causal-time, inputs: [caps], config: { vector_clocks: true } }
          - { id: exec, kind: executor, inputs: [place], config: { key: keys/executor.key, create_key: true, batch_size: 64 } }
          - { id: sink, kind: null-sink, inputs: [exec.receipts] }
        """
        var runs: [Double] = []
        for _ in 0..<3 { runs.append(try runPipeline(yaml, name: "cap").rate) }
        let r = runs.sorted()[1]
        print(String(format: "generator -> causal-time -> executor (signed) -> null sink, in-process, audit on: %.0f caps/s (median of 3, %d caps)", r, n))
        print("(the peer's ~5,000 caps/s is the whole chain: no ratio until mux, slot-injector and aligner exist)")
        try? FileManager.default.removeItem(atPath: dir)
    }
}
