import Testing
import Foundation
import PipeKit

@Suite("Random envelope ids")
struct RandomPoolTests {
    /// Ids drawn from several threads at once, across many refills of the pool (256 ids each), are
    /// all different, and their bits are balanced as random bits are (a stuck or repeated buffer,
    /// or a refill that left zeros, would show).
    @Test func idsFromManyThreads_areDistinct_andLookRandom() async throws {
        let perTask = 5_000, tasks = 4
        let all = await withTaskGroup(of: [EnvelopeID].self) { g in
            for _ in 0..<tasks { g.addTask { (0..<perTask).map { _ in EnvelopeID.random() } } }
            var out: [EnvelopeID] = []
            for await ids in g { out += ids }
            return out
        }
        #expect(all.count == perTask * tasks)
        #expect(Set(all).count == all.count)
        let ones = all.reduce(0) { $0 + $1.hi.nonzeroBitCount + $1.lo.nonzeroBitCount }
        let mean = Double(ones) / Double(all.count)
        // 128 fair bits: mean 64, standard deviation of the mean 5.66 / sqrt(20,000) = 0.04.
        #expect(abs(mean - 64) < 0.5, "mean set bits per id \(mean)")
        #expect(!all.contains { $0.hi == 0 || $0.lo == 0 })
    }
}
