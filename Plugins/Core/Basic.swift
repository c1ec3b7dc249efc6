import PipeKit
import Foundation

/// `passthrough`: forwards every envelope unchanged (same id) to `out`.
public final class PassthroughStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "passthrough", summary: "Forwards every envelope unchanged.", role: .transform,
        inputs: [InputPort("in", doc: "envelopes to forward", acceptsLoopBack: true)],
        make: { _ in PassthroughStage() })
    var out = OutputHandle(index: 0, name: "out")
    public func start(context: any StageContext) throws { out = try context.output("out") }
    public func process(_ envelope: Envelope, from arrival: Arrival, context: any StageContext) throws {
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

/// `null-sink`: counts and discards; `delay_us` makes it deliberately slow (backpressure demos and tests).
public final class NullSinkStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "null-sink", summary: "Discards envelopes (counting them); optionally slow, to show backpressure.", role: .sink,
        inputs: [InputPort("in", doc: "envelopes to discard")],
        fields: [ConfigField("delay_us", .int(min: 0, max: 10_000_000), default: .int(0), doc: "Sleep this long per envelope (a deliberately slow sink).")],
        make: { NullSinkStage(delayUs: UInt32($0.int("delay_us") ?? 0)) })
    let delayUs: UInt32
    var n: Int64 = 0
    init(delayUs: UInt32) { self.delayUs = delayUs }
    public func process(_ envelope: Envelope, from arrival: Arrival, context: any StageContext) throws {
        n += 1
        if delayUs > 0 { usleep(delayUs) }
    }
    public func drain(context: any StageContext) throws { context.report("discarded", .int(n)) }
}
