import CSQLite
import Glibc
import PipeKit

/// A SQLite error with the database's message.
public struct StoreError: Error, Sendable, CustomStringConvertible {
    public let code: Int32
    public let message: String
    public var description: String { "sqlite error \(code): \(message)" }
}

private let transient = unsafeBitCast(-1, to: sqlite3_destructor_type.self)

/// One SQLite connection. Threading rule: used by one thread at a time (the owning stage's).
public final class Database: @unchecked Sendable {
    // @unchecked: a connection is confined to its owner's thread (SQLITE_OPEN_NOMUTEX).
    let db: OpaquePointer
    public let path: String

    /// Opens (creating) the database at `path` in WAL mode; `readOnly` opens an existing one
    /// without changing it (no journal-mode switch, no creation). `pageSize` applies to a new file.
    public init(path: String, readOnly: Bool = false, pageSize: Int? = nil) throws(StoreError) {
        var h: OpaquePointer?
        let flags = readOnly ? SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX
        let rc = sqlite3_open_v2(path, &h, flags, nil)
        guard rc == SQLITE_OK, let h else {
            let msg = h.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot open"
            if let h { sqlite3_close(h) }
            throw StoreError(code: rc, message: "\(path): \(msg)")
        }
        db = h; self.path = path
        sqlite3_busy_timeout(db, 5000)
        if readOnly { return }
        if let pageSize { try execute("PRAGMA page_size=\(pageSize)") }
        try execute("PRAGMA journal_mode=WAL")
        try execute("PRAGMA synchronous=NORMAL")
    }

    /// SQLite result codes callers tell apart.
    public static let full: Int32 = SQLITE_FULL, corrupt: Int32 = SQLITE_CORRUPT, notADatabase: Int32 = SQLITE_NOTADB

    /// Copies the whole database to a new file at `dest` with SQLite's online backup API: a
    /// consistent snapshot even while another connection keeps writing.
    public func backup(to dest: String) throws(StoreError) {
        var h: OpaquePointer?
        let rc = sqlite3_open_v2(dest, &h, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, nil)
        guard rc == SQLITE_OK, let h else {
            let msg = h.map { String(cString: sqlite3_errmsg($0)) } ?? "cannot open"
            if let h { sqlite3_close(h) }
            throw StoreError(code: rc, message: "\(dest): \(msg)")
        }
        defer { sqlite3_close(h) }
        guard let b = sqlite3_backup_init(h, "main", db, "main") else {
            throw StoreError(code: sqlite3_errcode(h), message: "\(dest): \(String(cString: sqlite3_errmsg(h)))")
        }
        var step: Int32
        repeat {
            step = sqlite3_backup_step(b, -1)
            if step == SQLITE_BUSY || step == SQLITE_LOCKED { sqlite3_sleep(10) }
        } while step == SQLITE_OK || step == SQLITE_BUSY || step == SQLITE_LOCKED
        let fin = sqlite3_backup_finish(b)
        if step != SQLITE_DONE || fin != SQLITE_OK {
            throw StoreError(code: step == SQLITE_DONE ? fin : step, message: "\(dest): backup failed: \(String(cString: sqlite3_errmsg(h)))")
        }
    }

    deinit { sqlite3_close_v2(db) }

    func error(_ rc: Int32) -> StoreError { StoreError(code: rc, message: String(cString: sqlite3_errmsg(db))) }

    public func execute(_ sql: String) throws(StoreError) {
        var err: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(db, sql, nil, nil, &err)
        if rc != SQLITE_OK {
            let m = err.map { String(cString: $0) } ?? "error"
            sqlite3_free(err)
            throw StoreError(code: rc, message: m)
        }
    }

    /// The rowid of the last row this connection inserted.
    public var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(db) }

    public func prepare(_ sql: String) throws(StoreError) -> Statement {
        var st: OpaquePointer?
        let rc = sqlite3_prepare_v2(db, sql, -1, &st, nil)
        guard rc == SQLITE_OK, let st else { throw error(rc) }
        return Statement(db: self, st: st)
    }
}

/// A prepared statement; reset and rebound for each use.
public final class Statement {
    let db: Database
    let st: OpaquePointer
    init(db: Database, st: OpaquePointer) { self.db = db; self.st = st }
    deinit { sqlite3_finalize(st) }

    public enum Value { case text(String), blob([UInt8]), int(Int64), null }

    public func bind(_ values: [Value]) throws(StoreError) {
        sqlite3_reset(st)
        sqlite3_clear_bindings(st)
        for (i, v) in values.enumerated() {
            let idx = Int32(i + 1)
            let rc: Int32
            switch v {
            case .text(let s): rc = sqlite3_bind_text(st, idx, s, -1, transient)
            case .blob(let b): rc = b.withUnsafeBytes { sqlite3_bind_blob(st, idx, $0.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32($0.count), transient) }
            case .int(let n): rc = sqlite3_bind_int64(st, idx, n)
            case .null: rc = sqlite3_bind_null(st, idx)
            }
            if rc != SQLITE_OK { throw db.error(rc) }
        }
    }

    /// Steps once: true while a row is available.
    public func step() throws(StoreError) -> Bool {
        let rc = sqlite3_step(st)
        if rc == SQLITE_ROW { return true }
        if rc == SQLITE_DONE { return false }
        throw db.error(rc)
    }

    public func run(_ values: [Value]) throws(StoreError) {
        try bind(values)
        while try step() {}
    }

    public func text(_ col: Int32) -> String {
        guard let p = sqlite3_column_text(st, col) else { return "" }
        return String(decoding: UnsafeBufferPointer(start: p, count: Int(sqlite3_column_bytes(st, col))), as: UTF8.self)
    }
    public func blob(_ col: Int32) -> [UInt8] {
        let n = Int(sqlite3_column_bytes(st, col))
        guard n > 0, let p = sqlite3_column_blob(st, col) else { return [] }
        return Array(UnsafeRawBufferPointer(start: p, count: n))
    }
    public func int(_ col: Int32) -> Int64 { sqlite3_column_int64(st, col) }

    // The allocation-free path for bulk work (the audit log): bind borrowed bytes, read column
    // bytes in place. A borrowed binding must outlive the step that uses it.
    public func reset() { sqlite3_reset(st) }
    public func bindInt(_ idx: Int32, _ v: Int64) throws(StoreError) {
        let rc = sqlite3_bind_int64(st, idx, v)
        if rc != SQLITE_OK { throw db.error(rc) }
    }
    public func bindBorrowed(_ idx: Int32, _ b: UnsafeRawBufferPointer) throws(StoreError) {
        let rc = sqlite3_bind_blob(st, idx, b.baseAddress ?? UnsafeRawPointer(bitPattern: 1), Int32(b.count), nil)
        if rc != SQLITE_OK { throw db.error(rc) }
    }
    /// The blob of column `col` of the current row, valid until the next step or reset.
    public func blobInPlace(_ col: Int32) -> UnsafeRawBufferPointer {
        let p = sqlite3_column_blob(st, col)
        let n = Int(sqlite3_column_bytes(st, col))
        return UnsafeRawBufferPointer(start: n > 0 ? p : nil, count: n)
    }
}

/// The durable key-value store a stage gets when its descriptor asks (`usesStore`).
/// One table `kv(key TEXT PRIMARY KEY, value BLOB, updated_ns INTEGER)` per stage database.
public final class SQLiteKeyValueStore: KeyValueStore {
    let db: Database
    let getStmt: Statement, putStmt: Statement, delStmt: Statement, keysStmt: Statement

    public init(path: String) throws(StoreError) {
        db = try Database(path: path)
        try db.execute("CREATE TABLE IF NOT EXISTS kv(key TEXT PRIMARY KEY, value BLOB NOT NULL, updated_ns INTEGER NOT NULL)")
        getStmt = try db.prepare("SELECT value FROM kv WHERE key = ?")
        putStmt = try db.prepare("INSERT INTO kv(key, value, updated_ns) VALUES(?, ?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_ns = excluded.updated_ns")
        delStmt = try db.prepare("DELETE FROM kv WHERE key = ?")
        keysStmt = try db.prepare("SELECT key FROM kv WHERE key >= ? ORDER BY key")
    }

    public func get(_ key: String) throws -> [UInt8]? {
        try getStmt.bind([.text(key)])
        return try getStmt.step() ? getStmt.blob(0) : nil
    }
    public func put(_ key: String, _ value: [UInt8]) throws {
        var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
        try putStmt.run([.text(key), .blob(value), .int(Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec))])
    }
    public func delete(_ key: String) throws { try delStmt.run([.text(key)]) }
    public func batch(put: [(String, [UInt8])], delete: [String]) throws {
        guard !put.isEmpty || !delete.isEmpty else { return }
        try db.execute("BEGIN IMMEDIATE")
        do {
            var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
            let now = Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
            for (k, v) in put { try putStmt.run([.text(k), .blob(v), .int(now)]) }
            for k in delete { try delStmt.run([.text(k)]) }
            try db.execute("COMMIT")
        } catch {
            try? db.execute("ROLLBACK")
            throw error
        }
    }
    public func keys(prefix: String) throws -> [String] {
        try keysStmt.bind([.text(prefix)])
        var out: [String] = []
        while try keysStmt.step() {
            let k = keysStmt.text(0)
            guard k.hasPrefix(prefix) else { break }
            out.append(k)
        }
        return out
    }
}
