import ArgumentParser
import Foundation
import PipeConfig
import PipeKit
import PipeRuntime
import PipeZMQ

struct Lanes: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Every lane of a running host: state, depth against its watermarks, rates, drops, spills, blocked time, latency.",
        discussion: """
        state: normal, pressure-rising (depth >= low), overloaded (depth >= high), recovering (fell below release, not yet below low).
        in/s and out/s: envelopes per second into the lane (producer) and out of it (consumer).
        blocked: time the producer had envelopes but no credit. p50/p99: lane latency (frame sent -> taken), microseconds.
        transport tcp+relay: a lane with no end in the host process (two remote stages, or a remote and a process stage), carried by the host's relay; a line under the table says when the relay waits for an absent or slow end.
        """)
    @OptionGroup var host: HostOptions
    @Flag(help: "Print as JSON.") var json = false
    @Flag(name: .customLong("all"), help: "Include the dead-letter lanes.") var all = false

    func run() throws {
        let v = host.call("lanes")
        if json { printJSON(v); return }
        let list = (v.listValue ?? []).filter { all || !($0["to"]?.stringValue ?? "").hasPrefix("_dead_letters.") }
        print(LaneTable.render(list))
        // Lanes the host relays (no end in it) say what the relay waits for, if anything.
        for l in list {
            guard let r = l["relay"]?.stringValue, r != "forwarding" else { continue }
            print("lane \(LaneTable.cell(l, "id")) \(LaneTable.cell(l, "from")) -> \(LaneTable.cell(l, "to")): relayed by the host; \(r)")
        }
    }
}

/// The lanes table shared by `pipectl lanes` and `pipectl top`.
enum LaneTable {
    static func cell(_ l: ConfigValue, _ k: String) -> String {
        switch l[k] {
        case .string(let x)?: return x
        case .int(let i)?: return String(i)
        case .double(let d)?: return d >= 100 || d == d.rounded() ? String(Int64(d.rounded())) : String(format: "%.1f", d)
        case .bool(let b)?: return b ? "yes" : "no"
        default: return "-"
        }
    }
    static func rate(_ d: Double?) -> String {
        guard let d else { return "-" }
        if d >= 1e6 { return String(format: "%.2fM", d / 1e6) }
        if d >= 1e3 { return String(format: "%.1fk", d / 1e3) }
        return String(format: "%.0f", d)
    }
    static func row(_ l: ConfigValue) -> [String] {
        [cell(l, "id"), cell(l, "from"), cell(l, "to") + (l["loop_back"]?.boolValue == true ? " (loop)" : ""),
         cell(l, "transport") + (l["relay"]?.stringValue != nil ? "+relay" : ""),
         cell(l, "state"), "\(cell(l, "depth"))/\(cell(l, "bound"))", "\(cell(l, "low"))/\(cell(l, "high"))", cell(l, "when_full"),
         rate(l["rate_in"]?.doubleValue), rate(l["rate_out"]?.doubleValue), cell(l, "sent"), cell(l, "received"), cell(l, "credits"),
         cell(l, "dropped"), l["spill_depth"]?.intValue.map { "\(cell(l, "spilled")) (\($0) now)" } ?? cell(l, "spilled"),
         cell(l, "blocked_ms"), cell(l, "latency_p50_us"), cell(l, "latency_p99_us")]
    }
    static let header = ["lane", "from", "to", "transport", "state", "depth/bound", "low/high", "when_full", "in/s", "out/s",
                         "sent", "received", "credits", "dropped", "spilled", "blocked ms", "p50 us", "p99 us"]
    static func render(_ lanes: [ConfigValue]) -> String { SummaryFormatter.table(header, lanes.map(row)) }
}

/// Stage tables of `pipectl status` and `pipectl workers`, by column name.
enum StageTable {
    /// One line naming the stages the pipeline waits on (the host's `bottlenecks`: running, not
    /// blocked themselves, with a full lane into them whose producer waits), or nil when none is.
    static func bottleneckLine(_ status: ConfigValue) -> String? {
        let list = status["bottlenecks"]?.listValue ?? []
        guard !list.isEmpty else { return nil }
        return "waiting on: " + list.map { b in
            let state = b["state"]?.stringValue ?? "?"
            let how = state == "busy" || state == "idle" ? "busy \(Int((b["busy_pct"]?.doubleValue ?? 0).rounded()))%" : state
            let lanes = (b["full_lanes"]?.listValue ?? []).compactMap { $0.intValue.map(String.init) }
            return "\(b["stage"]?.stringValue ?? "?") (\(how); lane\(lanes.count == 1 ? "" : "s") \(lanes.joined(separator: ", ")) into it full)"
        }.joined(separator: ", ")
    }

    static func cell(_ s: ConfigValue, _ column: String) -> String {
        func int(_ k: String) -> String { String(s[k]?.intValue ?? 0) }
        switch column {
        case "stage": return s["id"]?.stringValue ?? ""
        case "kind", "placement", "state": return s[column]?.stringValue ?? ""
        case "pid": return s["pid"]?.intValue.map { String($0) } ?? "-"
        case "in": return int("received")
        case "out": return int("emitted")
        case "dead": return int("dead_lettered")
        case "errors", "restarts": return int(column)
        case "in/s": return LaneTable.rate(s["rate_in"]?.doubleValue)
        case "out/s": return LaneTable.rate(s["rate_out"]?.doubleValue)
        case "busy": return s["busy_pct"]?.doubleValue.map { String(format: "%.0f%%", $0) } ?? "-"
        default: return "?"
        }
    }
    static func render(_ stages: [ConfigValue], _ columns: [String]) -> String {
        SummaryFormatter.table(columns, stages.map { s in columns.map { cell(s, $0) } })
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The running host's status and each stage's status report.")
    @OptionGroup var host: HostOptions
    @Flag(help: "Print as JSON.") var json = false

    func run() throws {
        let v = host.call("status")
        if json { printJSON(v); return }
        let h = v["host"] ?? .null
        print("pipeline \(h["pipeline"]?.stringValue ?? "?") (\(h["file"]?.stringValue ?? "")) pid \(h["pid"]?.intValue ?? 0): \(h["state"]?.stringValue ?? "?"), up \(String(format: "%.1f", h["uptime_s"]?.doubleValue ?? 0)) s, run dir \(h["run_dir"]?.stringValue ?? "")")
        let stages = v["stages"]?.listValue ?? []
        print(StageTable.render(stages, ["stage", "kind", "placement", "pid", "state", "in", "out", "in/s", "out/s", "busy", "dead", "errors", "restarts"]))
        if let line = StageTable.bottleneckLine(v) { print("\n" + line) }
        // Each stage's own report, one figure per line (a twin stage lists its devices here).
        for s in stages {
            let entries = s["status"]?.mapEntries ?? []
            if entries.isEmpty { continue }
            print("\n\(s["id"]?.stringValue ?? "") (\(s["kind"]?.stringValue ?? ""))")
            let width = entries.map(\.key.count).max() ?? 0
            for e in entries {
                let value = e.value.stringValue ?? JSON.serialize(e.value)
                print("  " + e.key.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + value)
            }
        }
    }
}

struct Workers: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remote workers (name, key, state, address, stages, last seen) and the stages running outside the host process.",
        discussion: """
        Worker states: up (every stage placed on it reports), partly down, down (its runners went silent: remote.down_after_ms),
        absent (never registered in this run), cut-off (refused after sending garbage).
        """)
    @OptionGroup var host: HostOptions
    @Flag(help: "Print as JSON.") var json = false

    func run() throws {
        let v = host.call("status")
        let remote = host.call("workers").listValue ?? []
        let stages = (v["stages"]?.listValue ?? []).filter { $0["placement"]?.stringValue != "in-process" }
        let relays = v["host"]?["remote"]?["relays"]?.listValue ?? []
        if json { printJSON(.object([("workers", .list(remote)), ("stages", .list(stages)), ("relays", .list(relays))])); return }
        if remote.isEmpty && stages.isEmpty { print("no workers (every stage runs in-process)"); return }
        if !remote.isEmpty {
            let r = v["host"]?["remote"] ?? .null
            print("remote workers on \(r["listen"]?.stringValue ?? "?") (\(r["security"]?.stringValue ?? "?")); refused connections: \(r["refused"]?.intValue ?? 0), failed handshakes: \(r["handshake_failures"]?.intValue ?? 0)")
            let rows = remote.map { w -> [String] in
                let placed = (w["stages"]?.listValue ?? []).compactMap(\.stringValue)
                let up = Set((w["stages_up"]?.listValue ?? []).compactMap(\.stringValue))
                return [w["name"]?.stringValue ?? "", w["state"]?.stringValue ?? "", w["address"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 } ?? "-",
                        placed.map { up.contains($0) ? $0 : $0 + " (down)" }.joined(separator: ", "),
                        w["last_seen_ms"]?.intValue.map { String(format: "%.1f s ago", Double($0) / 1000) } ?? "never",
                        String(w["registrations"]?.intValue ?? 0), String(w["bad_frames"]?.intValue ?? 0),
                        String((w["key"]?.stringValue ?? "").prefix(12)) + "..."]
            }
            print(SummaryFormatter.table(["worker", "state", "address", "stages", "last seen", "registrations", "bad frames", "key"], rows))
            print("")
        }
        if !relays.isEmpty {
            // Lanes between two remote stages cross this host: their frames, and what was refused on them.
            print("lanes relayed by the host (no end in the host process)")
            print(SummaryFormatter.table(["lane", "from", "to", "data frames", "return frames", "refused", "waiting"], relays.map { r in
                [String(r["lane"]?.intValue ?? 0), r["from"]?.stringValue ?? "", r["to"]?.stringValue ?? "",
                 String(r["data_frames"]?.intValue ?? 0), String(r["return_frames"]?.intValue ?? 0), String(r["refused"]?.intValue ?? 0),
                 (r["waiting"]?.stringValue).flatMap { $0.isEmpty ? nil : $0 } ?? "-"]
            }))
            print("")
        }
        if !stages.isEmpty {
            print(StageTable.render(stages, ["stage", "kind", "placement", "pid", "state", "restarts", "in", "out", "busy", "errors"]))
        }
    }
}

struct GrantCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "grant", abstract: "Give a running host an owner's grant (usually a revocation: a higher epoch with no stages).",
        subcommands: [Apply.self])

    struct Apply: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Apply a grant file from `pipehost grant issue`: the worker's epoch rises (durably); a revocation aborts its runners.")
        @Argument(help: "The grant file.") var file: String
        @OptionGroup var host: HostOptions
        @Flag(help: "Print as JSON.") var json = false

        func run() throws {
            guard let data = FileManager.default.contents(atPath: file), let text = String(data: data, encoding: .utf8) else {
                fail("pipectl grant apply: cannot read \(file)")
            }
            let r = host.call("grant", args: .object([("grant", .string(text))]))
            if json { printJSON(r); return }
            let aborted = (r["aborted"]?.listValue ?? []).compactMap(\.stringValue)
            print("applied grant epoch \(r["epoch"]?.intValue ?? 0)\(r["revoked"]?.boolValue == true ? ": revoked" : "")\(aborted.isEmpty ? "" : "; aborted \(aborted.joined(separator: ", "))")")
        }
    }
}

struct Tap: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print envelopes flowing on a lane of a running host (header and payload preview).",
        discussion: """
        LANE is a lane id (from `pipectl lanes`), `FROM->TO` (e.g. gen.out->pass.in), or a producer output `stage.output` when it has one lane.
        The tap samples: at most 200 envelopes per second per lane, and copies a slow reader cannot take are dropped, so the lane never waits for the tap.
        """)
    @Argument(help: "The lane: id, FROM->TO, or stage.output.") var lane: String
    @Option(help: "Stop after this many envelopes.") var limit: Int = 10
    @Option(help: "Give up after this many seconds without an envelope.") var timeout: Double = 10
    @Flag(help: "Print each envelope as a JSONL line (the file-sink form).") var json = false
    @OptionGroup var host: HostOptions

    func validate() throws {
        if limit < 1 { throw ValidationError("--limit must be at least 1") }
        if timeout <= 0 { throw ValidationError("--timeout must be positive") }
    }

    func run() throws {
        let lanes = host.call("lanes").listValue ?? []
        let matches = lanes.filter { l in
            let id = l["id"]?.intValue.map(String.init) ?? ""
            let from = l["from"]?.stringValue ?? "", to = l["to"]?.stringValue ?? ""
            return lane == id || lane == "\(from)->\(to)" || lane == from
        }
        guard let l = matches.first, matches.count == 1, let id = l["id"]?.intValue, let endpoint = l["tap"]?.stringValue else {
            let names = lanes.map { "  \($0["id"]?.intValue ?? 0)  \($0["from"]?.stringValue ?? "")->\($0["to"]?.stringValue ?? "")" }.joined(separator: "\n")
            fail("pipectl tap: \(matches.isEmpty ? "no lane" : "several lanes") match '\(lane)'; the lanes are:\n\(names)", code: 64)
        }
        let ctx: ZMQContext, sub: ZMQSocket
        do {
            ctx = try ZMQContext()
            sub = try ctx.socket(.sub)
            try sub.setLinger(ms: 0)
            try sub.setReceiveTimeout(ms: 200)
            try sub.connect(endpoint)
            let lid = UInt32(id)
            try sub.subscribe([UInt8(lid >> 24), UInt8(truncatingIfNeeded: lid >> 16), UInt8(truncatingIfNeeded: lid >> 8), UInt8(truncatingIfNeeded: lid)])
        } catch { fail("pipectl tap: cannot connect to \(endpoint): \(error)") }
        defer { sub.close(); ctx.terminate() }
        if !json { FileHandle.standardError.write(Data("tapping lane \(id) \(l["from"]?.stringValue ?? "") -> \(l["to"]?.stringValue ?? "") (Ctrl-C to stop)\n".utf8)) }
        var seen = 0
        var lastSeen = Date()
        while seen < limit {
            guard let parts = try? sub.receiveParts(), parts.count == 2 else {
                if Date().timeIntervalSince(lastSeen) > timeout {
                    fail("pipectl tap: nothing on lane \(id) for \(Int(timeout)) s (\(seen) envelope(s) shown)", code: seen > 0 ? 0 : 1)
                }
                continue
            }
            lastSeen = Date()
            // Each message is a DATA frame of a few envelopes.
            var batch: [Envelope] = []
            parts[1].withUnsafeBytes { raw in
                guard let f = try? FrameView(raw) else { print("(malformed tap message)"); return }
                try? f.forEachEnvelope(limits: .standard) { r, _ in
                    switch r { case .success(let e): batch.append(e); case .failure(let err): print("(undecodable envelope: \(err))") }
                }
            }
            for e in batch where seen < limit {
                seen += 1
                print(json ? String(decoding: EnvelopeJSONL.encode(e), as: UTF8.self) : TapFormat.line(e))
            }
        }
    }
}

enum TapFormat {
    /// One readable line: id, actor, intent, lane, hops, attrs, and the first 80 characters of
    /// the payload (as text when it is UTF-8, else hex).
    static func line(_ e: Envelope) -> String {
        let attrs = e.attrs.keys.sorted().map { "\($0)=\(e.attrs[$0]?.description ?? "")" }.joined(separator: " ")
        let preview: String = e.withPayloadBytes { p in
            let head = Array(p.prefix(80))
            if let s = String(validating: head, as: UTF8.self), !s.contains(where: { $0.isNewline }) {
                return "\"" + s + (p.count > 80 ? "..." : "") + "\""
            }
            return "0x" + Hex.encode(head.prefix(40)) + (p.count > 40 ? "..." : "")
        }
        var parts = [e.id.description, "actor=\(e.actor)", "intent=\(e.intent)"]
        if !e.lane.isEmpty { parts.append("lane=\(e.lane)") }
        if e.hops > 0 { parts.append("hops=\(e.hops)") }
        if !attrs.isEmpty { parts.append(attrs) }
        parts.append("payload(\(e.payloadCount)B)=\(preview)")
        return parts.joined(separator: " ")
    }
}
