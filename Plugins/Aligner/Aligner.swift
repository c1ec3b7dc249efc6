import PipeKit

/// `aligner`: merges the lanes feeding `in` into one stream ordered by rank. It holds each
/// input's envelopes in arrival order and releases the smallest-rank head once every input has
/// a head, or once the oldest held envelope has waited `max_wait_ms` on the stage clock (or the
/// stage holds `max_held`). An envelope whose rank is below the last released rank is late: it
/// goes to `triage` with the reason, never reordered silently.
///
/// Alignment epoch (attribute `align_epoch` on every released envelope): the number of releases
/// so far, this one included, that were made while every input held a head. It stays the same
/// across forced releases (timeout, held limit, drain), which are marked `align_forced`.
public final class AlignerStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "aligner",
        summary: "Rank-ordered merge of every lane into `in`: releases the smallest rank once each input has a head, or after `max_wait_ms`; late envelopes (rank below the last released) go to `triage`; each release carries the alignment epoch.",
        role: .transform,
        inputs: [InputPort("in", doc: "ranked envelopes (from causal-time), one or more lanes; each lane is one input")],
        outputs: { _ in ["out", "triage"] }, outputsDoc: "out, triage",
        fields: [
            ConfigField("max_wait_ms", .int(min: 0, max: 3_600_000), default: .int(50),
                        doc: "Release without every input present once the oldest held envelope has waited this long (stage clock)."),
            ConfigField("max_held", .int(min: 1, max: 10_000_000), default: .int(10_000),
                        doc: "Most envelopes held; beyond it the smallest-rank head is released at once (bounded memory)."),
            ConfigField("late", .enumeration(["triage", "release"]), default: .string("triage"),
                        doc: "A late envelope (rank below the last released): to `triage` with the reason, or released at once marked `align_late` (when upstream delays, like mux holds longer than max_wait_ms, are expected)."),
        ],
        make: { try AlignerStage(config: $0) })

    struct Held { var e: Envelope; var at: UInt64 }
    let maxWaitNs: UInt64
    let maxHeld: Int
    let releaseLate: Bool
    var inputs = 1
    /// Per input lane: held envelopes in arrival order, with a read index (no O(n) removals).
    var queues: [[Held]] = []
    var heads: [Int] = []
    var held = 0
    var lastReleased: UInt64?
    var epoch: UInt64 = 0
    var released = 0, forced = 0, late = 0
    var out = OutputHandle(index: 0, name: "out"), triage = OutputHandle(index: 1, name: "triage")

    init(config c: ConfigReader) throws {
        maxWaitNs = UInt64(c.int("max_wait_ms") ?? 50) * 1_000_000
        maxHeld = Int(c.int("max_held") ?? 10_000)
        releaseLate = c.string("late") == "release"
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out"); triage = try context.output("triage")
        inputs = max(1, context.laneCount(port: "in"))
        queues = Array(repeating: [], count: inputs)
        heads = Array(repeating: 0, count: inputs)
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        let e = envelope
        if let last = lastReleased, e.rank < last {
            return sendLate(e, last: last, context: context)
        }
        let i = min(max(0, arrival.laneIndex), inputs - 1)
        queues[i].append(Held(e: e, at: context.now))
        held += 1
        release(context, force: false)
    }

    func head(_ i: Int) -> Held? { heads[i] < queues[i].count ? queues[i][heads[i]] : nil }

    /// Releases while every input has a head; then, while the oldest held has waited too long
    /// (or too many are held), or when `force`, releases the smallest head present.
    func release(_ context: any StageContext, force: Bool) {
        while true {
            var best = -1, complete = true, oldest = UInt64.max
            for i in 0..<inputs {
                guard let h = head(i) else { complete = false; continue }
                if best < 0 || h.e.rank < (head(best)?.e.rank ?? .max) { best = i }
                oldest = min(oldest, h.at)
            }
            guard best >= 0 else { return }
            if !complete && !force {
                // Each queue is in arrival order, so the oldest held envelope is one of the heads.
                let waited = context.now &- oldest >= maxWaitNs
                if !waited && held <= maxHeld { return }
            }
            emit(best, full: complete, context: context)
        }
    }

    func emit(_ i: Int, full: Bool, context: any StageContext) {
        guard var h = head(i) else { return }
        heads[i] += 1
        held -= 1
        if heads[i] == queues[i].count { queues[i].removeAll(keepingCapacity: true); heads[i] = 0 }
        else if heads[i] >= 1024 && heads[i] * 2 >= queues[i].count { queues[i].removeFirst(heads[i]); heads[i] = 0 }
        if let last = lastReleased, h.e.rank < last {
            // Out of order within its own lane: late all the same.
            return sendLate(h.e, last: last, context: context)
        }
        if full { epoch += 1 } else { forced += 1 }
        released += 1
        lastReleased = h.e.rank
        h.e.attrs["align_epoch"] = .int(Int64(clamping: epoch))
        h.e.attrs["align_forced"] = full ? nil : .bool(true)
        context.emit(h.e, to: out)
    }

    func sendLate(_ e: Envelope, last: UInt64, context: any StageContext) {
        late += 1
        let reason = "late: rank \(e.rank) < last released rank \(last)"
        if releaseLate {
            var r = e
            r.attrs["align_late"] = .string(reason)
            r.attrs["align_epoch"] = .int(Int64(clamping: epoch))
            released += 1
            return context.emit(r, to: out)
        }
        var t = e
        t.attrs["triage_reason"] = .string(reason)
        context.audit(.about(e, decision: "triage", reason: reason, details: ["stage_kind": .string("aligner")]))
        context.emit(t, to: triage)
    }

    public var heldCount: Int { held }
    public var tickInterval: UInt64? { max(1_000_000, min(maxWaitNs / 2, 1_000_000_000)) }
    public func tick(context: any StageContext) throws {
        release(context, force: false)
        report(context)
    }
    public func drain(context: any StageContext) throws {
        release(context, force: true)
        report(context)
    }
    func report(_ c: any StageContext) {
        c.report("inputs", .int(Int64(inputs))); c.report("held", .int(Int64(held)))
        c.report("released", .int(Int64(released))); c.report("forced", .int(Int64(forced)))
        c.report("late", .int(Int64(late))); c.report("epoch", .int(Int64(clamping: epoch)))
    }
}
