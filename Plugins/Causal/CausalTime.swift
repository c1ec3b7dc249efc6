import PipeKit

/// How two vector clocks relate.
public enum CausalRelation: String, Sendable, Equatable {
    case before, after, equal, concurrent

    /// `a` compared with `b`: `before` when every entry of a <= b's and one is smaller, `after`
    /// the other way round, `equal`, else `concurrent`. Missing entries count as 0.
    public static func of(_ a: [String: UInt64], _ b: [String: UInt64]) -> CausalRelation {
        var less = false, greater = false
        for (k, x) in a {
            let y = b[k] ?? 0
            if x < y { less = true } else if x > y { greater = true }
        }
        for (k, y) in b where a[k] == nil && y > 0 { less = true }
        switch (less, greater) {
        case (false, false): return .equal
        case (true, false): return .before
        case (false, true): return .after
        case (true, true): return .concurrent
        }
    }

    static func text(_ c: [String: UInt64]) -> String {
        "{" + c.keys.sorted().map { "\($0):\(c[$0] ?? 0)" }.joined(separator: ",") + "}"
    }
}

/// `causal-time`: places every envelope in causal time. Lamport receive rule
/// `rank = max(local, incoming.rank) + 1`; optional vector clocks per actor; a causal guard over
/// a bounded window of recently placed ids routes violations to `triage` with the reason.
/// Iterative throughout: a chain of any depth costs constant stack.
public final class CausalTimeStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "causal-time",
        summary: "Causal-time placer: Lamport rank by the receive rule, optional vector clocks per actor, and a causal guard over a bounded window that sends violations (unknown parent, a clock not after its parent's) to `triage`.",
        role: .transform,
        inputs: [InputPort("in", doc: "caps (envelopes); follow-ups may be looped back here", acceptsLoopBack: true)],
        outputs: { _ in ["out", "triage"] }, outputsDoc: "out, triage",
        fields: [
            ConfigField("vector_clocks", .bool, default: .bool(false),
                        doc: "Keep a vector clock per actor: an envelope without a clock gets its parent's (when in the window) merged with its actor's last, its actor's entry ticked; one with a clock is checked against its parent's."),
            ConfigField("unknown_parent", .enumeration(["accept", "triage"]), default: .string("accept"),
                        doc: "What happens to an envelope whose parent id is not in the window: placed as a root, or sent to `triage`."),
            ConfigField("window", .int(min: 1, max: 10_000_000), default: .int(100_000),
                        doc: "How many recently placed ids (with rank and clock) the guard remembers; the oldest is forgotten first."),
        ],
        make: { try CausalTimeStage(config: $0) })

    struct Placed { var rank: UInt64; var clock: [String: UInt64] }
    static let maxRank: UInt64 = 1 << 62

    let vectorClocks: Bool
    let triageUnknownParent: Bool
    let windowSize: Int
    /// The Lamport clock: the highest rank placed so far.
    var local: UInt64 = 0
    /// Recently placed ids, and their order of placement (a ring) for FIFO forgetting.
    var window: [EnvelopeID: Placed] = [:]
    var ring: [EnvelopeID] = []
    var ringNext = 0
    /// Each actor's latest vector clock.
    var actorClocks: [String: [String: UInt64]] = [:]
    var placed = 0, unknownParents = 0, clockViolations = 0, triaged = 0
    var out = OutputHandle(index: 0, name: "out"), triage = OutputHandle(index: 1, name: "triage")

    init(config c: ConfigReader) throws {
        vectorClocks = c.bool("vector_clocks") ?? false
        triageUnknownParent = c.string("unknown_parent") == "triage"
        windowSize = Int(c.int("window") ?? 100_000)
        window.reserveCapacity(min(windowSize, 1 << 16))
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out"); triage = try context.output("triage")
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        var e = envelope
        // A rank or clock entry this large can only be hostile or broken: it would push every
        // later rank to the same clamped value. Refused, with the reason.
        if e.rank > Self.maxRank || e.clock.values.contains(where: { $0 > Self.maxRank }) {
            return send(e, reason: "rank or vector clock entry above \(Self.maxRank)", context: context)
        }
        let parent = e.parent.flatMap { window[$0] }
        if let p = e.parent, parent == nil {
            unknownParents += 1
            if triageUnknownParent {
                return send(e, reason: "unknown parent \(p): not among the last \(windowSize) placed ids", context: context)
            }
        }
        if vectorClocks {
            if e.clock.isEmpty {
                var v = actorClocks[e.actor] ?? [:]
                if let pc = parent?.clock { for (k, x) in pc where x > v[k] ?? 0 { v[k] = x } }
                v[e.actor, default: 0] += 1
                e.clock = v
            } else if let p = parent, !p.clock.isEmpty {
                let rel = CausalRelation.of(e.clock, p.clock)
                if rel != .after {
                    clockViolations += 1
                    let why = rel == .equal ? "is equal to its parent's" : rel == .before ? "is before its parent's" : "is concurrent with its parent's"
                    return send(e, reason: "vector clock \(CausalRelation.text(e.clock)) \(why) \(CausalRelation.text(p.clock)); it must strictly dominate", context: context)
                }
            }
            // The actor's clock absorbs what it has now seen.
            var mine = actorClocks[e.actor] ?? [:]
            for (k, x) in e.clock where x > mine[k] ?? 0 { mine[k] = x }
            actorClocks[e.actor] = mine
        }
        // Lamport receive rule.
        local = max(local, e.rank) &+ 1
        e.rank = local
        remember(e.id, Placed(rank: local, clock: vectorClocks ? e.clock : [:]))
        placed += 1
        context.emit(e, to: out)
    }

    func send(_ e: Envelope, reason: String, context: any StageContext) {
        triaged += 1
        var t = e
        t.attrs["triage_reason"] = .string(reason)
        context.audit(.about(e, decision: "triage", reason: reason, details: ["stage_kind": .string("causal-time")]))
        context.emit(t, to: triage)
    }

    /// FIFO window: the oldest id is forgotten when the window is full.
    func remember(_ id: EnvelopeID, _ p: Placed) {
        if window.updateValue(p, forKey: id) != nil { return }
        if ring.count < windowSize {
            ring.append(id)
        } else {
            window.removeValue(forKey: ring[ringNext])
            ring[ringNext] = id
            ringNext = (ringNext + 1) % windowSize
        }
    }

    public var tickInterval: UInt64? { 1_000_000_000 }
    public func tick(context: any StageContext) throws { report(context) }
    public func drain(context: any StageContext) throws { report(context) }
    func report(_ c: any StageContext) {
        c.report("placed", .int(Int64(placed)))
        c.report("rank", .int(Int64(clamping: local)))
        c.report("window", .int(Int64(window.count)))
        c.report("unknown_parents", .int(Int64(unknownParents)))
        c.report("clock_violations", .int(Int64(clockViolations)))
        c.report("triaged", .int(Int64(triaged)))
        if vectorClocks { c.report("actors", .int(Int64(actorClocks.count))) }
    }
}
