import Glibc

/// Monotonic nanoseconds.
@inline(__always) public func monotonicNs() -> UInt64 {
    var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
/// Wall-clock nanoseconds since the Unix epoch.
@inline(__always) public func wallNs() -> UInt64 {
    var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
/// Monotonic nanoseconds at the kernel tick's resolution (a few ms), for cheap per-envelope checks.
@inline(__always) public func coarseMonotonicNs() -> UInt64 {
    var ts = timespec(); clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
