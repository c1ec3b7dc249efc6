/// One audited decision, with the four provenance layers of the TIBET tokens (CONCEPTS.md,
/// "Audit and provenance"). The schema is fixed; the hash-chained log (PipeAudit, docs/audit-log.md) stores
/// exactly these fields.
public struct AuditRecord: Sendable, Hashable {
    /// What was decided (`erin`): e.g. `dead-letter`, `quarantine`, `block`, `route`.
    public var decision: String
    /// The envelope the decision is about.
    public var envelope: EnvelopeID?
    /// Linked identity and parents (`eraan`): actor and parent ids.
    public var actor: String
    public var parents: [EnvelopeID]
    /// Where and when (`eromheen`): stage id, host/worker, wall time in ns.
    public var stage: String
    public var location: String
    public var timeNs: UInt64
    /// Why / which intent (`erachter`).
    public var intent: String
    public var reason: String
    /// Extra typed details.
    public var details: [String: AttrValue]
    /// Whether this is a decision (always kept) or routine routing (kept under `audit: all`).
    public var routine: Bool

    public init(decision: String, envelope: EnvelopeID? = nil, actor: String = "", parents: [EnvelopeID] = [],
                stage: String = "", location: String = "", timeNs: UInt64 = 0, intent: String = "", reason: String = "",
                details: [String: AttrValue] = [:], routine: Bool = false) {
        self.decision = decision; self.envelope = envelope; self.actor = actor; self.parents = parents; self.stage = stage
        self.location = location; self.timeNs = timeNs; self.intent = intent; self.reason = reason; self.details = details
        self.routine = routine
    }

    /// A record about `e`, its identity and intent filled from the envelope.
    public static func about(_ e: Envelope, decision: String, reason: String, details: [String: AttrValue] = [:], routine: Bool = false) -> AuditRecord {
        AuditRecord(decision: decision, envelope: e.id, actor: e.actor, parents: e.parent.map { [$0] } ?? [],
                    intent: e.intent, reason: reason, details: details, routine: routine)
    }

    /// JSON form (audit file lines and AUDIT frame bodies), grouped by provenance layer.
    public var json: ConfigValue {
        .object([
            ("erin", .object([("decision", .string(decision)), ("envelope", envelope.map { .string($0.description) } ?? .null),
                              ("routine", .bool(routine))])),
            ("eraan", .object([("actor", .string(actor)), ("parents", .list(parents.map { .string($0.description) }))])),
            ("eromheen", .object([("stage", .string(stage)), ("location", .string(location)), ("time_ns", .int(Int64(clamping: timeNs)))])),
            ("erachter", .object([("intent", .string(intent)), ("reason", .string(reason))])),
            ("details", .map(details.keys.sorted().map { k in
                let v: ConfigValue
                switch details[k] ?? .bool(false) {
                case .string(let s): v = .string(s); case .int(let i): v = .int(i)
                case .double(let d): v = .double(d); case .bool(let b): v = .bool(b)
                }
                return ConfigEntry(key: k, value: v)
            })),
        ])
    }

    /// Appends the JSON form (byte-for-byte what `JSON.serialize(json)` gives) without building
    /// the tree: audit records are written per decision, so this is on the hot path.
    public func writeJSON(into o: inout [UInt8]) {
        func lit(_ s: StaticString) { o.append(contentsOf: UnsafeBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount)) }
        func id(_ e: EnvelopeID) { o.append(0x22); o.append(contentsOf: e.description.utf8); o.append(0x22) }
        lit(#"{"erin":{"decision":"#); JSON.writeString(decision, into: &o)
        lit(#","envelope":"#); if let e = envelope { id(e) } else { lit("null") }
        lit(#","routine":"#); lit(routine ? "true" : "false")
        lit(#"},"eraan":{"actor":"#); JSON.writeString(actor, into: &o)
        lit(#","parents":["#)
        for (n, p) in parents.enumerated() { if n > 0 { o.append(0x2C) }; id(p) }
        lit(#"]},"eromheen":{"stage":"#); JSON.writeString(stage, into: &o)
        lit(#","location":"#); JSON.writeString(location, into: &o)
        lit(#","time_ns":"#); o.append(contentsOf: String(Int64(clamping: timeNs)).utf8)
        lit(#"},"erachter":{"intent":"#); JSON.writeString(intent, into: &o)
        lit(#","reason":"#); JSON.writeString(reason, into: &o)
        lit(#"},"details":{"#)
        if !details.isEmpty {
            for (n, k) in details.keys.sorted().enumerated() {
                if n > 0 { o.append(0x2C) }
                JSON.writeString(k, into: &o); o.append(0x3A)
                switch details[k] ?? .bool(false) {
                case .string(let s): JSON.writeString(s, into: &o)
                case .int(let i): JSON.write(.int(i), into: &o)
                case .double(let d): JSON.write(.double(d), into: &o)
                case .bool(let b): lit(b ? "true" : "false")
                }
            }
        }
        lit("}}")
    }

    public init?(json v: ConfigValue) {
        guard let erin = v["erin"], let eraan = v["eraan"], let where_ = v["eromheen"], let why = v["erachter"],
              let decision = erin["decision"]?.stringValue else { return nil }
        self.decision = decision
        self.envelope = erin["envelope"]?.stringValue.flatMap(EnvelopeID.init(hex:))
        self.routine = erin["routine"]?.boolValue ?? false
        self.actor = eraan["actor"]?.stringValue ?? ""
        self.parents = (eraan["parents"]?.listValue ?? []).compactMap { $0.stringValue.flatMap(EnvelopeID.init(hex:)) }
        self.stage = where_["stage"]?.stringValue ?? ""
        self.location = where_["location"]?.stringValue ?? ""
        self.timeNs = UInt64(clamping: where_["time_ns"]?.intValue ?? 0)
        self.intent = why["intent"]?.stringValue ?? ""
        self.reason = why["reason"]?.stringValue ?? ""
        var d: [String: AttrValue] = [:]
        for e in v["details"]?.mapEntries ?? [] {
            switch e.value {
            case .string(let s): d[e.key] = .string(s); case .int(let i): d[e.key] = .int(i)
            case .double(let x): d[e.key] = .double(x); case .bool(let b): d[e.key] = .bool(b)
            default: break
            }
        }
        self.details = d
    }
}
