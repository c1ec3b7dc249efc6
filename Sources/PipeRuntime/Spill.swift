import Foundation
import PipeKit
import PipeStore

/// A lane's `when_full: spill` queue: an ordered, SQLite-backed FIFO of encoded envelopes in the
/// run directory (`spill/<producer>.<output>--<consumer>.<port>.sqlite`, WAL). While it holds
/// anything, every new envelope for the lane joins it, so order is kept; the producer refills
/// the lane from its head as credits return. What is on disk survives a restart of the host with
/// the same run directory and is sent first.
///
/// Writes are buffered for one runner loop pass and committed in one transaction (`commit`),
/// so a crash can lose at most that pass. Under at-least-once delivery a spilled envelope counts
/// as delivered once committed here (the spilling stage takes it over), and the queue is
/// `tracked`: a row read back stays on disk until its copy is acknowledged (`done`), so a
/// consumer that restarts, a lost frame or a crash of this process loses nothing: the runner
/// sends the copy again, and rows left by an earlier run are read back as redeliveries
/// (docs/delivery.md). Untracked (at-most-once), a row is deleted as it is read.
final class SpillQueue {
    /// One row read back: its seq (for `done`), its bytes, and whether an earlier run of this
    /// run directory may already have delivered it (then it goes as a redelivery).
    struct Row { var seq: Int64; var bytes: [UInt8]; var replay: Bool }

    private let db: Database
    private let insert: Statement
    private let head: Statement
    private let remove: Statement
    private let removeOne: Statement
    private var pending: [[UInt8]] = []
    /// Rows on disk (committed) not yet read back, not counting `pending`.
    private(set) var stored: Int = 0
    /// Envelopes written to this queue by this runner (pending included).
    private(set) var written: UInt64 = 0
    let tracked: Bool
    /// Tracked: the highest seq read back (rows after it are unread).
    private var cursor: Int64 = 0
    /// Tracked: rows up to this seq were on disk when the queue was opened.
    private var replayThrough: Int64 = 0
    /// Tracked: rows read back whose copies are done (acknowledged, dead-lettered, or corrupt),
    /// deleted at the next commit.
    private var finished: [Int64] = []
    /// Tracked: rows read back and not yet done.
    private(set) var held = 0

    init(path: String, tracked: Bool = false) throws(StoreError) {
        self.tracked = tracked
        db = try Database(path: path)
        chmod(path, 0o600)
        try db.execute("CREATE TABLE IF NOT EXISTS spill (seq INTEGER PRIMARY KEY AUTOINCREMENT, envelope BLOB NOT NULL)")
        insert = try db.prepare("INSERT INTO spill (envelope) VALUES (?)")
        head = try db.prepare("SELECT seq, envelope FROM spill WHERE seq > ? ORDER BY seq LIMIT ?")
        remove = try db.prepare("DELETE FROM spill WHERE seq <= ?")
        removeOne = try db.prepare("DELETE FROM spill WHERE seq = ?")
        let count = try db.prepare("SELECT count(*), coalesce(max(seq), 0) FROM spill")
        try count.bind([])
        if try count.step() { stored = Int(count.int(0)); replayThrough = count.int(1) }
    }

    var count: Int { stored + pending.count }
    var isEmpty: Bool { count == 0 }

    /// Tracked: the copy of row `seq` is done with; its row goes at the next commit.
    func done(_ seq: Int64) {
        guard tracked else { return }
        finished.append(seq)
        held -= 1
    }

    func append(_ encoded: [UInt8]) {
        pending.append(encoded)
        written &+= 1
    }

    /// Writes the buffered envelopes in one transaction. On failure (disk full, permissions) they
    /// stay buffered and the error is returned; the caller falls back to holding the lane.
    func commit() -> StoreError? {
        guard !pending.isEmpty || !finished.isEmpty else { return nil }
        do {
            try db.execute("BEGIN IMMEDIATE")
            for e in pending { try insert.run([.blob(e)]) }
            for seq in finished { try removeOne.run([.int(seq)]) }
            try db.execute("COMMIT")
            stored += pending.count
            pending.removeAll(keepingCapacity: true)
            finished.removeAll(keepingCapacity: true)
            return nil
        } catch {
            try? db.execute("ROLLBACK")
            return error
        }
    }

    /// Whether some envelopes are only buffered, not yet written.
    var hasPending: Bool { !pending.isEmpty }

    /// Takes up to `n` envelopes from the head, in order: rows on disk first (they are older than
    /// anything buffered), then, when the disk holds none, the buffered ones without writing them.
    /// Tracked, the buffered ones are written first: a row read back stays on disk until `done`.
    func take(_ n: Int) throws(StoreError) -> [Row] {
        guard n > 0 else { return [] }
        if stored == 0 {
            if !tracked {
                let k = min(n, pending.count)
                let out = pending.prefix(k).map { Row(seq: 0, bytes: $0, replay: false) }
                pending.removeFirst(k)
                return out
            }
            if let e = commit() { throw e }
            if stored == 0 { return [] }
        }
        try head.bind([.int(tracked ? cursor : 0), .int(Int64(n))])
        var out: [Row] = []
        while try head.step() {
            let seq = head.int(0)
            out.append(Row(seq: seq, bytes: head.blob(1), replay: seq <= replayThrough))
        }
        guard let last = out.last?.seq else { return [] }
        if tracked { cursor = last; held += out.count } else { try remove.run([.int(last)]) }
        stored -= out.count
        return out
    }
}
