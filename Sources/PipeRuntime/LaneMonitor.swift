import Glibc
import PipeConfig
import PipeKit

/// Rates from cumulative counters: keeps a few seconds of (time, value) samples and reports the
/// rate over the last second or so.
struct RateMeter: Sendable {
    private var samples: [(t: UInt64, v: UInt64)] = []

    mutating func add(_ v: UInt64, at t: UInt64) {
        if let last = samples.last, t <= last.t { return }
        // Samples at least 200 ms apart; a newer one within that replaces the newest.
        if samples.count >= 2, t - samples[samples.count - 2].t < 200_000_000 { samples[samples.count - 1] = (t, v); return }
        samples.append((t, v))
        while samples.count > 2, let first = samples.first, t - first.t > 3_000_000_000 { samples.removeFirst() }
    }

    /// Whether the samples span half a second: enough to carry a count forward by its rate.
    var ready: Bool {
        guard let first = samples.first, let last = samples.last else { return false }
        return last.t - first.t >= 500_000_000
    }

    /// Per second, measured between moments the count changed (the first sample of each new
    /// value) at least a second apart, or over all there is. A count that moves in steps (a
    /// producer that sends half a window whenever credits come back) is then measured from step
    /// to step: over a plain one-second window, which holds one step or two depending on where
    /// it falls, a lane stepping 512 every 1.13 s read 510/s for its true 454/s. A count that has
    /// not moved for longer than its steps took is measured up to the newest sample instead, so
    /// a flow that stops reads as slowing down, and as 0 once nothing moved in the samples kept.
    var rate: Double {
        guard let last = samples.last, samples.count >= 2 else { return 0 }
        var e = samples.count - 1
        while e > 0 && samples[e - 1].v == last.v { e -= 1 }
        guard e > 0 else { return 0 }
        // b: the newest change at least a second before e (else the oldest sample); steps: the
        // changes after b up to e.
        var b = 0, steps = 0
        var i = e
        while i > 0 {
            if samples[i].v != samples[i - 1].v {
                if i < e, samples[e].t - samples[i].t >= 1_000_000_000 { b = i; break }
                steps += 1
            }
            i -= 1
        }
        let moved = Double(samples[e].v &- samples[b].v)
        let span = Double(samples[e].t - samples[b].t)
        guard span > 0 else { return 0 }
        let quiet = Double(last.t - samples[e].t)
        if quiet > 1.5 * span / Double(Swift.max(1, steps)) { return moved / ((span + quiet) / 1e9) }
        return moved / (span / 1e9)
    }
}

/// What the host tracks per lane between STATS frames: its depth estimate, watermark state and
/// rates.
///
/// Depth needs both ends: envelopes the producer sent minus those the consumer took, plus the
/// producer's queue. The two counts come from reports taken at different moments (up to 100 ms
/// apart, and a fast lane moves a bound's worth in far less), so each end's count is carried
/// forward to the newer report's time at that end's own rate before subtracting. The in-flight
/// part is clamped to the bound (credits make more impossible), and the watermark state machine
/// sees the median of the last three estimates, so one skewed pair cannot flip a state.
///
/// When both ends report the same credit epoch, the counts subtracted are those within the epoch
/// (docs/wire-format.md, STATS): what an incarnation that died had taken but not yet reported,
/// and what was lost with it, then no longer count as depth for the rest of the run.
struct LaneMonitor: Sendable {
    var marks: Watermarks
    let bound: Int64
    var rateIn = RateMeter()
    var rateOut = RateMeter()
    /// Nanoseconds blocked, as a rate (ns per second).
    var blocked = RateMeter()
    /// The latest report of each end; `moving` is false once that end is idle or has ended, and
    /// then its count is not carried forward.
    var producer: (t: UInt64, sent: UInt64, queued: UInt64, spilled: UInt64, credits: UInt32, moving: Bool, epoch: UInt32, inEpoch: UInt64)?
    var consumer: (t: UInt64, received: UInt64, moving: Bool, epoch: UInt32, inEpoch: UInt64)?
    var recent: [Int64] = []
    /// The filtered depth the state machine last saw.
    private(set) var depth: Int64 = 0
    /// Log rate limit for transitions.
    var nextLog: UInt64 = 0
    var suppressed = 0

    init(settings: LaneSettings) {
        let m = settings.marks
        marks = Watermarks(low: m.low, high: m.high, release: m.release)
        bound = Int64(settings.bound)
    }

    mutating func producerReport(t: UInt64, sent: UInt64, queued: UInt64, spilled: UInt64, credits: UInt32, moving: Bool,
                                 epoch: UInt32 = 0, inEpoch: UInt64 = 0) {
        if let p = producer, t <= p.t { return }
        producer = (t, sent, queued, spilled, credits, moving, epoch, inEpoch); rateIn.add(sent, at: t)
    }
    mutating func consumerReport(t: UInt64, received: UInt64, moving: Bool, epoch: UInt32 = 0, inEpoch: UInt64 = 0) {
        if let c = consumer, t <= c.t { return }
        consumer = (t, received, moving, epoch, inEpoch); rateOut.add(received, at: t)
    }

    /// The current estimate (unfiltered), or nil before both ends reported.
    var estimate: Int64? {
        guard let p = producer else { return nil }
        let backlog = Int64(clamping: p.queued) + Int64(clamping: p.spilled)
        // A producer that spent most of the last second waiting for credit: the lane is full.
        // (Its credit at one report says little: a fast lane runs out and refills many times a
        // second, half a window at a time.)
        if p.moving && blocked.ready && blocked.rate >= 0.5e9 { return bound + backlog }
        guard let c = consumer else { return nil }
        // Until a moving end's rate is known, its count cannot be carried forward: no estimate.
        if (p.moving && !rateIn.ready) || (c.moving && !rateOut.ready) { return nil }
        let at = max(p.t, c.t)
        // Within one epoch when both are in it; across epochs (one end restarted and the other
        // has not heard of it yet), the run's totals.
        let sameEpoch = p.epoch != 0 && p.epoch == c.epoch
        let sent = Double(sameEpoch ? p.inEpoch : p.sent) + (p.moving ? rateIn.rate * Double(at - p.t) / 1e9 : 0)
        let received = Double(sameEpoch ? c.inEpoch : c.received) + (c.moving ? rateOut.rate * Double(at - c.t) / 1e9 : 0)
        let inFlight = Int64(max(0, min(Double(bound), (sent - received).rounded())))
        return inFlight + backlog
    }

    /// Feeds the newest estimate through the median filter and the watermarks; returns the
    /// previous state on a transition.
    mutating func step() -> PressureState? {
        guard let e = estimate else { return nil }
        recent.append(e)
        if recent.count > 3 { recent.removeFirst() }
        guard recent.count == 3 else { return nil }
        depth = recent.sorted()[1]
        return marks.observe(Int(clamping: depth))
    }
}

extension DurationHistogram {
    /// Bucket-wise sum (a restarted runner's histogram on top of its predecessors').
    func adding(_ other: DurationHistogram) -> DurationHistogram {
        if other.isEmpty { return self }
        if isEmpty { return other }
        return DurationHistogram(counts: zip(counts, other.counts).map { $0 &+ $1 }, sumNs: sumNs &+ other.sumNs)
    }
}

extension PipelineHost {
    /// After a STATS frame from `stage`: feeds every lane it touches to its monitor, audits and
    /// logs watermark transitions.
    func observeLanes(of stage: String) {
        if let s = stages[stage]?.stats {
            var r = stageRates[stage] ?? (RateMeter(), RateMeter(), RateMeter())
            r.0.add(s.received, at: s.timeNs); r.1.add(s.emitted, at: s.timeNs); r.2.add(s.busyNs, at: s.timeNs)
            stageRates[stage] = r
        }
        for l in plan.lanes where l.from == stage || l.to == stage {
            guard var m = laneMonitors[l.id] else { continue }
            if l.from == stage, let s = stages[stage]?.stats, let p = s.lanes.first(where: { $0.lane == l.id && $0.role == .producer }) {
                // "Idle" at the instant of a report says nothing about the rate: only an end does.
                let moving = !p.endOfStream && !s.flags.contains(.finished)
                m.producerReport(t: s.timeNs, sent: p.count, queued: UInt64(p.queued), spilled: UInt64(p.spillDepth), credits: p.credits, moving: moving,
                                 epoch: p.epoch, inEpoch: p.countInEpoch)
                m.blocked.add(p.blockedNs, at: s.timeNs)
            }
            if l.to == stage, let s = stages[stage]?.stats, let c = s.lanes.first(where: { $0.lane == l.id && $0.role == .consumer }) {
                let moving = !c.endOfStream && !s.flags.contains(.finished)
                m.consumerReport(t: s.timeNs, received: c.count, moving: moving, epoch: c.epoch, inEpoch: c.countInEpoch)
            }
            if let before = m.step() {
                let after = m.marks.state
                let reason = "lane \(l.id) \(l.fromRef) -> \(l.toRef): \(before.rawValue) -> \(after.rawValue) at depth \(m.depth) " +
                    "(low \(m.marks.low), high \(m.marks.high), release \(m.marks.release), bound \(l.settings.bound))"
                // Every transition is audited; the log gets at most one line per lane per 10 s.
                let now = monotonicNs()
                if now >= m.nextLog {
                    let extra = m.suppressed > 0 ? " (\(m.suppressed) earlier transitions not logged)" : ""
                    if after == .overloaded { log.warning("\(reason)\(extra)") } else { log.info("\(reason)\(extra)") }
                    m.nextLog = now + 10_000_000_000; m.suppressed = 0
                } else {
                    m.suppressed += 1
                }
                writeAudit(AuditRecord(decision: "lane-state", actor: "pipehost", stage: l.to, location: "host:\(getpid())", timeNs: wallNs(),
                                       intent: "lane.backpressure", reason: reason,
                                       details: ["lane": .int(Int64(l.id)), "from": .string(l.fromRef), "to": .string(l.toRef),
                                                 "before": .string(before.rawValue), "after": .string(after.rawValue), "depth": .int(m.depth)]))
            }
            laneMonitors[l.id] = m
        }
    }

    /// Appends one record to the run's audit log (the host's own decisions).
    func writeAudit(_ r: AuditRecord) {
        auditWriter?.submit(r)
        auditCount += 1
    }
}
