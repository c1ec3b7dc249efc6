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
/// so a crash can lose at most that pass; envelopes read back into the lane are in memory like
/// any other in-flight envelope. Under at-least-once delivery a spilled envelope counts as
/// delivered once committed here; what is read back is sent untracked (docs/delivery.md).
final class SpillQueue {
    private let db: Database
    private let insert: Statement
    private let head: Statement
    private let remove: Statement
    private var pending: [[UInt8]] = []
    /// Rows on disk (committed), not counting `pending`.
    private(set) var stored: Int = 0
    /// Envelopes written to this queue by this runner (pending included).
    private(set) var written: UInt64 = 0

    init(path: String) throws(StoreError) {
        db = try Database(path: path)
        chmod(path, 0o600)
        try db.execute("CREATE TABLE IF NOT EXISTS spill (seq INTEGER PRIMARY KEY AUTOINCREMENT, envelope BLOB NOT NULL)")
        insert = try db.prepare("INSERT INTO spill (envelope) VALUES (?)")
        head = try db.prepare("SELECT seq, envelope FROM spill ORDER BY seq LIMIT ?")
        remove = try db.prepare("DELETE FROM spill WHERE seq <= ?")
        let count = try db.prepare("SELECT count(*) FROM spill")
        try count.bind([])
        if try count.step() { stored = Int(count.int(0)) }
    }

    var count: Int { stored + pending.count }
    var isEmpty: Bool { count == 0 }

    func append(_ encoded: [UInt8]) {
        pending.append(encoded)
        written &+= 1
    }

    /// Writes the buffered envelopes in one transaction. On failure (disk full, permissions) they
    /// stay buffered and the error is returned; the caller falls back to holding the lane.
    func commit() -> StoreError? {
        guard !pending.isEmpty else { return nil }
        do {
            try db.execute("BEGIN IMMEDIATE")
            for e in pending { try insert.run([.blob(e)]) }
            try db.execute("COMMIT")
            stored += pending.count
            pending.removeAll(keepingCapacity: true)
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
    func take(_ n: Int) throws(StoreError) -> [[UInt8]] {
        if stored == 0 {
            let k = min(n, pending.count)
            let out = Array(pending.prefix(k))
            pending.removeFirst(k)
            return out
        }
        guard n > 0 else { return [] }
        try head.bind([.int(Int64(n))])
        var out: [[UInt8]] = []
        var last: Int64 = 0
        while try head.step() { last = head.int(0); out.append(head.blob(1)) }
        if !out.isEmpty { try remove.run([.int(last)]); stored -= out.count }
        return out
    }
}
