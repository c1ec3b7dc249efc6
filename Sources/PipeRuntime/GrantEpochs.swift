import PipeStore

/// The highest grant epoch seen per worker key, in SQLite, so that a replayed older grant is
/// refused also after the host restarts. Bounded: past `limit` workers, those heard from least
/// recently are forgotten first, revoked keys last (a revoked key never registers again, so
/// by age alone it would go first and reopen its replay window; docs/operations.md, "Grants").
final class GrantEpochs {
    let db: Database
    let get: Statement, put: Statement, count: Statement, trim: Statement
    let limit: Int

    init(path: String, limit: Int = 10_000) throws(StoreError) {
        db = try Database(path: path)
        // FULL: a raised watermark must be on disk before the registration it refuses later.
        try db.execute("PRAGMA synchronous=FULL")
        try db.execute("CREATE TABLE IF NOT EXISTS grant_epochs (worker_key TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seen_s INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0)")
        get = try db.prepare("SELECT epoch FROM grant_epochs WHERE worker_key = ?")
        put = try db.prepare("""
            INSERT INTO grant_epochs (worker_key, epoch, seen_s, revoked) VALUES (?, ?, ?, ?)
            ON CONFLICT(worker_key) DO UPDATE SET revoked = CASE WHEN excluded.epoch >= epoch THEN excluded.revoked ELSE revoked END,
                                                  epoch = max(epoch, excluded.epoch), seen_s = excluded.seen_s
            """)
        count = try db.prepare("SELECT count(*) FROM grant_epochs")
        trim = try db.prepare("DELETE FROM grant_epochs WHERE worker_key IN (SELECT worker_key FROM grant_epochs ORDER BY revoked, seen_s LIMIT ?)")
        self.limit = limit
    }

    func highest(_ key: String) throws(StoreError) -> UInt64? {
        try get.bind([.text(key)])
        defer { get.reset() }
        return try get.step() ? UInt64(max(0, get.int(0))) : nil
    }

    /// Records `epoch` for `key` (never lowering it).
    func raise(_ key: String, to epoch: UInt64, nowS: Int64, revoked: Bool = false) throws(StoreError) {
        try put.run([.text(key), .int(Int64(clamping: epoch)), .int(nowS), .int(revoked ? 1 : 0)])
        try count.bind([])
        let n = try count.step() ? Int(count.int(0)) : 0
        count.reset()
        if n > limit { try trim.run([.int(Int64(n - limit))]) }
    }
}
