import Testing
import PipeKit
import PipeKitTesting
import CoreStages

@Suite("Built-in stages in the embedded harness")
struct HarnessTests {
    @Test func generator_withSeed_givesTheSameIDsEveryRun() throws {
        func ids() throws -> [EnvelopeID] {
            let h = try StageHarness(GeneratorStage.descriptor, config: .object([("count", .int(5)), ("seed", .int(42))]))
            #expect(try h.produce() == .exhausted)
            let out = h.take().map(\.id)
            #expect(try h.finish().isEmpty)
            return out
        }
        let a = try ids(), b = try ids()
        #expect(a.count == 5 && a == b && Set(a).count == 5)
    }

    @Test func generator_template_and_rate() throws {
        let h = try StageHarness(GeneratorStage.descriptor, config: .object([("count", .int(0)), ("rate", .double(10)), ("payload", .string("n={n}"))]))
        // At 10/s, one envelope is due at t=0, then one more per 100 ms of the manual clock.
        if case .idle = try h.produce(maxCalls: 5) {} else { Issue.record("expected idle while rate-limited") }
        #expect(h.take().map { String(decoding: $0.payload, as: UTF8.self) } == ["n=1"])
        try h.advance(byMs: 250)
        _ = try h.produce(maxCalls: 5)
        #expect(h.take().map { String(decoding: $0.payload, as: UTF8.self) } == ["n=2", "n=3"])
    }

    @Test func hop_emitsDerivedFollowUpsUntilTimes() throws {
        let h = try StageHarness(HopStage.descriptor, config: .object([("times", .int(2))]))
        let root = Envelope(id: EnvelopeID(hi: 1, lo: 1), actor: "a", intent: "i")
        try h.feed(root)
        let f1 = try #require(h.take("again").first)
        #expect(f1.hops == 1 && f1.parent == root.id && f1.id == .derived(from: root.id, output: "again", index: 0))
        try h.feed(f1, loopBack: true)
        let f2 = try #require(h.take("again").first)
        try h.feed(f2, loopBack: true)
        #expect(h.take("again").isEmpty)
        #expect(h.take("out").map(\.hops) == [0, 1, 2])
        #expect(try h.finish().isEmpty)
    }

    @Test func harness_reportsLeftovers() throws {
        let h = try StageHarness(PassthroughStage.descriptor)
        try h.feed(Envelope())
        let left = try h.finish()
        #expect(!left.isEmpty)
        #expect(left.outputs["out"] == 1)
    }

    @Test func chain_runsGeneratorOutputThroughStages() throws {
        let chain = ChainHarness([try StageHarness(PassthroughStage.descriptor, stageID: "a"),
                                  try StageHarness(HopStage.descriptor, config: .object([("times", .int(0))]), stageID: "b")])
        for i in 0..<3 { try chain.feed(Envelope(id: EnvelopeID(hi: 0, lo: UInt64(i)))) }
        #expect(chain.take().map(\.id.lo) == [0, 1, 2])
        #expect(try chain.finish().isEmpty)
    }

    @Test func harness_rejectsBadConfig() {
        #expect(throws: StageError.self) { try StageHarness(GeneratorStage.descriptor, config: .object([("count", .string("x"))])) }
        #expect(throws: StageError.self) { try StageHarness(GeneratorStage.descriptor, config: .object([("colour", .int(1))])) }
    }
}

@Suite("Latency histogram")
struct LatencyHistogramTests {
    @Test func percentiles_areWithinBucketResolution() {
        var h = LatencyHistogram()
        for v in 1...10_000 { h.record(UInt64(v) * 1000) }  // 1 us .. 10 ms uniformly
        let p50 = Double(h.percentile(0.5)), p99 = Double(h.percentile(0.99))
        #expect(abs(p50 - 5_000_000) / 5_000_000 < 0.04)
        #expect(abs(p99 - 9_900_000) / 9_900_000 < 0.04)
        #expect(h.max == 10_000_000)
        #expect(h.percentile(1.0) == 10_000_000)
    }

    @Test func nullSink_reportsLatencyFromIngestTime() throws {
        let h = try StageHarness(NullSinkStage.descriptor)
        var e = Envelope(); e.ingestNs = h.wallClockNs - 2_000_000  // 2 ms ago
        try h.feed(e)
        _ = try h.finish()
        let p99 = h.statusReport["latency_p99_us"]?.doubleValue ?? 0
        #expect(p99 >= 1900 && p99 <= 2100)
        #expect(h.statusReport["discarded"] == .int(1))
    }
}
