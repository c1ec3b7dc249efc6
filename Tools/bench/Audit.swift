import Foundation
import PipeAudit
import PipeKit
import PipeSeal
import PipeStore

/// The audit log's benchmark (issue 8): appends per second with the hash chain, through the log
/// and through the host's writer (which also validates each record), next to the same SQLite
/// inserts without the chain; verify rate; SHA-256 through libcrypto next to PipeKit's portable
/// one. Records are shaped like the twin guard's decisions (about 330 bytes canonical).
enum AuditBench {
    static func record(_ i: Int) -> AuditRecord {
        AuditRecord(decision: i % 8 < 5 ? "allow" : "block", envelope: EnvelopeID(hi: 0x1234, lo: UInt64(i)), actor: "operator.anna",
                    parents: [EnvelopeID(hi: 1, lo: UInt64(i)), EnvelopeID(hi: 2, lo: UInt64(i))], stage: "guard",
                    location: "host:4242", timeNs: 1_796_000_000_000_000_000 + UInt64(i) * 1000, intent: "factory.crane.hoist",
                    reason: i % 8 < 5 ? "allowed: in sync, drift 75 ms" : "blocked: status mismatch: physical=fault, twin=operational",
                    details: ["device": .string("crane-01"), "drift_ms": .double(75), "profile": .string("port"),
                              "physical_state": .string("783d2a27da54c3bf47e539c7607c1ac1"), "twin_state": .string("72f1811584f9df03e73d47f43ce376b2")])
    }

    static func tempPath(_ name: String) -> String {
        let d = NSTemporaryDirectory() + "pipe-bench-audit-\(getpid())"
        try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        let p = d + "/" + name
        for s in ["", "-wal", "-shm"] { unlink(p + s) }
        return p
    }

    /// Bodies in batches of `batch`, as the writer appends them.
    static func bodies(_ n: Int) -> [[UInt8]] { (0..<n).map { AuditCodec.body(record($0)) } }

    static func appendRate(_ bodies: [[UInt8]], batch: Int, path: String, signer: SigningKey) throws -> Double {
        let log = try AuditLog(path: path, pipeline: "bench", signer: signer)
        let t0 = now()
        var i = 0
        while i < bodies.count {
            let j = min(bodies.count, i + batch)
            try log.append(bodies: Array(bodies[i..<j]))
            i = j
        }
        try log.checkpoint(timeNs: 1)
        return Double(bodies.count) / (now() - t0)
    }

    /// The same rows into a table without the chain: canonical bytes plus a constant hash.
    static func plainInsertRate(_ bodies: [[UInt8]], batch: Int, path: String) throws -> Double {
        let db = try Database(path: path, pageSize: 65536)   // as the audit log's
        try db.execute("CREATE TABLE records(seq INTEGER PRIMARY KEY, rec BLOB NOT NULL, hash BLOB NOT NULL)")
        let ins = try db.prepare("INSERT INTO records(seq, rec, hash) VALUES(?, ?, ?)")
        let hash = [UInt8](repeating: 7, count: 32)
        var canonical: [UInt8] = []
        let t0 = now()
        var seq: Int64 = 0
        var i = 0
        while i < bodies.count {
            let j = min(bodies.count, i + batch)
            try db.execute("BEGIN IMMEDIATE")
            for b in bodies[i..<j] {
                seq += 1
                canonical.removeAll(keepingCapacity: true)
                canonical.append(1)
                withUnsafeBytes(of: UInt64(seq).littleEndian) { canonical.append(contentsOf: $0) }
                canonical.append(contentsOf: b)
                try canonical.withUnsafeBytes { c in
                    try hash.withUnsafeBytes { h in
                        try ins.bindInt(1, seq); try ins.bindBorrowed(2, c); try ins.bindBorrowed(3, h)
                        _ = try ins.step(); ins.reset()
                    }
                }
            }
            try db.execute("COMMIT")
            i = j
        }
        return Double(bodies.count) / (now() - t0)
    }

    /// Through the writer: frames of 256 entries, as a runner's AUDIT frames arrive; the clock
    /// stops when close() has appended and checkpointed everything.
    static func writerRate(_ n: Int, path: String, signer: SigningKey) throws -> Double {
        var frames: [[UInt8]] = []
        var f: [UInt8] = []
        for i in 0..<n {
            AuditCodec.appendEntry(record(i), into: &f)
            if (i + 1) % 256 == 0 { frames.append(f); f.removeAll() }
        }
        if !f.isEmpty { frames.append(f) }
        let w = try AuditWriter(.init(path: path, pipeline: "bench", signer: signer, maxPendingRecords: n + 1))
        // Everything is queued first (as AUDIT frames arrive at the host), then the clock runs
        // over the writer thread alone: validation, chain, inserts, checkpoints, final close.
        for fr in frames { _ = fr.withUnsafeBytes { w.submit(frame: $0, from: "guard") } }
        let t0 = now()
        w.start()
        let s = w.close()
        let dt = now() - t0
        guard s.appended == n, s.refused == 0, s.pending == 0 else { throw AuditError("writer appended \(s.appended) of \(n), refused \(s.refused)") }
        return Double(n) / dt
    }

    static func hashRates(size: Int, count: Int) -> (lib: Double, portable: Double) {
        let data = [UInt8](repeating: 0x5a, count: size)
        var acc: UInt8 = 0
        let t0 = now()
        data.withUnsafeBytes { d in for _ in 0..<count { acc &+= ChainHash.digest(d)[0] } }
        let lib = Double(count) / (now() - t0)
        let m = max(1, count / 20)
        let t1 = now()
        for _ in 0..<m { acc &+= PipeKit.SHA256.hash(data)[0] }
        let portable = Double(m) / (now() - t1)
        if acc == 1 { print("") }   // keep the work observable
        return (lib, portable)
    }

    static func report(quick: Bool) throws {
        let n = quick ? 200_000 : 1_000_000
        let signer = try SigningKey.generate()
        let bs = bodies(n)
        let avg = bs.reduce(0) { $0 + $1.count } / bs.count + 9
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?.contains(" sha_ni") == true ? "has" : "lacks"
        print("audit bench: \(n) records of ~\(avg) canonical bytes (twin-guard decisions), batches of 4096; this CPU \(cpu) SHA extensions")
        let h = hashRates(size: avg + 32, count: 2_000_000 / (quick ? 4 : 1))
        print(String(format: "  sha256(%d B): libcrypto %.2f M/s, PipeKit portable %.2f M/s (%.1fx)", avg + 32, h.lib / 1e6, h.portable / 1e6, h.lib / h.portable))
        var plain: [Double] = [], chained: [Double] = [], writer: [Double] = [], verify: [Double] = []
        var logPath = ""
        for k in 0..<3 {
            plain.append(try plainInsertRate(bs, batch: 4096, path: tempPath("plain\(k).db")))
            logPath = tempPath("chain\(k).db")
            chained.append(try appendRate(bs, batch: 4096, path: logPath, signer: signer))
            writer.append(try writerRate(n, path: tempPath("writer\(k).db"), signer: signer))
            let r = try AuditVerifier.verify(path: logPath, publicKey: signer.publicKey)
            guard r.ok, r.records == n, r.unanchored == 0 else { throw AuditError("verify of the bench log failed: \(String(describing: r.firstBad))") }
            verify.append(Double(r.records) / r.seconds)
        }
        func med(_ a: [Double]) -> Double { a.sorted()[a.count / 2] }
        let p = med(plain), c = med(chained), w = med(writer), v = med(verify)
        print(String(format: "  baseline, same rows without the chain (SQLite insert only): %.0f/s", p))
        print(String(format: "  append with hash chain (AuditLog, median of 3):            %.0f/s = %.2fx baseline; target 300000/s: %.2fx", c, c / p, c / 300_000))
        print(String(format: "  append through the writer (validate + chain + checkpoint):  %.0f/s = %.2fx baseline; target 300000/s: %.2fx", w, w / p, w / 300_000))
        print(String(format: "  verify (chain + checkpoint signatures, median of 3):        %.0f records/s; target 1500000/s: %.2fx", v, v / 1_500_000))
        try? FileManager.default.removeItem(atPath: NSTemporaryDirectory() + "pipe-bench-audit-\(getpid())")
    }
}

/// Every record of a run's audit log (audit.db), in order; empty when there is none.
func auditRecords(_ runDirectory: String) -> [AuditRecord] {
    guard let r = try? AuditReader(path: runDirectory + "/audit.db") else { return [] }
    var out: [AuditRecord] = []
    try? r.forEach { out.append($0.record); return true }
    return out
}

