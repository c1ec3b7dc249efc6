import PipeKit

/// Renders a finished run's summary: per stage and per lane, envelopes in/out, elapsed, rate.
public enum SummaryFormatter {
    public static func table(_ header: [String], _ rows: [[String]]) -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() where i < widths.count { widths[i] = max(widths[i], c.count) } }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, c in
                let pad = String(repeating: " ", count: max(0, widths[i] - c.count))
                return i == cells.count - 1 ? c : c + pad
            }.joined(separator: "  ")
        }
        return ([line(header)] + rows.map(line)).joined(separator: "\n")
    }

    static func rate(_ n: UInt64, _ s: Double) -> String {
        guard s > 0 else { return "-" }
        let r = Double(n) / s
        if r >= 1e6 { return String(format2(r / 1e6)) + "M/s" }
        if r >= 1e3 { return String(format2(r / 1e3)) + "k/s" }
        return String(format2(r)) + "/s"
    }
    static func format2(_ d: Double) -> String {
        let x = (d * 100).rounded() / 100
        return x == x.rounded() ? String(Int(x)) : String(x)
    }

    public static func text(_ s: RunSummary, runDir: String) -> String {
        var out = "pipeline \(s.pipeline) \(s.failure == nil ? "finished" : "FAILED") in \(format2(s.elapsedSeconds)) s (run dir \(runDir))\n\nstages\n"
        out += table(["stage", "kind", "placement", "pid", "in", "out", "dead", "errors", "restarts", "rate in", "rate out"],
                     s.stages.map { v in
                         [v.id, v.kind, v.placement, v.pid.map(String.init) ?? "-", String(v.received), String(v.emitted), String(v.deadLettered),
                          String(v.errors), String(v.restarts), rate(v.received, s.elapsedSeconds), rate(v.emitted, s.elapsedSeconds)]
                     })
        out += "\n\nlanes\n"
        out += table(["lane", "from", "to", "transport", "bound", "when_full", "sent", "received", "depth", "dropped", "spilled", "blocked ms", "rate"],
                     s.lanes.map { l in
                         [String(l.id), l.from, l.to + (l.loopBack ? " (loop)" : ""), l.transport, String(l.bound), l.whenFull, String(l.sent), String(l.received),
                          String(l.depth), String(l.dropped), l.spillDepth > 0 ? "\(l.spilled) (\(l.spillDepth) left)" : String(l.spilled),
                          format2(Double(l.blockedNs) / 1e6), rate(l.received, s.elapsedSeconds)]
                     })
        let files = s.stages.compactMap { v -> String? in
            guard let p = v.status.first(where: { $0.0 == "path" })?.1 else { return nil }
            return "  \(v.id): \(p)"
        }
        if !files.isEmpty { out += "\n\nfiles\n" + files.joined(separator: "\n") }
        // At-least-once runs: what each source had acknowledged and sent again, what each sink dropped.
        let delivery = s.stages.compactMap { v -> [String]? in
            func n(_ k: String) -> String? { v.status.first { $0.0 == k }.map { "\($0.1)" } }
            // A source counts the acknowledgements it received; any other stage those it sent upstream.
            guard let acked = n("delivery.redelivered") != nil ? n("delivery.acks_received") : n("delivery.acks_sent") else { return nil }
            if v.id.hasPrefix("_") { return nil }
            return [v.id, acked, n("delivery.unacked") ?? "0", n("delivery.redelivered") ?? "-", n("delivery.undeliverable") ?? "-",
                    n("delivery.duplicates") ?? "-"]
        }
        if !delivery.isEmpty {
            out += "\n\ndelivery (at-least-once; docs/delivery.md)\n"
            out += table(["stage", "acked", "unacked", "resent", "undeliverable", "duplicates dropped"], delivery)
        }
        if let f = s.failure { out += "\n\nfailure: \(f)" }
        return out
    }

    public static func json(_ s: RunSummary) -> ConfigValue {
        .object([("pipeline", .string(s.pipeline)), ("elapsed_s", .double(s.elapsedSeconds)), ("failure", s.failure.map(ConfigValue.string) ?? .null),
                 ("stages", .list(s.stages.map(\.json))), ("lanes", .list(s.lanes.map(\.json)))])
    }
}
