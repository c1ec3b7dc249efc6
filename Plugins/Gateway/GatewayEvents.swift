import Foundation
import PipeKit
import ExecutorStages
import PipeSeal

/// The gateway-event.v1 contract (CONCEPTS.md; the field mapping is in docs/cap-pipeline.md).
public enum GatewayEvent {
    /// Non-empty on every record.
    public static let required = ["event_id", "observation_layer", "timestamp", "operation_id", "agent_id", "intent", "provider", "model",
                                  "route_class", "surface", "transport", "status", "latency_ms", "lane_class", "lane_collision_policy",
                                  "coffee_lane_policy", "attestation_layer", "_emitter"]
    /// Present on every record (a value or null).
    public static let optional = ["request_id", "token_id", "envelope_id", "parent_id", "thread_id", "actor_aint", "actor_jis_pubkey", "method",
                                  "target_url", "coffee_reason", "time_diff_seconds", "diff_threshold_seconds", "preemptible", "lane_priority",
                                  "gateway_actor", "verified", "content_hash", "attestation_ref", "payload"]
    public static let routeClasses: Set<String> = ["direct", "relay", "triage", "local", "cluster"]
    public static let attestationLayers: Set<String> = ["jis", "self-signed", "none"]
    static let numbers: Set<String> = ["latency_ms", "time_diff_seconds", "diff_threshold_seconds", "lane_priority"]

    /// Every problem with one record, each naming its field; empty when it meets the contract.
    public static func validate(_ r: ConfigValue) -> [String] {
        guard let entries = r.mapEntries else { return ["not a JSON object"] }
        var problems: [String] = []
        let keys = Set(entries.map(\.key))
        for k in required + optional where !keys.contains(k) { problems.append("\(k): missing") }
        for k in entries.map(\.key) where !required.contains(k) && !optional.contains(k) { problems.append("\(k): not a gateway-event.v1 field") }
        for k in required {
            guard let v = r[k] else { continue }
            switch v {
            case .null: problems.append("\(k): must not be null")
            case .string(let s) where s.isEmpty: problems.append("\(k): must not be empty")
            default: break
            }
        }
        for k in numbers {
            guard let v = r[k] else { continue }
            switch v { case .int, .double: break; case .null where k != "latency_ms": break; default: problems.append("\(k): must be a number") }
        }
        for k in required where !numbers.contains(k) {
            if let v = r[k], v.stringValue == nil, v != .null { problems.append("\(k): must be a string") }
        }
        if let v = r["verified"], v.boolValue == nil { problems.append("verified: must be a boolean") }
        if let v = r["preemptible"], v != .null, v.boolValue == nil { problems.append("preemptible: must be a boolean or null") }
        if let v = r["payload"], v.mapEntries == nil { problems.append("payload: must be an object") }
        if let s = r["observation_layer"]?.stringValue, s != "tibet-gateway" { problems.append("observation_layer: must be \"tibet-gateway\", not \"\(s)\"") }
        if let s = r["route_class"]?.stringValue, !s.isEmpty, !routeClasses.contains(s) {
            problems.append("route_class: \"\(s)\" is not one of \(routeClasses.sorted().joined(separator: "|"))")
        }
        if let s = r["attestation_layer"]?.stringValue, !s.isEmpty, !attestationLayers.contains(s) {
            problems.append("attestation_layer: \"\(s)\" is not one of \(attestationLayers.sorted().joined(separator: "|"))")
        }
        if let s = r["timestamp"]?.stringValue, !s.isEmpty, (try? RFC3339.parse(s)) == nil { problems.append("timestamp: \"\(s)\" is not an RFC 3339 time with an offset") }
        return problems
    }

    static func timestamp(_ ns: UInt64) -> String { RFC3339.format(ns: Int64(clamping: ns)) }
}

/// `gateway-events`: writes a gateway-event.v1 record (JSONL) for every dispatched cap (input
/// `dispatched`) and every executed cap (input `executed`: the executor's receipts).
public final class GatewayEventsSink: Stage {
    public static let descriptor = StageDescriptor(
        kind: "gateway-events",
        summary: "Writes gateway-event.v1 records (JSONL, 37 keys, mapping in docs/cap-pipeline.md) for every dispatched cap and every executed cap (receipts); `verify_key` checks each signed receipt before `verified` says true.",
        role: .sink,
        inputs: [InputPort("dispatched", doc: "caps as they go to the executor"), InputPort("executed", doc: "the executor's receipts")],
        fields: [
            ConfigField("path", .string, default: .string("gateway-events.jsonl"), doc: "The JSONL file (relative: the run directory); appended."),
            ConfigField("verify_key", .string, optional: true, doc: "The executor's public key (64 hex or a .pub file): receipts are verified, and `verified` is the result."),
        ],
        make: { c in GatewayEventsSink(path: c.string("path") ?? "gateway-events.jsonl", verifyKey: c.string("verify_key")) })

    let pathSpec: String
    let verifyKeySpec: String?
    var key: [UInt8]?
    var file: UnsafeMutablePointer<FILE>?
    var stageID = ""
    var dispatched = 0, executed = 0, verifiedCount = 0, unverified = 0
    var buffer: [UInt8] = []

    init(path: String, verifyKey: String?) { pathSpec = path; verifyKeySpec = verifyKey }

    public func start(context: any StageContext) throws {
        stageID = context.stageID
        let p = context.resolvePath(pathSpec)
        guard let f = fopen(p, "ae") else { throw StageError.halt("gateway-events: cannot open \(p): \(String(cString: strerror(errno)))") }
        file = f
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        let e = envelope
        let record: ConfigValue
        if arrival.port == "executed" {
            // The key is read at the first receipt, not at start: an executor with `create_key`
            // writes it when it starts, which may be after this stage starts.
            if key == nil, let k = verifyKeySpec {
                do { key = try KeyFiles.loadPublicKey(k.count == 64 ? k : context.resolvePath(k)) }
                catch { throw StageError.halt("gateway-events verify_key: \(error)") }
            }
            guard let payload = try? JSON.parse(bytes: e.payload), let receipt = payload["receipt"], receipt.mapEntries != nil else {
                throw StageError.deadLetter("gateway-events: an `executed` envelope without a receipt payload")
            }
            record = executedRecord(e, payload: payload, receipt: receipt, arrival: arrival, context: context)
            executed += 1
        } else {
            record = dispatchedRecord(e, arrival: arrival, context: context)
            dispatched += 1
        }
        JSON.write(record, into: &buffer)
        buffer.append(0x0A)
        if buffer.count >= 64 << 10 { flush() }
    }

    func common(_ e: Envelope, capID: String, kind: String, arrival: Arrival, nowNs: UInt64) -> [(String, ConfigValue)] {
        // Typed fields take only values of their type (a cap's attributes are not trusted to be).
        func number(_ k: String) -> ConfigValue {
            switch e.attrs[k] { case .int(let i)?: return .int(i); case .double(let d)? where d.isFinite: return .double(d); default: return .null }
        }
        func bool(_ k: String) -> ConfigValue { if case .bool(let b)? = e.attrs[k] { return .bool(b) }; return .null }
        let route = e.attrs["triage_reason"] != nil ? "triage" : (e.hops > 0 ? "relay" : (arrival.transport == "tcp" ? "cluster" : "local"))
        return [
            ("event_id", .string(EnvelopeID.derived(from: e.id, output: "gateway.\(kind)", index: 0).description)),
            ("observation_layer", .string("tibet-gateway")),
            ("timestamp", .string(GatewayEvent.timestamp(nowNs))),
            ("operation_id", .string(capID)),
            ("agent_id", .string(e.actor.isEmpty ? "unknown" : e.actor)),
            ("intent", .string(e.intent.isEmpty ? "unknown" : e.intent)),
            ("route_class", .string(route)),
            ("surface", .string(arrival.from.split(separator: ".").first.map(String.init) ?? arrival.from)),
            ("transport", .string(arrival.transport)),
            ("lane_class", .string(e.attrs["lane_class"]?.stringValue ?? (e.lane.isEmpty ? "none" : e.lane))),
            ("lane_collision_policy", .string(e.attrs["lane_collision_policy"]?.stringValue ?? "none")),
            ("coffee_lane_policy", .string(e.attrs["coffee_lane_policy"]?.stringValue ?? "none")),
            ("_emitter", .string("pipehost/\(stageID)")),
            ("request_id", .string(e.id.description)),
            ("envelope_id", .string(capID)),
            ("parent_id", e.parent.map { .string($0.description) } ?? .null),
            ("thread_id", .string(e.attrs["slot_key"]?.stringValue ?? e.actor)),
            ("actor_aint", e.attrs["actor_aint"]?.stringValue.map { .string($0) } ?? .null),
            ("actor_jis_pubkey", e.attrs["actor_jis_pubkey"]?.stringValue.map { .string($0) } ?? .null),
            ("target_url", .null),
            ("coffee_reason", e.attrs["coffee_reason"]?.stringValue.map { .string($0) } ?? .null),
            ("time_diff_seconds", number("time_diff_s")),
            ("diff_threshold_seconds", number("diff_threshold_s")),
            ("preemptible", bool("preemptible")),
            ("lane_priority", number("lane_priority")),
            ("gateway_actor", .string("pipehost")),
            ("content_hash", .string(Hex.encode(Digest.sha256(e.payload)))),
        ]
    }

    func dispatchedRecord(_ e: Envelope, arrival: Arrival, context: any StageContext) -> ConfigValue {
        let now = context.wallClockNs
        var r = common(e, capID: e.id.description, kind: "dispatched", arrival: arrival, nowNs: now)
        // Measured: from ingest to this record (how long the cap took to be dispatched).
        let latencyMs = e.ingestNs > 0 && now > e.ingestNs ? Double(now - e.ingestNs) / 1e6 : 0
        r += [
            ("provider", .string("mux")),
            ("model", .string("lane:" + (e.attrs["lane_class"]?.stringValue ?? (e.lane.isEmpty ? "none" : e.lane)))),
            ("status", .string("dispatched")),
            ("latency_ms", .double(latencyMs)),
            ("attestation_layer", .string("none")),
            ("token_id", .null), ("method", .string("dispatch")), ("verified", .bool(false)), ("attestation_ref", .null),
            ("payload", .object([("rank", .int(Int64(clamping: e.rank))), ("hops", .int(Int64(e.hops))),
                                 ("continuation", .string(e.attrs["continuation"]?.stringValue ?? "receipt"))])),
        ]
        return .object(r)
    }

    func executedRecord(_ e: Envelope, payload: ConfigValue, receipt: ConfigValue, arrival: Arrival, context: any StageContext) -> ConfigValue {
        let capID = receipt["cap"]?.stringValue ?? e.parent?.description ?? e.id.description
        let proof = payload["proof"]
        let signed = proof?["batch_sig"]?.stringValue != nil
        var verified = false
        if signed, let key { verified = Receipts.verify(payload, publicKey: key) == nil }
        if verified { verifiedCount += 1 } else if signed { unverified += 1 }
        let ns = UInt64(clamping: receipt["time_ns"]?.intValue ?? Int64(clamping: context.wallClockNs))
        var r = common(e, capID: capID, kind: "executed", arrival: arrival, nowNs: ns)
        let executor = receipt["executor"]?.stringValue ?? "unknown"
        r += [
            ("provider", .string(executor)),
            ("model", .string(executor == "command" ? (receipt["program"]?.stringValue ?? "command") : executor)),
            ("status", .string(receipt["outcome"]?.stringValue ?? "unknown")),
            ("latency_ms", .double(Double(receipt["latency_us"]?.intValue ?? 0) / 1000)),
            ("attestation_layer", .string(signed ? "self-signed" : "none")),
            ("token_id", proof?["key_id"] ?? .null), ("method", .string("execute")), ("verified", .bool(verified)),
            ("attestation_ref", proof?["batch_root"] ?? .null),
            ("payload", receipt),
        ]
        return .object(r)
    }

    func flush() {
        guard let f = file, !buffer.isEmpty else { return }
        _ = buffer.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, f) }
        fflush(f)
        buffer.removeAll(keepingCapacity: true)
    }

    public var tickInterval: UInt64? { 200_000_000 }
    public func tick(context: any StageContext) throws { flush(); report(context) }
    public func drain(context: any StageContext) throws { flush(); report(context) }
    /// Under at-least-once delivery: the events reach the file before their envelopes are acknowledged.
    public func commit(context: any StageContext) throws { flush() }
    public func stop() { flush(); if let f = file { fclose(f); file = nil } }
    func report(_ c: any StageContext) {
        c.report("dispatched", .int(Int64(dispatched))); c.report("executed", .int(Int64(executed)))
        if key != nil { c.report("verified", .int(Int64(verifiedCount))); c.report("unverified", .int(Int64(unverified))) }
    }
}
