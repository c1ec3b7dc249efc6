import PipeKit

/// `slot-injector`: binds each envelope to an executor-bound memory slot. The slot key is a
/// template over header fields; a slot holds the last `history` envelope ids with rank and
/// outcome, and free-form context. Each envelope leaves with `slot_key` and a copy of its slot
/// (as it was before this envelope), then is recorded in it. Receipts fed back on `feedback`
/// set outcomes. Slots live in the stage's SQLite store, written behind an in-memory cache (one
/// transaction per flush), survive restarts, and are bounded: at most `max_slots` (least
/// recently used evicted first) and `ttl_s` since last use; evictions are counted.
public final class SlotInjectorStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "slot-injector",
        summary: "Binds each envelope to a durable memory slot keyed by a template (default `{lane}:{actor}`): attaches `slot_key` and the slot's content, records the envelope, takes outcomes from receipts fed back; slots in SQLite, bounded by count (LRU) and TTL.",
        role: .transform,
        inputs: [InputPort("in", doc: "caps to bind to their slot"),
                 InputPort("feedback", doc: "receipts fed back from the executor (their `slot_key` attribute and `receipt.cap`/`receipt.outcome`; an optional top-level `context` object is merged into the slot)", acceptsLoopBack: true)],
        outputs: { _ in ["out", "triage"] }, outputsDoc: "out, triage",
        fields: [
            ConfigField("key", .string, default: .string("{lane}:{actor}"),
                        doc: "Slot key template: `{lane}`, `{actor}`, `{intent}`, `{authority}`, `{attr.NAME}`; a missing value is empty."),
            ConfigField("history", .int(min: 1, max: 1000), default: .int(16), doc: "Envelope ids (with rank and outcome) a slot remembers."),
            ConfigField("max_slots", .int(min: 1, max: 10_000_000), default: .int(10_000), doc: "Most slots kept; the least recently used is evicted first."),
            ConfigField("ttl_s", .double(min: 0, max: 31_536_000), default: .double(86_400), doc: "A slot unused this long (wall clock) is evicted; 0: never."),
            ConfigField("flush_ms", .int(min: 1, max: 60_000), default: .int(100), doc: "Changed slots are written to SQLite at most this often (and at drain), in one transaction."),
        ],
        usesStore: true,
        check: { c in
            let t = c.string("key") ?? "{lane}:{actor}"
            if let bad = SlotTemplate.unknownPlaceholder(t) {
                return [ConfigIssue(key: "key", message: "unknown placeholder '{\(bad)}' (expected lane, actor, intent, authority, attr.NAME)")]
            }
            return []
        },
        make: { try SlotInjectorStage(config: $0) })

    struct Entry { var id: String; var rank: UInt64; var outcome: String? }
    struct Slot { var entries: [Entry]; var context: [ConfigEntry]; var lastUsedNs: UInt64; var uses: Int64 }

    let template: SlotTemplate
    let history: Int
    let maxSlots: Int
    let ttlNs: UInt64
    let flushNs: UInt64
    var slots: [String: Slot] = [:]
    var dirty: Set<String> = []
    var deleted: Set<String> = []
    var lastFlush: UInt64 = 0
    var storeErrors = 0
    var scratch: [UInt8] = []
    var bound = 0, outcomes = 0, unknownFeedback = 0, evictedLRU = 0, evictedTTL = 0, flushes = 0
    var out = OutputHandle(index: 0, name: "out"), triage = OutputHandle(index: 1, name: "triage")
    static let prefix = "slot/"
    static let maxContextKeys = 32, maxContextEntryBytes = 1024

    init(config c: ConfigReader) throws {
        template = SlotTemplate(c.string("key") ?? "{lane}:{actor}")
        history = Int(c.int("history") ?? 16)
        maxSlots = Int(c.int("max_slots") ?? 10_000)
        ttlNs = UInt64((c.double("ttl_s") ?? 86_400) * 1e9)
        flushNs = UInt64(c.int("flush_ms") ?? 100) * 1_000_000
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out"); triage = try context.output("triage")
        guard let store = context.store else { throw StageError.halt("slot-injector needs its durable store") }
        // What survived the last run.
        for k in try store.keys(prefix: Self.prefix) {
            guard let b = try store.get(k), let v = try? JSON.parse(bytes: b), let s = Self.decode(v) else { continue }
            slots[String(k.dropFirst(Self.prefix.count))] = s
        }
        lastFlush = context.now
        evict(context)
        context.report("slots", .int(Int64(slots.count)))
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        if arrival.port == "feedback" { return feedback(envelope, context: context) }
        var e = envelope
        let key = template.render(e)
        let now = context.wallClockNs
        var s = slots[key] ?? Slot(entries: [], context: [], lastUsedNs: now, uses: 0)
        e.attrs["slot_key"] = .string(key)
        e.attrs["slot"] = .string(Self.text(s, &scratch))
        s.entries.append(Entry(id: e.id.description, rank: e.rank, outcome: nil))
        if s.entries.count > history { s.entries.removeFirst(s.entries.count - history) }
        s.lastUsedNs = now
        s.uses += 1
        slots[key] = s
        dirty.insert(key); deleted.remove(key)
        bound += 1
        if slots.count > maxSlots { evict(context) }
        context.emit(e, to: out)
    }

    func feedback(_ r: Envelope, context: any StageContext) {
        let payload = try? JSON.parse(bytes: r.payload)
        let capID = payload?["receipt"]?["cap"]?.stringValue ?? r.parent?.description
        let outcome = payload?["receipt"]?["outcome"]?.stringValue ?? r.attrs["outcome"]?.stringValue
        guard let key = r.attrs["slot_key"]?.stringValue, var s = slots[key] else {
            let why = r.attrs["slot_key"] == nil ? "feedback without a slot_key attribute" : "feedback for unknown slot '\(r.attrs["slot_key"]?.stringValue ?? "")' (never bound, or evicted)"
            return refuse(r, why, context)
        }
        guard let capID, let outcome, let i = s.entries.lastIndex(where: { $0.id == capID }) else {
            return refuse(r, "feedback for cap \(capID ?? "?") that slot '\(key)' does not remember (it keeps the last \(history))", context)
        }
        s.entries[i].outcome = outcome
        if let ctx = payload?["context"]?.mapEntries {
            // Bounded: the slot travels with every cap of its key.
            for c in ctx {
                let size = c.key.utf8.count + JSON.serialize(c.value).utf8.count
                if size > Self.maxContextEntryBytes { context.count("context_entries_refused"); continue }
                if let j = s.context.firstIndex(where: { $0.key == c.key }) { s.context[j].value = c.value }
                else if s.context.count < Self.maxContextKeys { s.context.append(c) }
                else { context.count("context_entries_refused") }
            }
        }
        s.lastUsedNs = context.wallClockNs
        slots[key] = s
        dirty.insert(key)
        outcomes += 1
    }

    func refuse(_ r: Envelope, _ why: String, _ context: any StageContext) {
        unknownFeedback += 1
        var t = r
        t.attrs["triage_reason"] = .string(why)
        context.audit(.about(r, decision: "triage", reason: why, details: ["stage_kind": .string("slot-injector")]))
        context.emit(t, to: triage)
    }

    /// TTL first, then least recently used down to `max_slots`; each eviction is counted.
    func evict(_ context: any StageContext) {
        let now = context.wallClockNs
        if ttlNs > 0 {
            for (k, s) in slots where now > s.lastUsedNs && now - s.lastUsedNs > ttlNs { drop(k); evictedTTL += 1 }
        }
        if slots.count > maxSlots {
            let over = slots.count - maxSlots
            // Evict a little more than needed (1/16) so a full cache does not sort on every envelope.
            let n = min(slots.count, over + maxSlots / 16)
            for (k, _) in slots.sorted(by: { $0.value.lastUsedNs < $1.value.lastUsedNs }).prefix(n) { drop(k); evictedLRU += 1 }
        }
    }

    func drop(_ k: String) { slots.removeValue(forKey: k); dirty.remove(k); deleted.insert(k) }

    func flush(_ context: any StageContext) {
        lastFlush = context.now
        guard !dirty.isEmpty || !deleted.isEmpty, let store = context.store else { return }
        let puts = dirty.compactMap { k in slots[k].map { (Self.prefix + k, Array(JSON.serialize(Self.encode($0)).utf8)) } }
        do { try store.batch(put: puts, delete: deleted.map { Self.prefix + $0 }) } catch {
            // The cache keeps the changes; the next flush tries again.
            storeErrors += 1
            context.logger.error("slot store: \(error); \(dirty.count + deleted.count) slot change(s) kept for the next flush")
            return
        }
        dirty.removeAll(keepingCapacity: true); deleted.removeAll(keepingCapacity: true)
        flushes += 1
    }

    static func encode(_ s: Slot) -> ConfigValue {
        .object([
            ("recent", .list(s.entries.map { .object([("id", .string($0.id)), ("rank", .int(Int64(clamping: $0.rank))), ("outcome", $0.outcome.map { .string($0) } ?? .null)]) })),
            ("context", .map(s.context)), ("last_used_ns", .int(Int64(clamping: s.lastUsedNs))), ("uses", .int(s.uses)),
        ])
    }

    /// The slot as JSON text, written directly (byte for byte `JSON.serialize(encode(s))`): it is
    /// attached to every envelope, so it must not build a tree each time.
    static func text(_ s: Slot, _ o: inout [UInt8]) -> String {
        o.removeAll(keepingCapacity: true)
        o.append(contentsOf: #"{"recent":["#.utf8)
        for (n, e) in s.entries.enumerated() {
            if n > 0 { o.append(0x2C) }
            o.append(contentsOf: #"{"id":"#.utf8); JSON.writeString(e.id, into: &o)
            o.append(contentsOf: #","rank":"#.utf8); o.append(contentsOf: String(Int64(clamping: e.rank)).utf8)
            o.append(contentsOf: #","outcome":"#.utf8)
            if let x = e.outcome { JSON.writeString(x, into: &o) } else { o.append(contentsOf: "null".utf8) }
            o.append(0x7D)
        }
        o.append(contentsOf: #"],"context":"#.utf8); JSON.write(.map(s.context), into: &o)
        o.append(contentsOf: #","last_used_ns":"#.utf8); o.append(contentsOf: String(Int64(clamping: s.lastUsedNs)).utf8)
        o.append(contentsOf: #","uses":"#.utf8); o.append(contentsOf: String(s.uses).utf8)
        o.append(0x7D)
        return String(decoding: o, as: UTF8.self)
    }

    static func decode(_ v: ConfigValue) -> Slot? {
        guard let recent = v["recent"]?.listValue else { return nil }
        let entries = recent.compactMap { r -> Entry? in
            guard let id = r["id"]?.stringValue else { return nil }
            return Entry(id: id, rank: UInt64(clamping: r["rank"]?.intValue ?? 0), outcome: r["outcome"]?.stringValue)
        }
        return Slot(entries: entries, context: v["context"]?.mapEntries ?? [], lastUsedNs: UInt64(clamping: v["last_used_ns"]?.intValue ?? 0),
                    uses: v["uses"]?.intValue ?? 0)
    }

    public var tickInterval: UInt64? { flushNs }
    public func tick(context: any StageContext) throws {
        evict(context)
        if context.now &- lastFlush >= flushNs { flush(context) }
        report(context)
    }
    public func drain(context: any StageContext) throws { evict(context); flush(context); report(context) }
    func report(_ c: any StageContext) {
        c.report("slots", .int(Int64(slots.count))); c.report("bound", .int(Int64(bound)))
        c.report("outcomes", .int(Int64(outcomes))); c.report("unknown_feedback", .int(Int64(unknownFeedback)))
        c.report("evicted_lru", .int(Int64(evictedLRU))); c.report("evicted_ttl", .int(Int64(evictedTTL)))
        c.report("unwritten", .int(Int64(dirty.count + deleted.count))); c.report("flushes", .int(Int64(flushes)))
        if storeErrors > 0 { c.report("store_errors", .int(Int64(storeErrors))) }
    }
}

/// A slot key template: literal text and `{field}` placeholders over envelope header fields.
struct SlotTemplate {
    enum Part { case text(String), field(String) }
    let parts: [Part]

    init(_ t: String) {
        var parts: [Part] = []
        var rest = Substring(t)
        while let open = rest.firstIndex(of: "{"), let close = rest[open...].firstIndex(of: "}") {
            if open > rest.startIndex { parts.append(.text(String(rest[..<open]))) }
            parts.append(.field(String(rest[rest.index(after: open)..<close])))
            rest = rest[rest.index(after: close)...]
        }
        if !rest.isEmpty { parts.append(.text(String(rest))) }
        self.parts = parts
    }

    static func unknownPlaceholder(_ t: String) -> String? {
        for p in SlotTemplate(t).parts {
            if case .field(let f) = p, !["lane", "actor", "intent", "authority"].contains(f), !f.hasPrefix("attr.") || f.count <= 5 { return f }
        }
        return nil
    }

    func render(_ e: Envelope) -> String {
        var s = ""
        for p in parts {
            switch p {
            case .text(let t): s += t
            case .field("lane"): s += e.lane
            case .field("actor"): s += e.actor
            case .field("intent"): s += e.intent
            case .field("authority"): s += e.authority
            case .field(let f): s += e.attrs[String(f.dropFirst(5))]?.description ?? ""
            }
        }
        return s
    }
}
