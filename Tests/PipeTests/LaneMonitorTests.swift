import Testing
import PipeConfig
import PipeKit
@testable import PipeRuntime

@Suite("Lane depth estimate and states")
struct LaneMonitorTests {
    @Test func rateMeter_measuresASteadyRate() {
        var r = RateMeter()
        for i in 0...30 { r.add(UInt64(i) * 15_000, at: UInt64(i) * 100_000_000) }   // 150k/s in 100 ms steps
        #expect(abs(r.rate - 150_000) < 1)
        #expect(r.ready)
        var young = RateMeter()
        young.add(0, at: 0); young.add(100, at: 100_000_000)
        #expect(!young.ready)
    }

    /// Reports of a fast, healthy lane come 40-90 ms apart: carried forward at each end's rate,
    /// the depth stays near its true value and the state stays normal.
    @Test func healthyFastLane_staysNormal_despiteSkewedReports() {
        var m = LaneMonitor(settings: LaneSettings(bound: 1024))
        let rate = 150_000.0, trueDepth = 100.0
        var states: Set<PressureState> = []
        for k in 0..<60 {
            let tp = UInt64(k) * 100_000_000 + 10_000_000
            let tc = tp + UInt64(40 + (k * 7) % 50) * 1_000_000   // the consumer reports 40-90 ms later
            m.producerReport(t: tp, sent: UInt64(Double(tp) / 1e9 * rate + trueDepth), queued: 0, spilled: 0, credits: 500, moving: true)
            _ = m.step()
            m.consumerReport(t: tc, received: UInt64(Double(tc) / 1e9 * rate), moving: true)
            _ = m.step()
            states.insert(m.marks.state)
            if k > 10 { #expect(abs(Double(m.depth) - trueDepth) < 50, "estimate \(m.depth) at step \(k)") }
        }
        #expect(states == [.normal])
    }

    /// A producer blocked most of the time with a backlog: the lane is full, whatever one pair of
    /// counts says.
    @Test func blockedProducer_meansAFullLane() {
        var m = LaneMonitor(settings: LaneSettings(bound: 64))
        for k in 0..<20 {
            let t = UInt64(k) * 100_000_000
            m.producerReport(t: t, sent: UInt64(k) * 2, queued: 10, spilled: 500, credits: 0, moving: true)
            m.blocked.add(t * 95 / 100, at: t)      // blocked 95% of the time
            m.consumerReport(t: t + 1, received: UInt64(k) * 2, moving: true)
            _ = m.step()
        }
        #expect(m.depth == 64 + 10 + 500)
        #expect(m.marks.state == .overloaded)
    }

    /// Until the rates are known (half a second of reports) there is no estimate, so a start-up
    /// pair of skewed counts cannot flip the state.
    @Test func noEstimate_beforeRatesAreKnown() {
        var m = LaneMonitor(settings: LaneSettings(bound: 1024))
        m.producerReport(t: 100_000_000, sent: 30_000, queued: 0, spilled: 0, credits: 100, moving: true)
        m.consumerReport(t: 10_000_000, received: 1_000, moving: true)
        #expect(m.estimate == nil)
        #expect(m.step() == nil && m.marks.state == .normal)
    }
}
