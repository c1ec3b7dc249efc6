/// The four backpressure states (CONCEPTS.md, "backpressure watermarks").
public enum PressureState: String, Sendable, Hashable, CaseIterable {
    case normal
    case pressureRising = "pressure-rising"
    case overloaded
    case recovering

    /// A small integer for metrics (`0` normal ... `3` recovering).
    public var code: Int { PressureState.allCases.firstIndex(of: self) ?? 0 }
}

/// Watermarks with real hysteresis: once overloaded, a depth leaves `overloaded` only below the
/// release mark, then stays `recovering` until it falls below low (-> normal) or reaches high
/// again (-> overloaded). With low 2, high 6 and release 4, depths 6, 5, 6, 5 stay overloaded.
public struct Watermarks: Sendable, Hashable {
    public let low: Int
    public let high: Int
    public let release: Int
    public private(set) var state: PressureState = .normal

    /// `release` defaults to midway between low and high.
    public init(low: Int, high: Int, release: Int? = nil) {
        self.low = low; self.high = high; self.release = release ?? (low + high + 1) / 2
    }

    /// Feeds one depth observation; returns the previous state when the state changed.
    @discardableResult
    public mutating func observe(_ depth: Int) -> PressureState? {
        let before = state
        switch state {
        case .normal, .pressureRising:
            state = depth >= high ? .overloaded : depth >= low ? .pressureRising : .normal
        case .overloaded:
            if depth < release { state = depth < low ? .normal : .recovering }
        case .recovering:
            if depth >= high { state = .overloaded } else if depth < low { state = .normal }
        }
        return state == before ? nil : before
    }
}

/// A latency histogram with power-of-two microsecond buckets: bucket 0 holds values up to 1 us,
/// bucket i values in (2^(i-1), 2^i] us, the last bucket everything above 2^(n-2) us. Counts are
/// cumulative since the start of the runner; the bounds are fixed, so histograms from different
/// runners add up bucket by bucket.
public struct DurationHistogram: Sendable, Hashable {
    public static let bucketCount = 28
    /// Upper bound of bucket `i` in seconds (`+Inf` for the last).
    public static func upperBound(_ i: Int) -> Double {
        i >= bucketCount - 1 ? .infinity : Double(UInt64(1) << UInt64(i)) / 1e6
    }

    public private(set) var counts: [UInt64]
    public private(set) var sumNs: UInt64 = 0
    public init() { counts = [] }
    public init(counts: [UInt64], sumNs: UInt64) { self.counts = counts; self.sumNs = sumNs }

    public var total: UInt64 { counts.reduce(0, &+) }
    public var isEmpty: Bool { counts.isEmpty }

    /// Records `n` observations of `ns` nanoseconds.
    @inline(__always) public mutating func record(ns: UInt64, count n: UInt64 = 1) {
        if counts.isEmpty { counts = Array(repeating: 0, count: Self.bucketCount) }
        let us = (ns + 999) / 1000
        let i = us <= 1 ? 0 : min(Self.bucketCount - 1, 64 - (us - 1).leadingZeroBitCount)
        counts[i] &+= n
        sumNs &+= ns &* n
    }

    /// The `q` quantile (0...1) in microseconds, interpolated inside its bucket; nil when empty.
    public func quantileMicros(_ q: Double) -> Double? {
        let n = total
        guard n > 0 else { return nil }
        let rank = max(1, (q * Double(n)).rounded(.up))
        var seen: UInt64 = 0
        for (i, c) in counts.enumerated() where c > 0 {
            if Double(seen + c) >= rank {
                let lo = i == 0 ? 0 : Double(UInt64(1) << UInt64(i - 1))
                let hi = i >= Self.bucketCount - 1 ? lo * 2 : Double(UInt64(1) << UInt64(i))
                return lo + (hi - lo) * (rank - Double(seen)) / Double(c)
            }
            seen += c
        }
        return nil
    }
}
