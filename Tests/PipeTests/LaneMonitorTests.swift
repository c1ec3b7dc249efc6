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

    /// A count that moves in steps (512 every 1.13 s, reported every 100 ms, as a producer
    /// behind a slow consumer sends half a window per CREDIT) reads its true rate (453/s) at
    /// every sample, not 510/s as over a plain one-second window; when it stops moving, the rate
    /// falls, and reads 0 once nothing moved in the samples kept.
    @Test func rateMeter_measuresAStepwiseCountFromStepToStep() {
        var r = RateMeter()
        var worst = 0.0
        for k in 0..<200 {
            let t = UInt64(k) * 100_000_000 + 37_000_000
            r.add(UInt64(Double(t) / 1_130_000_000) * 512, at: t)
            if k >= 40 { worst = max(worst, abs(r.rate - 453) / 453) }
        }
        #expect(worst < 0.1, "off by \(worst * 100)% at worst")
        var flat = r
        let stop = UInt64(199) * 100_000_000 + 37_000_000
        var v = UInt64(Double(stop) / 1_130_000_000) * 512
        // A smooth 1000/s flow that stops: lower within a second, 0 within 3.5 s.
        var smooth = RateMeter()
        for k in 0...30 { smooth.add(UInt64(k) * 100, at: UInt64(k) * 100_000_000) }
        #expect(abs(smooth.rate - 1000) < 1)
        for k in 31...40 { smooth.add(3000, at: UInt64(k) * 100_000_000) }
        #expect(smooth.rate < 600, "\(smooth.rate)")
        for k in 41...66 { smooth.add(3000, at: UInt64(k) * 100_000_000) }
        #expect(smooth.rate == 0)
        for k in 1...36 { flat.add(v, at: stop + UInt64(k) * 100_000_000) }
        #expect(flat.rate == 0)
        v += 512
        flat.add(v, at: stop + 3_700_000_000)
        #expect(flat.rate == 0 || flat.rate < 453, "one step after a long stop: \(flat.rate)")
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

    /// A consumer worker died with 700 envelopes taken but not reported and 400 more in its queue;
    /// its successor took the lane on in a new epoch. Counted from the start of the run the lane
    /// would read full forever; counted within the epoch both ends report, it reads what is in
    /// flight now, and until the producer has heard of the new epoch, the run's totals.
    @Test func afterAConsumerRestart_depthIsCountedWithinTheEpochBothEndsReport() {
        var m = LaneMonitor(settings: LaneSettings(bound: 1024))
        let rate = 20_000.0, lost = 1_100.0, trueDepth = 30.0
        var states: Set<PressureState> = []
        for k in 0..<40 {
            let tp = UInt64(k) * 100_000_000 + 10_000_000, tc = tp + 50_000_000
            let sent = Double(tp) / 1e9 * rate + trueDepth + lost, received = Double(tc) / 1e9 * rate
            // Epoch 8 began at t = 0 with the successor (the totals include the lost envelopes).
            m.producerReport(t: tp, sent: UInt64(sent), queued: 0, spilled: 0, credits: 900, moving: true, epoch: 8, inEpoch: UInt64(sent - lost))
            _ = m.step()
            m.consumerReport(t: tc, received: UInt64(received), moving: true, epoch: 8, inEpoch: UInt64(received))
            _ = m.step()
            states.insert(m.marks.state)
            if k > 10 { #expect(abs(Double(m.depth) - trueDepth) < 50, "estimate \(m.depth) at step \(k)") }
        }
        #expect(states == [.normal])
        // The producer still in epoch 7 (it has not taken the new CREDIT yet): the totals.
        m.producerReport(t: 5_000_000_000, sent: 200_000, queued: 0, spilled: 0, credits: 0, moving: false, epoch: 7, inEpoch: 90_000)
        m.consumerReport(t: 5_000_000_001, received: 198_500, moving: false, epoch: 8, inEpoch: 2_000)
        #expect(m.estimate == 1024)
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
