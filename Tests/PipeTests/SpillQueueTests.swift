import Testing
import Foundation
@testable import PipeRuntime

/// The `when_full: spill` queue on its own (real SQLite files in a temp directory).
@Suite("Spill queue")
struct SpillQueueTests {
    func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }
    func texts(_ rows: [SpillQueue.Row]) -> [String] { rows.map { String(decoding: $0.bytes, as: UTF8.self) } }

    @Test func untracked_deletesRowsAsTheyAreRead_andReadsBufferedOnesWithoutWriting() throws {
        let path = Paths.tempDir("spillq-untracked") + "/q.sqlite"
        let q = try SpillQueue(path: path)
        for s in ["a", "b", "c"] { q.append(bytes(s)) }
        #expect(q.commit() == nil)
        q.append(bytes("d"))
        #expect(texts(try q.take(2)) == ["a", "b"])
        #expect(q.count == 2)
        let reopened = try SpillQueue(path: path)
        #expect(reopened.count == 1)                         // "d" was never written: only "c"
        #expect(texts(try q.take(5)) == ["c"])
        #expect(texts(try q.take(5)) == ["d"])
        #expect(q.isEmpty)
    }

    @Test func tracked_keepsARowReadBackUntilItIsDone_andAReopenReplaysWhatIsLeft() throws {
        let path = Paths.tempDir("spillq-tracked") + "/q.sqlite"
        let q = try SpillQueue(path: path, tracked: true)
        for s in ["a", "b", "c"] { q.append(bytes(s)) }
        // Buffered rows are written before they are read back (a read-back row must be on disk).
        let first = try q.take(2)
        #expect(texts(first) == ["a", "b"] && first.allSatisfy { !$0.replay })
        #expect(q.count == 1 && q.held == 2)
        #expect(texts(try q.take(5)) == ["c"])
        #expect(q.isEmpty && q.held == 3)
        q.done(first[0].seq)
        #expect(q.commit() == nil)
        #expect(q.held == 2)
        // A crash now: "b" and "c" were read back but never acknowledged. They are read again,
        // marked as replays (an earlier run may have delivered them); what is spilled later is not.
        let again = try SpillQueue(path: path, tracked: true)
        #expect(again.count == 2)
        again.append(bytes("e"))
        let rows = try again.take(10)
        #expect(texts(rows) == ["b", "c"] && rows.allSatisfy(\.replay))
        let later = try again.take(10)
        #expect(texts(later) == ["e"] && !later[0].replay)
        for r in rows + later { again.done(r.seq) }
        #expect(again.commit() == nil)
        #expect(try SpillQueue(path: path, tracked: true).isEmpty)
    }
}
