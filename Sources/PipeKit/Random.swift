/// SplitMix64: a small, well-known seeded generator, so seeded sources give the same ids and the
/// same data on every run and every placement.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// A source's pacing: `count` items (0 = endless) at `rate` per second (0 = as fast as allowed),
/// measured from the first call on the stage clock.
public struct SourcePacer: Sendable {
    public let count: UInt64
    public let rate: Double
    public private(set) var done: UInt64 = 0
    var startNs: UInt64?

    public init(count: UInt64, rate: Double) { self.count = count; self.rate = rate }

    public var finished: Bool { count > 0 && done >= count }

    /// How many items may go now (at most `budget`), or nil with how long to wait when none is due.
    public mutating func allowance(now: UInt64, budget: Int) -> (allowed: Int, waitNs: UInt64) {
        var allowed = budget
        if rate > 0 {
            if startNs == nil { startNs = now }
            let due = UInt64(Double(now - (startNs ?? now)) / 1e9 * rate) + 1 + resumedAt
            if due <= done { return (0, UInt64(min(1e9 / rate, 1e10))) }
            allowed = min(allowed, Int(due - done))
        }
        if count > 0 { allowed = min(allowed, Int(count - done)) }
        return (max(0, allowed), 0)
    }

    /// Records `n` items sent.
    public mutating func sent(_ n: Int = 1) { done += UInt64(n) }
    /// Goes on after `done` items (a resumed durable source); a rate counts from the next call.
    public mutating func resume(done d: UInt64) { done = d; resumedAt = d; startNs = nil }
    var resumedAt: UInt64 = 0
}
