import Foundation
import IntakeStages
import PipeKit
import PipeKitTesting
import PipeRuntime
import PipeSeal
import PipeSniff

/// The continuity intake's benchmark: sniff decisions per second in the embedded harness on the
/// scenario mix (every classification's audit record captured), with `mime: off`, `when-needed`
/// and `always`; and files per second end to end through a running intake (file written by
/// intake-sim -> inotify -> classified -> verified -> moved, every step audited to the log).
/// The peer figures come from Tools/peers/bench_continuity.py, run now when installed.
enum IntakeBench {
    static func mix() throws -> [Envelope] {
        var rng = SplitMix64(state: 1)
        let key = try SigningKey(seed: [UInt8](repeating: 7, count: 32))
        return try IntakeSimStage.mix(round: 1, key: key, profile: "continuity", rng: &rng, wallNs: 1).map { d in
            Envelope(actor: "inbox", intent: "intake.arrival", attrs: ["filename": .string(d.name), "size_bytes": .int(Int64(d.content.count))],
                     payload: d.content)
        }
    }

    /// Decisions per second. Each batch gets fresh envelopes (as decoded off a lane: uniquely
    /// owned), built before the clock starts; the clock runs over the `feed` calls only, as the
    /// peer's figure times only its sniff calls on files written beforehand. Outputs and audit
    /// records are taken (and counted) after each timed batch.
    static func sniff(mime: String, seconds: Double) throws -> Double {
        let h = try StageHarness(SnifferStage.descriptor, config: .object([("mime", .string(mime))]))
        let inputs = try mix()
        var n = 0, audits = 0, out = 0
        var timed: UInt64 = 0
        while Double(timed) / 1e9 < seconds {
            var batch: [Envelope] = []
            batch.reserveCapacity(64 * inputs.count)
            for _ in 0..<64 { for e in inputs { batch.append(Envelope(actor: e.actor, intent: e.intent, attrs: e.attrs, payload: e.payload)) } }
            batch.reverse()
            n += batch.count
            let t0 = DispatchTime.now().uptimeNanoseconds
            while let e = batch.popLast() { try h.feed(e) }   // moved out: uniquely owned, as off a lane
            timed += DispatchTime.now().uptimeNanoseconds - t0
            for d in Disposition.allCases { out += h.take(d.rawValue).count }
            audits += h.takeAudits().count
        }
        precondition(audits == n && out == n, "every envelope classified, routed and audited (\(audits), \(out) of \(n))")
        return Double(n) / (Double(timed) / 1e9)
    }

    /// Files per second from the first classification to the last move, through the running
    /// intake with the audit log on.
    static func endToEnd(rounds: Int) throws -> (rate: Double, files: Int) {
        let yaml = """
        pipeline: intake-bench
        audit: decisions
        stages:
          - { id: drops, kind: intake-sim, config: { dir: inbox, rounds: \(rounds), rate: 0, seed: 1, key_seed: 7 } }
          - { id: sink, kind: null-sink, inputs: [drops] }
          - { id: inbox, kind: inbox, config: { dir: inbox, coalesce_ms: 100, idle_exit_ms: 1000, low: 100000, high: 200000 } }
          - { id: sniff, kind: sniffer, inputs: [inbox], config: { mode: active, mime: when-needed } }
          - { id: verify, kind: verify, inputs: [sniff.trusted-candidate], config: { profile: continuity, trusted_keys: [ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c] } }
          - { id: quarantine, kind: quarantine-sink, inputs: [sniff.quarantine] }
          - { id: triage, kind: triage-sink, inputs: [sniff.triage-disguised, verify.triage-fork] }
          - { id: reject, kind: reject-sink, inputs: [sniff.reject, verify.reject-invalid] }
          - { id: outbox, kind: reseal-sink, inputs: [sniff.reseal-candidate, verify.trusted-fork], config: { key: keys/signing.key, create_key: true } }
        """
        let r = try runPipeline(yaml, name: "intake")
        let records = auditRecords(r.runDirectory)
        var first = UInt64.max, last: UInt64 = 0, moved = 0
        var names = Set<String>()
        for a in records {
            let t = a.timeNs
            if a.decision == "classify" { first = min(first, t) }
            if ["quarantine", "triage", "reject", "archive"].contains(a.decision) {
                moved += 1; last = max(last, t)
                names.insert(a.details["filename"]?.stringValue ?? "")
            }
        }
        // A file rewritten after it was read is left for its newer arrival (which moves it): not a failure.
        let failed = records.filter { $0.decision == "move-failed" && !$0.reason.contains("changed since it was read") }.count
        guard names.count == rounds * 11, failed == 0 else {
            throw RuntimeError.plan("intake bench: \(names.count) of \(rounds * 11) files moved, \(failed) moves failed (run dir \(r.runDirectory))")
        }
        // A file the writer was still rewriting when its window closed arrives (and moves) twice.
        if moved != names.count { FileHandle.standardError.write(Data("intake bench: \(moved - names.count) second arrivals\n".utf8)) }
        return (Double(names.count) / (Double(last - first) / 1e9), names.count)
    }

    /// The peer's figures, measured now (Tools/peers/bench_continuity.py in the peer virtualenv).
    static func peer() -> (sniff: Double, e2e: Double, measured: Bool) {
        let fallback = (52_000.0, 18.0, false)
        let env = ProcessInfo.processInfo.environment
        let cwd = FileManager.default.currentDirectoryPath
        let python = env["PEER_PYTHON"] ?? cwd + "/.build/peers-venv/bin/python"
        let script = cwd + "/Tools/peers/bench_continuity.py"
        guard FileManager.default.isExecutableFile(atPath: python), FileManager.default.fileExists(atPath: script) else { return fallback }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: python)
        p.arguments = [script]
        var e = env; e["PEER_BENCH_SECONDS"] = e["PEER_BENCH_SECONDS"] ?? "3"; p.environment = e
        let pipe = Pipe(); p.standardOutput = pipe; p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return fallback }
        let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        guard let line = out.split(separator: "\n").last, let v = try? JSON.parse(String(line)),
              let s = v["sniff_per_s"]?.doubleValue, let f = (v["e2e_steady_files_per_s"] ?? v["e2e_files_per_s"])?.doubleValue, s > 0, f > 0 else { return fallback }
        return (s, f, true)
    }

    /// libmagic alone, on the payloads of the mix that our own table classes `unknown` (the only
    /// ones `mime: when-needed` hands to libmagic): microseconds per call, and the rate that
    /// `when-needed` could not exceed on one core even if everything else cost nothing.
    static func libmagicCeiling(seconds: Double) throws -> (usPerCall: Double, unknown: Int, total: Int, perCore: Double) {
        var rng = SplitMix64(state: 1)
        let key = try SigningKey(seed: [UInt8](repeating: 7, count: 32))
        let drops = try IntakeSimStage.mix(round: 1, key: key, profile: "continuity", rng: &rng, wallNs: 1)
        let unknown = drops.filter { $0.expect == .unknown }.map(\.content)
        let magic = try MagicDetector()
        // The fastest of several rounds: the most favourable cost libmagic showed in this run.
        var best = Double.infinity
        let start = DispatchTime.now().uptimeNanoseconds
        while Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9 < seconds {
            let t0 = DispatchTime.now().uptimeNanoseconds
            for _ in 0..<20 { for u in unknown { precondition(magic.describe(u) != nil, "libmagic failed") } }
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e3 / Double(20 * unknown.count))
        }
        return (best, unknown.count, drops.count, 1e6 / (best * Double(unknown.count) / Double(drops.count)))
    }

    static func report(quick: Bool) throws {
        let peer = peer()
        let how = peer.measured ? "(measured now)" : "(not installed here: the documented figures)"
        print(String(format: "peer: tibet-continuityd sniff %.0f/s, end to end %.1f files/s %@", peer.sniff, peer.e2e, how))
        let secs = quick ? 1.0 : 3.0
        let off = try sniff(mime: "off", seconds: secs)
        let needed = try sniff(mime: "when-needed", seconds: secs)
        let always = try sniff(mime: "always", seconds: secs)
        print(String(format: "sniffer embedded, scenario mix, every decision audited: mime off %.0f/s, when-needed %.0f/s, always %.0f/s", off, needed, always))
        let lm = try libmagicCeiling(seconds: quick ? 0.5 : 1.5)
        let cores = ProcessInfo.processInfo.activeProcessorCount
        print(String(format: "libmagic alone (best round): %.0f us per call on the %d of %d mix payloads our table classes unknown; at that cost when-needed stays under %.0f/s per core (%.0f/s on all %d cores if nothing else cost anything); its target is %.0f/s",
                     lm.usPerCall, lm.unknown, lm.total, lm.perCore, lm.perCore * Double(cores), cores, 2 * peer.sniff))
        var runs: [(rate: Double, files: Int)] = []
        for _ in 0..<5 { runs.append(try endToEnd(rounds: quick ? 100 : 400)) }
        let sorted = runs.sorted { $0.rate < $1.rate }
        let e2e = sorted[2]
        print(String(format: "intake end to end (write -> inotify -> classify -> verify -> move, audited): %.0f files/s (%d files; median of 5, range %.0f-%.0f)",
                     e2e.rate, e2e.files, sorted[0].rate, sorted[4].rate))
        print("")
        print(String(format: "ratio sniff mime off / peer sniff:          %.1f x  (target >= 10)", off / peer.sniff))
        print(String(format: "ratio sniff mime when-needed / peer sniff:  %.1f x  (target >= 2)", needed / peer.sniff))
        print(String(format: "ratio sniff mime always / peer sniff:       %.2f x  (no target; libmagic on every envelope)", always / peer.sniff))
        print(String(format: "ratio end to end / peer daemon:             %.1f x  (target >= 100)", e2e.rate / peer.e2e))
    }
}
