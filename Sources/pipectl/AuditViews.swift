import Foundation
import GatewayStages
import PipeAudit
import PipeKit

/// The audit log's export views other than jsonl (docs/audit-log.md, "Exports"): projections of
/// its records, never values that are not in them. Each record's anchoring comes from `verify`:
/// a record at or before the last valid checkpoint is signed by the checkpoint key.
struct AuditViews {
    let reader: AuditReader
    let report: VerifyReport

    /// A valid checkpoint at or after `seq` means the records up to it hash, from genesis, to a
    /// signed head: record `seq` is as it was signed.
    func anchored(_ seq: Int64) -> Bool { seq <= report.lastGoodCheckpoint }

    static func value(_ a: AttrValue?) -> ConfigValue {
        guard let a else { return .null }
        switch a { case .string(let s): return .string(s); case .int(let i): return .int(i); case .double(let d): return .double(d); case .bool(let b): return .bool(b) }
    }

    // MARK: gateway-event.v1

    /// One gateway-event.v1 record per executed cap (`execute`) and per cap the mux refused
    /// (`reject`, `preempt` from a mux): the same contract `pipectl events validate` checks.
    func gatewayEvents(_ emit: (ConfigValue) -> Void) throws {
        let checkpointKey = report.signer.map { String($0.prefix(16)) }
        try reader.forEach { e in
            let r = e.record
            let d = r.details
            let fromMux = d["stage_kind"]?.stringValue == "mux"
            guard r.decision == "execute" || (fromMux && (r.decision == "reject" || r.decision == "preempt")), let env = r.envelope else { return true }
            let executed = r.decision == "execute"
            let hops = d["hops"]?.intValue ?? 0
            let anchoredHere = anchored(e.seq)
            let lane = d["lane_class"]?.stringValue ?? d["lane"]?.stringValue ?? "none"
            let fields: [(String, ConfigValue)] = [
                ("event_id", .string(EnvelopeID.derived(from: env, output: "audit.\(r.decision)", index: UInt32(truncatingIfNeeded: e.seq)).description)),
                ("observation_layer", .string("tibet-gateway")),
                ("timestamp", .string(RFC3339.format(ns: Int64(clamping: r.timeNs)))),
                ("operation_id", .string(env.description)),
                ("agent_id", .string(r.actor.isEmpty ? "unknown" : r.actor)),
                ("intent", .string(r.intent.isEmpty ? "unknown" : r.intent)),
                ("provider", .string(executed ? (d["executor"]?.stringValue ?? "unknown") : "mux")),
                ("model", .string(executed ? (d["program"]?.stringValue ?? d["executor"]?.stringValue ?? "unknown") : "lane:\(lane)")),
                ("route_class", .string(executed ? (hops > 0 ? "relay" : "local") : "triage")),
                ("surface", .string(r.stage.isEmpty ? "unknown" : r.stage)),
                // Where the deciding stage ran: a thread of the host (inproc), a worker process (ipc), a remote worker (tcp).
                ("transport", .string(r.location.hasPrefix("remote:") ? "tcp" : r.location.hasPrefix("worker:") ? "ipc" : "inproc")),
                ("status", .string(executed ? (d["outcome"]?.stringValue ?? "unknown") : (r.decision == "preempt" ? "preempted" : "rejected"))),
                ("latency_ms", .double(Double(d["latency_us"]?.intValue ?? 0) / 1000)),
                ("lane_class", .string(lane)),
                ("lane_collision_policy", .string(d["lane_collision_policy"]?.stringValue ?? "none")),
                ("coffee_lane_policy", .string(d["coffee_lane_policy"]?.stringValue ?? "none")),
                ("attestation_layer", .string(anchoredHere ? "self-signed" : "none")),
                ("_emitter", .string("pipectl/audit-export")),
                ("request_id", .string(env.description)),
                ("token_id", anchoredHere ? checkpointKey.map { .string($0) } ?? .null : .null),
                ("envelope_id", .string(env.description)),
                ("parent_id", r.parents.first.map { .string($0.description) } ?? .null),
                ("thread_id", .string(d["slot_key"]?.stringValue ?? r.actor)),
                ("actor_aint", .null), ("actor_jis_pubkey", .null),
                ("method", .string(executed ? "execute" : "dispatch")),
                ("target_url", .null),
                ("coffee_reason", Self.value(d["coffee_reason"])),
                ("time_diff_seconds", .null), ("diff_threshold_seconds", .null),
                ("preemptible", Self.value(d["preemptible"])),
                ("lane_priority", Self.value(d["lane_priority"])),
                ("gateway_actor", .string("pipehost")),
                ("verified", .bool(anchoredHere && report.pinned)),
                ("content_hash", .string(Hex.encode(e.hash))),
                ("attestation_ref", anchoredHere ? .string("audit seq \(e.seq) under checkpoint \(report.lastGoodCheckpoint)") : .null),
                ("payload", .object([("seq", .int(e.seq)), ("decision", .string(r.decision)), ("reason", .string(r.reason)),
                                     ("details", .map(d.keys.sorted().map { ConfigEntry(key: $0, value: Self.value(d[$0])) }))])),
            ]
            emit(.object(fields))
            return true
        }
    }

    // MARK: governance

    /// The sketch's governance view: the questions an auditor asks, answered from the log; the
    /// trust foundation (chain and checkpoints); actor -> provider/model links; the continuation
    /// graph (parent -> child over executed caps); usage events (every execution).
    func governance() throws -> ConfigValue {
        var decisions: [String: Int] = [:], actors: [String: Int] = [:], signers: [String: Int] = [:]
        var links: [String: (actor: String, provider: String, model: String, n: Int, executed: Int)] = [:]
        var edges: [(String, String, String)] = []
        var nodes = Set<String>()
        var usage: [ConfigValue] = []
        try reader.forEach { e in
            let r = e.record
            decisions[r.decision, default: 0] += 1
            if !r.actor.isEmpty { actors[r.actor, default: 0] += 1 }
            if let k = r.details["signer"]?.stringValue, !k.isEmpty { signers[k, default: 0] += 1 }
            guard r.decision == "execute", let env = r.envelope else { return true }
            let provider = r.details["executor"]?.stringValue ?? "unknown"
            let model = r.details["program"]?.stringValue ?? provider
            let key = "\(r.actor)|\(provider)|\(model)"
            var l = links[key] ?? (r.actor, provider, model, 0, 0)
            l.n += 1
            if r.details["outcome"]?.stringValue == "executed" { l.executed += 1 }
            links[key] = l
            nodes.insert(env.description)
            for p in r.parents { edges.append((p.description, env.description, r.details["continuation"]?.stringValue ?? "")) }
            usage.append(.object([
                ("seq", .int(e.seq)), ("envelope", .string(env.description)), ("actor", .string(r.actor)), ("intent", .string(r.intent)),
                ("provider", .string(provider)), ("model", .string(model)), ("outcome", Self.value(r.details["outcome"])),
                ("latency_us", Self.value(r.details["latency_us"])), ("continuation", Self.value(r.details["continuation"])),
                ("time", .string(RFC3339.format(ns: Int64(clamping: r.timeNs)))),
            ]))
            return true
        }
        func counts(_ m: [String: Int]) -> ConfigValue { .map(m.sorted { $0.value != $1.value ? $0.value > $1.value : $0.key < $1.key }.map { ConfigEntry(key: $0.key, value: .int(Int64($0.value))) }) }
        let integrity: String = report.firstBad.map { "broken at seq \($0.seq): \($0.reason)" } ?? "intact"
        return .object([("governance", .object([
            ("questions", .list([
                .object([("question", .string("Who acted?")), ("answer", counts(actors))]),
                .object([("question", .string("What was decided, how often?")), ("answer", counts(decisions))]),
                .object([("question", .string("Which keys vouched for what was accepted?")),
                         ("answer", .object([("checkpoint_signer", report.signer.map { .string($0) } ?? .null), ("content_signers", counts(signers))]))]),
                .object([("question", .string("Is the record complete and unaltered?")),
                         ("answer", .string("\(integrity); \(report.records) records, \(report.unanchored) after the last valid checkpoint"))]),
            ])),
            ("trust_foundation", .object([
                ("log", .string(reader.path)), ("pipeline", .string(reader.pipeline)), ("format", .string(reader.meta["format"] ?? "")),
                ("chain", .string(integrity)), ("records", .int(Int64(report.records))), ("checkpoints", .int(Int64(report.checkpoints))),
                ("bad_checkpoints", .int(Int64(report.badCheckpoints.count))), ("last_valid_checkpoint", .int(report.lastGoodCheckpoint)),
                ("unanchored", .int(report.unanchored)), ("signer", report.signer.map { .string($0) } ?? .null), ("signer_pinned", .bool(report.pinned)),
            ])),
            ("actor_model_provider_links", .list(links.values.sorted { ($0.actor, $0.provider, $0.model) < ($1.actor, $1.provider, $1.model) }.map {
                .object([("actor", .string($0.actor)), ("provider", .string($0.provider)), ("model", .string($0.model)),
                         ("executions", .int(Int64($0.n))), ("executed", .int(Int64($0.executed)))])
            })),
            ("continuation_graph", .object([
                ("nodes", .int(Int64(nodes.count))),
                ("edges", .list(edges.map { .object([("from", .string($0.0)), ("to", .string($0.1)), ("continuation", .string($0.2))]) })),
            ])),
            ("usage_events", .list(usage)),
        ]))])
    }

    // MARK: cbom

    /// The continuity bill of materials: every document the intake saw (by file name), its
    /// canonical surface and status after verification, the authority (signer) behind it, the
    /// material facts (class, size, mime), its continuity (every move) and the SoM events.
    func cbom() throws -> ConfigValue {
        struct Doc { var name: String; var facts: [String: ConfigValue] = [:]; var surface: String?; var status: String?; var reason: String?
                     var signer: String?; var moves: [ConfigValue] = []; var events = 0 }
        var docs: [String: Doc] = [:]
        var order: [String] = []
        var events: [ConfigValue] = []
        let statuses: Set<String> = ["trusted-fork", "triage-fork", "reject-invalid"]
        try reader.forEach { e in
            let r = e.record
            guard let name = r.details["filename"]?.stringValue, !name.isEmpty else { return true }
            if docs[name] == nil { docs[name] = Doc(name: name); order.append(name) }
            var d = docs[name] ?? Doc(name: name)
            d.events += 1
            for k in ["intake_class", "disposition", "mime", "size_bytes", "tbz_version"] where r.details[k] != nil { d.facts[k] = Self.value(r.details[k]) }
            if statuses.contains(r.decision) {
                d.status = r.decision; d.reason = r.reason
                d.surface = r.details["surface"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 }
                d.signer = r.details["signer"]?.stringValue.flatMap { $0.isEmpty ? nil : $0 }
            }
            if let to = r.details["to"]?.stringValue {
                d.moves.append(.object([("seq", .int(e.seq)), ("decision", .string(r.decision)), ("from", Self.value(r.details["from"])), ("to", .string(to))]))
            }
            docs[name] = d
            events.append(.object([("seq", .int(e.seq)), ("document", .string(name)), ("decision", .string(r.decision)), ("stage", .string(r.stage)),
                                   ("reason", .string(r.reason)), ("time", .string(RFC3339.format(ns: Int64(clamping: r.timeNs))))]))
            return true
        }
        let list = order.compactMap { docs[$0] }
        return .object([("cbom", .object([
            ("documents", .list(list.map { d in .object([("name", .string(d.name)), ("material_facts", .object(d.facts.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })),
                                                         ("events", .int(Int64(d.events)))]) })),
            ("canonical_surface", .list(list.compactMap { d in d.surface.map { .object([("document", .string(d.name)), ("surface", .string($0)), ("matches_name", .bool($0 == d.name))]) } })),
            ("surface_status", .list(list.map { d in .object([("document", .string(d.name)), ("status", .string(d.status ?? "unsealed")), ("reason", d.reason.map { .string($0) } ?? .null)]) })),
            ("authority", .list(list.compactMap { d in d.signer.map { .object([("document", .string(d.name)), ("signer_key_id", .string($0))]) } })),
            ("material_facts", .list(list.map { d in .object([("document", .string(d.name))] + d.facts.sorted { $0.key < $1.key }.map { ($0.key, $0.value) }) })),
            ("continuity", .list(list.map { d in .object([("document", .string(d.name)), ("moves", .list(d.moves))]) })),
            ("som_events", .list(events)),
        ]))])
    }
}
