import Foundation
import PipeKit
import PipeKitTesting
import TwinStages
import PipeRuntime

/// The twin comparator's benchmark, shaped like the peer's (`bench_twin.py`, case A): one device,
/// tolerances on position_x and load_kg, a ring of 1024 prebuilt physical/twin state pairs of
/// which 3 in 8 are out of sync (drift, status, value). One op = physical update + twin update +
/// one intent judged, emitted and audited.
enum TwinBench {
    static let base: Int64 = 1_777_636_800_000_000_000  // 2026-05-01T12:00:00Z

    struct Step { var physical: Envelope; var twin: Envelope; var intent: Envelope; var wallNs: UInt64 }

    static func ring() -> [Step] {
        (0..<1024).map { k in
            let t = base + Int64(k) * 10_000_000
            let kind = k % 8
            let x = 12.5 + Double(k % 7) * 0.01
            var twinTs = t + 50_000_000, pStatus = "operational", twinLoad = 2500.0
            if kind == 5 { twinTs = t + 503_000_000 } else if kind == 6 { pStatus = "fault" } else if kind == 7 { twinLoad = 3200 }
            func state(_ kind: String, _ ts: Int64, _ load: Double, _ status: String) -> Envelope {
                let payload = #"{"device_id":"crane-01","timestamp":"\#(RFC3339Text.format(ts))","values":{"position_x":\#(x),"position_y":8.3,"load_kg":\#(load)},"status":"\#(status)"}"#
                return Envelope(actor: "crane-01." + kind, intent: "twin.state", attrs: ["twin_kind": .string(kind), "device": .string("crane-01")],
                                payload: Array(payload.utf8))
            }
            return Step(physical: state("physical", t, 2500, pStatus), twin: state("twin", twinTs, twinLoad, "operational"),
                        intent: Envelope(actor: "operator", intent: "move_left", attrs: ["twin_kind": .string("intent"), "device": .string("crane-01")]),
                        wallNs: UInt64(twinTs + 5_000_000))
        }
    }

    static let config: ConfigValue = .object([("profile", .string("port")),
                                              ("tolerances", .object([("position_x", .double(0.5)), ("load_kg", .double(100))]))])

    /// Ops per second through the stage in the embedded harness, every decision's audit record
    /// captured (and counted, so none is skipped).
    static func embedded(seconds: Double) throws -> (rate: Double, blockRate: Double) {
        let h = try StageHarness(TwinStage.descriptor, config: config)
        let steps = ring()
        var ops = 0, audits = 0, blocked = 0
        let start = DispatchTime.now().uptimeNanoseconds
        let deadline = start + UInt64(seconds * 1e9)
        var now = start
        while now < deadline {
            for i in 0..<1024 {
                let s = steps[i]
                h.wallClockNs = s.wallNs
                try h.feed(s.physical)
                try h.feed(s.twin)
                try h.feed(s.intent)
            }
            ops += 1024
            blocked += h.take("blocked").count
            _ = h.take("allowed")
            audits += h.takeAudits().count
            now = DispatchTime.now().uptimeNanoseconds
        }
        precondition(audits == ops && h.deadLetters.isEmpty, "every decision must be audited (\(audits) of \(ops))")
        return (Double(ops) / (Double(now - start) / 1e9), Double(blocked) / Double(ops))
    }
}

extension TwinBench {
    /// Decisions per second through a running pipeline: twin-sim -> twin -> null sinks, every
    /// decision audited to the run directory's audit log. Each decision costs the twin stage two
    /// state updates and one check, as in the peer's op.
    static func pipeline(intents: Int) throws -> (rate: Double, audited: Int, summary: RunSummary) {
        let yaml = """
        pipeline: twin-bench
        audit: decisions
        stages:
          - { id: sim, kind: twin-sim, config: { count: \(intents), seed: 1, devices: 1, fault_rate: 0.125, lag_spike_rate: 0.125, divergence_rate: 0.125 } }
          - { id: guard, kind: twin, inputs: [sim], config: { profile: port, tolerances: { position_x: 0.5, load_kg: 100 } } }
          - { id: ok, kind: null-sink, inputs: [guard.allowed] }
          - { id: no, kind: null-sink, inputs: [guard.blocked] }
        """
        let r = try runPipeline(yaml, name: "twin")
        let decided = r.summary.stages.first { $0.id == "guard" }?.emitted ?? 0
        // Decision records only (the host also audits lane-state changes in the same log).
        let audited = auditRecords(r.runDirectory).filter { $0.decision == "allow" || $0.decision == "block" }.count
        return (Double(decided) / r.summary.elapsedSeconds, audited, r.summary)
    }

    /// The peer's figure, measured now: `bench_twin.py` case A in the peer virtualenv when present.
    static func peer() -> (rate: Double, measured: Bool) { peerRate(script: "bench_twin.py", caseMarker: "A twin update", fallback: 23_500) }

    static func report(quick: Bool) throws {
        let peer = peer()
        print(String(format: "peer: tibet-twin SyncGuard update+update+check (bench_twin.py case A): %.0f ops/s %@", peer.rate,
                     peer.measured ? "(measured now)" : "(not installed here: the documented figure)"))
        let e = try embedded(seconds: quick ? 1 : 3)
        print(String(format: "twin embedded (harness, every decision audited): %.0f ops/s, block rate %.1f%%", e.rate, e.blockRate * 100))
        let n = quick ? 100_000 : 600_000
        var runs: [(rate: Double, audited: Int, summary: RunSummary)] = []
        for _ in 0..<3 { runs.append(try pipeline(intents: n)) }
        let p = runs.sorted { $0.rate < $1.rate }[1]
        print(String(format: "twin pipeline twin-sim -> twin -> null sinks, in-process, audit log on: %.0f decisions/s (%d audited of %d; median of 3)",
                     p.rate, p.audited, n))
        print("")
        print(String(format: "ratio embedded / peer:  %.1f x  (target >= 100)", e.rate / peer.rate))
        print(String(format: "ratio pipeline / peer:  %.1f x  (target >= 10)", p.rate / peer.rate))
    }
}

/// RFC 3339 text for the bench's fixtures (the stage's own formatter is internal to it).
enum RFC3339Text {
    static func format(_ ns: Int64) -> String {
        let d = Date(timeIntervalSince1970: Double(ns / 1_000_000) / 1000)
        let f = ISO8601DateFormatter()
        f.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return f.string(from: d)
    }
}
