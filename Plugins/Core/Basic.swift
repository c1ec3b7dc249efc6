import PipeKit
import Foundation

/// `passthrough`: forwards every envelope unchanged (same id) to `out`.
public final class PassthroughStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "passthrough", summary: "Forwards every envelope unchanged.", role: .transform,
        inputs: [InputPort("in", doc: "envelopes to forward", acceptsLoopBack: true)],
        fields: [ConfigField("delay_us", .int(min: 0, max: 10_000_000), default: .int(0),
                             doc: "Sleep this long per envelope (to simulate a slow stage in backpressure tests and demos).")],
        make: { PassthroughStage(delayUs: UInt32(clamping: $0.int("delay_us") ?? 0)) })
    var out = OutputHandle(index: 0, name: "out")
    let delayUs: UInt32
    init(delayUs: UInt32 = 0) { self.delayUs = delayUs }
    public func start(context: any StageContext) throws { out = try context.output("out") }
    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        if delayUs > 0 { usleep(delayUs) }
        context.emit(envelope, to: out)
    }
}

/// `hop`: forwards every envelope to `out`, and while its `hops` is below `times`, also emits a
/// derived follow-up with `hops + 1` to `again` (to be looped back with a hop limit).
public final class HopStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "hop", summary: "Forwards to `out` and emits a derived follow-up (hops + 1) to `again` while hops < times; for loop-backs.",
        role: .transform,
        inputs: [InputPort("in", doc: "envelopes, including follow-ups looped back from `again`", acceptsLoopBack: true)],
        outputs: { _ in ["out", "again"] }, outputsDoc: "out, again",
        fields: [ConfigField("times", .int(min: 0, max: 1_000_000), default: .int(1), doc: "Follow-ups per root envelope: one each time while hops < times.")],
        make: { HopStage(times: UInt32($0.int("times") ?? 1)) })
    let times: UInt32
    var out = OutputHandle(index: 0, name: "out"), again = OutputHandle(index: 1, name: "again")
    init(times: UInt32) { self.times = times }
    public func start(context: any StageContext) throws { out = try context.output("out"); again = try context.output("again") }
    public func process(_ envelope: Envelope, from arrival: Arrival, context: any StageContext) throws {
        context.emit(envelope, to: out)
        if envelope.hops < times {
            var f = envelope.derived(output: "again", index: 0)
            f.hops += 1
            context.emit(f, to: again)
        }
    }
}

/// `null-sink`: counts and discards, reporting end-to-end latency percentiles (wall clock now
/// minus `ingest_ns`); `delay_us` makes it deliberately slow (backpressure demos and tests).
public final class NullSinkStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "null-sink", summary: "Discards envelopes, counting them and reporting ingest-to-sink latency (p50/p99/max); optionally slow.",
        role: .sink,
        inputs: [InputPort("in", doc: "envelopes to discard")],
        fields: [ConfigField("delay_us", .int(min: 0, max: 10_000_000), default: .int(0), doc: "Sleep this long per envelope (a deliberately slow sink).")],
        make: { NullSinkStage(delayUs: UInt32($0.int("delay_us") ?? 0)) })
    let delayUs: UInt32
    var n: Int64 = 0
    var latency = LatencyHistogram()
    init(delayUs: UInt32) { self.delayUs = delayUs }
    /// Nothing is kept, so a redelivered envelope costs nothing: no durable window.
    public func deliveredIDs(limit: Int, context: any StageContext) throws -> [EnvelopeID]? { [] }
    public func process(_ envelope: Envelope, from arrival: Arrival, context: any StageContext) throws {
        n += 1
        if envelope.ingestNs > 0 {
            let now = context.wallClockNs
            latency.record(now > envelope.ingestNs ? now - envelope.ingestNs : 0)
        }
        if delayUs > 0 { usleep(delayUs) }
    }
    public var tickInterval: UInt64? { 1_000_000_000 }
    public func tick(context: any StageContext) throws { report(context) }
    public func drain(context: any StageContext) throws { report(context) }
    func report(_ context: any StageContext) {
        context.report("discarded", .int(n))
        if latency.count > 0 {
            context.report("latency_p50_us", .double(Double(latency.percentile(0.50)) / 1000))
            context.report("latency_p99_us", .double(Double(latency.percentile(0.99)) / 1000))
            context.report("latency_max_us", .double(Double(latency.max) / 1000))
        }
    }
}

/// A log-linear latency histogram (about 3% resolution, 1 ns to ~18 min), constant memory.
public struct LatencyHistogram: Sendable {
    // 64 power-of-two ranges x 32 linear sub-buckets.
    var buckets = [UInt64](repeating: 0, count: 64 * 32)
    public private(set) var count: UInt64 = 0
    public private(set) var max: UInt64 = 0
    public init() {}
    static func index(_ v: UInt64) -> Int {
        if v < 32 { return Int(v) }
        let e = 63 - v.leadingZeroBitCount        // >= 5
        let sub = Int((v >> UInt64(e - 5)) & 31)
        return (e - 4) * 32 + sub
    }
    static func lowerBound(_ i: Int) -> UInt64 {
        if i < 32 { return UInt64(i) }
        let e = i / 32 + 4, sub = UInt64(i % 32)
        return (UInt64(1) << UInt64(e)) | (sub << UInt64(e - 5))
    }
    public mutating func record(_ v: UInt64) {
        buckets[Swift.min(Self.index(v), buckets.count - 1)] += 1
        count += 1
        if v > max { max = v }
    }
    /// The smallest recorded bucket value at or above quantile `q`.
    public func percentile(_ q: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        let target = UInt64((Double(count) * q).rounded(.up))
        var seen: UInt64 = 0
        for (i, c) in buckets.enumerated() where c > 0 {
            seen += c
            if seen >= target { return Swift.min(Self.lowerBound(i + 1), max) }
        }
        return max
    }
}
