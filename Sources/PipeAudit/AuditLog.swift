import Glibc
import PipeKit
import PipeSeal
import PipeStore

/// Why the audit log cannot be opened, written or read.
public struct AuditError: Error, Sendable, CustomStringConvertible {
    public let message: String
    /// True when the cause is a full disk (or a page limit): the writer keeps the records and retries.
    public let diskFull: Bool
    public init(_ message: String, diskFull: Bool = false) { self.message = message; self.diskFull = diskFull }
    public var description: String { message }

    static func store(_ path: String, _ error: any Error, doing: String) -> AuditError {
        if let a = error as? AuditError { return a }
        guard let e = error as? StoreError else { return AuditError("\(path): \(doing) failed: \(error)") }
        switch e.code {
        case Database.full: return AuditError("\(path): disk full while \(doing) (\(e.message))", diskFull: true)
        case Database.corrupt, Database.notADatabase:
            return AuditError("\(path): not a readable audit database (\(e.message)); it may be truncated or corrupt — `pipectl audit verify` says how far it is intact")
        default: return AuditError("\(path): \(doing) failed: \(e)")
        }
    }
}

/// The on-disk layout (docs/audit-log.md).
enum AuditSchema {
    static let format = "pipeline-audit/1"
    static let create = """
    CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS records(seq INTEGER PRIMARY KEY, rec BLOB NOT NULL, hash BLOB NOT NULL);
    CREATE TABLE IF NOT EXISTS checkpoints(seq INTEGER PRIMARY KEY, head BLOB NOT NULL, time_ns INTEGER NOT NULL,
                                           key BLOB NOT NULL, sig BLOB NOT NULL);
    CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
    """

    /// What ties a checkpoint to one log: its random `log_id` (16 bytes), then `u16` length and
    /// the pipeline name. nil when the meta table lacks either.
    static func binding(_ meta: [String: String]) -> [UInt8]? {
        guard let id = meta["log_id"].flatMap(Hex.decode), id.count == 16, let p = meta["pipeline"] else { return nil }
        let name = Array(p.utf8)
        return id + [UInt8(truncatingIfNeeded: name.count), UInt8(truncatingIfNeeded: name.count >> 8)] + name
    }

    /// The bytes a checkpoint signature covers: domain, the log's binding, `u64` seq (LE), the
    /// 32-byte head. A checkpoint copied from another log, or a renamed pipeline, fails.
    static func checkpointMessage(logID: [UInt8], seq: Int64, head: UnsafeRawBufferPointer) -> [UInt8] {
        var m = Array("pipeline-audit-checkpoint/1\0".utf8)
        m.append(contentsOf: logID)
        withUnsafeBytes(of: UInt64(bitPattern: seq).littleEndian) { m.append(contentsOf: $0) }
        m.append(contentsOf: head)
        return m
    }

    /// `version, u64 seq, body`: the canonical bytes of record `seq`.
    @inline(__always)
    static func canonical(seq: Int64, body: UnsafeRawBufferPointer, into buf: inout [UInt8]) {
        buf.removeAll(keepingCapacity: true)
        buf.append(AuditCodec.version)
        withUnsafeBytes(of: UInt64(bitPattern: seq).littleEndian) { buf.append(contentsOf: $0) }
        buf.append(contentsOf: body)
    }

    static func readMeta(_ db: Database) throws(StoreError) -> [String: String] {
        let st = try db.prepare("SELECT key, value FROM meta")
        try st.bind([])
        var m: [String: String] = [:]
        while try st.step() { m[st.text(0)] = st.text(1) }
        return m
    }
}

/// The append side of the hash-chained audit log: one SQLite file, one writer (`AuditWriter`
/// owns the only instance). Appends are all-or-nothing per batch; the in-memory head moves only
/// after the batch commits, so a failed append can be retried and the chain never forks.
public final class AuditLog {
    public let path: String
    let db: Database
    let insert: Statement, insertCheckpoint: Statement
    let signer: SigningKey?
    public private(set) var headSeq: Int64
    public private(set) var headHash: [UInt8]
    public private(set) var checkpointSeq: Int64
    public private(set) var checkpointCount: Int
    let logBinding: [UInt8]
    var canonicalBuf: [UInt8] = []

    /// Opens the log at `path`, creating it for `pipeline` if it does not exist. A log made for
    /// another pipeline, a file that is not an audit log, or one whose last record does not chain
    /// is refused with the reason.
    public init(path: String, pipeline: String, signer: SigningKey?) throws(AuditError) {
        self.path = path; self.signer = signer
        do {
            // 64 KiB pages: records are ~400 bytes appended in order; large pages halve the
            // B-tree and WAL-frame overhead per record (bench --audit, docs/decisions.md).
            db = try Database(path: path, pageSize: 65536)
            // The WAL is folded back every 64 pages (4 MiB, SQLite's default size in bytes).
            try db.execute("PRAGMA wal_autocheckpoint=64")
            let hasMeta = try db.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
            try hasMeta.bind([])
            if try hasMeta.step() {
                let m = try AuditSchema.readMeta(db)
                guard m["format"] == AuditSchema.format else {
                    throw AuditError("\(path): not an audit log of this format (format '\(m["format"] ?? "none")', expected '\(AuditSchema.format)')")
                }
                guard m["pipeline"] == pipeline else {
                    throw AuditError("\(path): this audit log belongs to pipeline '\(m["pipeline"] ?? "?")', not '\(pipeline)'; give this pipeline its own log (audit.log in the YAML) or run directory")
                }
                if let s = signer, let recorded = m["signer"], recorded != Hex.encode(s.publicKey) {
                    throw AuditError("\(path): this log's checkpoints are signed by key \(recorded.prefix(16))…, but the configured key is \(Hex.encode(s.keyID))… (was audit.key replaced?); restore the key, or start a new log")
                }
            } else {
                let anyTable = try db.prepare("SELECT name FROM sqlite_master WHERE type = 'table' LIMIT 1")
                try anyTable.bind([])
                if try anyTable.step() {
                    throw AuditError("\(path): an SQLite database that is not an audit log (it has table '\(anyTable.text(0))' and no meta); refusing to write into it")
                }
                try db.execute("BEGIN IMMEDIATE")
                try db.execute(AuditSchema.create)
                let put = try db.prepare("INSERT INTO meta(key, value) VALUES(?, ?)")
                var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
                try put.run([.text("format"), .text(AuditSchema.format)])
                try put.run([.text("pipeline"), .text(pipeline)])
                try put.run([.text("created_ns"), .text(String(Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)))])
                try put.run([.text("genesis"), .text(String(repeating: "0", count: 64))])
                var id = [UInt8](repeating: 0, count: 16)
                var g = SystemRandomNumberGenerator()
                for i in id.indices { id[i] = UInt8.random(in: 0...255, using: &g) }
                try put.run([.text("log_id"), .text(Hex.encode(id))])
                if let s = signer { try put.run([.text("signer"), .text(Hex.encode(s.publicKey))]) }
                try db.execute("COMMIT")
            }
            guard let b = AuditSchema.binding(try AuditSchema.readMeta(db)) else { throw AuditError("\(path): the log has no log_id in its meta table; refusing to write into it") }
            logBinding = b
            insert = try db.prepare("INSERT INTO records(seq, rec, hash) VALUES(?, ?, ?)")
            insertCheckpoint = try db.prepare("INSERT INTO checkpoints(seq, head, time_ns, key, sig) VALUES(?, ?, ?, ?, ?)")
            // The head, checked: the last record must chain onto the one before it.
            let last = try db.prepare("SELECT seq, rec, hash FROM records ORDER BY seq DESC LIMIT 2")
            try last.bind([])
            var rows: [(Int64, [UInt8], [UInt8])] = []
            while try last.step() { rows.append((last.int(0), last.blob(1), last.blob(2))) }
            if let top = rows.first {
                guard top.0 >= 1, top.0 < Int64.max / 2 else { throw AuditError("\(path): the last record has an impossible seq \(top.0); the log was altered") }
                let prev = rows.count > 1 ? rows[1].2 : ChainHash.genesis
                guard top.2.count == 32, ChainHash.link(top.1, prev: prev) == top.2,
                      rows.count == 2 || top.0 == 1, rows.count < 2 || rows[1].0 == top.0 - 1 else {
                    throw AuditError("\(path): the last record (seq \(top.0)) does not chain onto the one before it; the log was altered or damaged. Run `pipectl audit verify \(path)`; this host will not append to a broken chain")
                }
                headSeq = top.0; headHash = top.2
            } else {
                headSeq = 0; headHash = ChainHash.genesis
            }
            let cp = try db.prepare("SELECT seq, (SELECT count(*) FROM checkpoints) FROM checkpoints ORDER BY seq DESC LIMIT 1")
            try cp.bind([])
            if try cp.step() { checkpointSeq = cp.int(0); checkpointCount = Int(cp.int(1)) } else { checkpointSeq = 0; checkpointCount = 0 }
        } catch {
            throw AuditError.store(path, error, doing: "opening the audit log")
        }
    }

    /// Appends `bodies` (each a record body, already validated) as one transaction. On failure
    /// nothing is appended and the head is unchanged.
    public func append(_ bodies: [UnsafeRawBufferPointer]) throws(AuditError) {
        guard !bodies.isEmpty else { return }
        var seq = headSeq
        var prev = headHash
        var hash = [UInt8](repeating: 0, count: 32)
        do {
            try db.execute("BEGIN IMMEDIATE")
            for b in bodies {
                seq += 1
                AuditSchema.canonical(seq: seq, body: b, into: &canonicalBuf)
                let failure: StoreError? = canonicalBuf.withUnsafeBytes { c in
                    prev.withUnsafeBytes { p in
                        hash.withUnsafeMutableBytes { h -> StoreError? in
                            guard let hb = h.baseAddress else { return nil }
                            ChainHash.link(c, prev: p, into: hb)
                            do throws(StoreError) {
                                try insert.bindInt(1, seq)
                                try insert.bindBorrowed(2, c)
                                try insert.bindBorrowed(3, UnsafeRawBufferPointer(h))
                                _ = try insert.step()
                                insert.reset()
                                return nil
                            } catch { return error }
                        }
                    }
                }
                if let failure { throw failure }
                swap(&prev, &hash)
            }
            try db.execute("COMMIT")
        } catch {
            insert.reset()
            try? db.execute("ROLLBACK")
            throw AuditError.store(path, error, doing: "appending \(bodies.count) audit record(s) after seq \(headSeq)")
        }
        headSeq = seq; headHash = prev
    }

    /// The same, for bodies held as arrays (tools and tests; the writer appends from its frames).
    public func append(bodies: [[UInt8]]) throws(AuditError) {
        var flat: [UInt8] = []
        var offsets: [(Int, Int)] = []
        for b in bodies { offsets.append((flat.count, b.count)); flat.append(contentsOf: b) }
        let failure: AuditError? = flat.withUnsafeBytes { f in
            do throws(AuditError) {
                try append(offsets.map { UnsafeRawBufferPointer(rebasing: f[$0.0..<($0.0 + $0.1)]) })
                return nil
            } catch { return error }
        }
        if let failure { throw failure }
    }

    /// Signs the head (when a signing key is configured and there is something new to anchor).
    @discardableResult
    public func checkpoint(timeNs: UInt64) throws(AuditError) -> Bool {
        guard let signer, headSeq > checkpointSeq else { return false }
        let msg = headHash.withUnsafeBytes { AuditSchema.checkpointMessage(logID: logBinding, seq: headSeq, head: $0) }
        let sig = signer.sign(msg)
        do {
            try insertCheckpoint.run([.int(headSeq), .blob(headHash), .int(Int64(clamping: timeNs)), .blob(signer.publicKey), .blob(sig)])
        } catch {
            throw AuditError.store(path, error, doing: "writing the checkpoint at seq \(headSeq)")
        }
        checkpointSeq = headSeq; checkpointCount += 1
        return true
    }

    /// A consistent copy of the log at `dest` (SQLite's online backup), safe while appending.
    public static func backup(_ path: String, to dest: String) throws(AuditError) {
        guard access(path, R_OK) == 0 else { throw AuditError("\(path): \(String(cString: strerror(errno)))") }
        guard access(dest, F_OK) != 0 else { throw AuditError("\(dest) exists; a backup never overwrites a file") }
        do {
            let src = try Database(path: path, readOnly: true)
            try src.backup(to: dest)
        } catch {
            unlink(dest)
            throw AuditError.store(path, error, doing: "backing up to \(dest)")
        }
    }
}
