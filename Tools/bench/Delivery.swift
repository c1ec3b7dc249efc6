import Foundation
import PipeRuntime

/// At-least-once delivery's cost (issue 8, docs/delivery.md): generator -> passthrough -> sink
/// with acknowledgements off and on, measured in the same run (runs interleaved),
/// (7 back-to-back pairs, 3 with --quick; the cost is the median of the pairs' ratios), in-process and with the passthrough in a worker process; then the durable variant (the
/// generator journaled to SQLite, the sink a file-sink that deduplicates from its own file).
enum DeliveryBench {
    static func chain(count: Int, placement: String, delivery: String, durable: Bool = false) -> String {
        let sink = durable ? "{ id: sink, kind: file-sink, inputs: [pass], config: { path: out.jsonl, append: true } }"
                           : "{ id: sink, kind: null-sink, inputs: [pass] }"
        return """
        pipeline: bench-delivery
        delivery: \(delivery)
        stages:
          - { id: gen, kind: generator, config: { count: \(count), payload_size: 100, seed: 1\(durable ? ", durable: true" : "") } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: \(placement) }
          - \(sink)
        """
    }

    static func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }

    static func report(quick: Bool) throws {
        let n = quick ? 300_000 : 1_000_000
        print("delivery bench: \(n) envelopes of 100 bytes per run, \(ProcessInfo.processInfo.activeProcessorCount) cores")
        var lines: [String] = []
        for placement in ["in-process", "process"] {
            // Pairs run back to back share the machine's state of the moment; the cost is the
            // median of the pairs' ratios (the machine's drift between pairs drops out).
            var off: [Double] = [], on: [Double] = [], ratios: [Double] = []
            for _ in 0..<(quick ? 3 : 7) {
                let o = try runPipeline(chain(count: n, placement: placement, delivery: "at-most-once"), name: "dv-off").rate
                let r = try runPipeline(chain(count: n, placement: placement, delivery: "at-least-once"), name: "dv-on")
                let acked = r.summary.stages.first { $0.id == "gen" }?.status.first { $0.0 == "delivery.acks_received" }?.1
                guard case .int(let a)? = acked, a == Int64(n) else { throw RuntimeError.plan("at-least-once run: the generator saw \(String(describing: acked)) acknowledgements, expected \(n)") }
                off.append(o); on.append(r.rate); ratios.append(r.rate / o)
            }
            let ratio = median(ratios)
            print("\(placement): acks off \(fmt(median(off))), acks on \(fmt(median(on)))  (pair ratios \(ratios.map { String(format: "%.2f", $0) }.joined(separator: " ")))")
            lines.append(String(format: "ratio acks on / off, %@: %.2f x  (cost %.0f%%, median of %d pairs; target: cost <= 25%%)", placement, ratio, (1 - ratio) * 100, ratios.count))
        }
        var durable: [Double] = []
        for _ in 0..<3 { durable.append(try runPipeline(chain(count: n, placement: "in-process", delivery: "at-least-once", durable: true), name: "dv-durable").rate) }
        print("durable generator (SQLite journal) -> passthrough -> file-sink (dedup from its file), at-least-once: \(fmt(median(durable)))")
        print("")
        for l in lines { print(l) }
    }
}
