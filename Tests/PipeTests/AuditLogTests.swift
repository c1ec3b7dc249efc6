import Foundation
import PipeAudit
import PipeKit
import PipeSeal
import PipeStore
import Testing

/// A record like the twin guard's, numbered.
private func rec(_ i: Int, stage: String = "guard") -> AuditRecord {
    AuditRecord(decision: i % 3 == 0 ? "block" : "allow", envelope: EnvelopeID(hi: 7, lo: UInt64(i)), actor: "operator",
                parents: [EnvelopeID(hi: 1, lo: UInt64(i))], stage: stage, location: "host:1", timeNs: 1_000_000 + UInt64(i),
                intent: "crane.hoist", reason: "reason \(i) — ünïcode", details: ["n": .int(Int64(i)), "ok": .bool(i % 2 == 0), "x": .double(0.5), "d": .string("crane-01")])
}

/// Appends records `from...to` to `log` as one batch.
private func append(_ log: AuditLog, _ range: ClosedRange<Int>) throws {
    try log.append(bodies: range.map { AuditCodec.body(rec($0)) })
}

/// A log of 105 records, checkpointed at 50 and 100 (5 unanchored).
private func makeLog(_ tag: String, key: SigningKey) throws -> String {
    let path = Paths.tempDir(tag) + "/audit.db"
    let log = try AuditLog(path: path, pipeline: "p", signer: key)
    try append(log, 1...50); try log.checkpoint(timeNs: 1)
    try append(log, 51...100); try log.checkpoint(timeNs: 2)
    try append(log, 101...105)
    return path
}

/// Edits the log as an attacker with file access would: the append-only triggers go first.
private func tamper(_ path: String, _ sql: String, _ values: [Statement.Value] = []) throws {
    let db = try Database(path: path)
    try db.execute("DROP TRIGGER IF EXISTS records_no_update; DROP TRIGGER IF EXISTS records_no_delete; DROP TRIGGER IF EXISTS checkpoints_no_update; DROP TRIGGER IF EXISTS checkpoints_no_delete")
    try db.prepare(sql).run(values)
}

private func storedRec(_ path: String, _ seq: Int64) throws -> [UInt8] {
    let db = try Database(path: path, readOnly: true)
    let st = try db.prepare("SELECT rec FROM records WHERE seq = ?")
    try st.bind([.int(seq)])
    _ = try st.step()
    return st.blob(0)
}

@Suite("Audit log: encoding, chain, checkpoints, verify")
struct AuditLogTests {
    @Test func codec_roundTripsAndCheckAgreesWithDecode() throws {
        let r = rec(42)
        let body = AuditCodec.body(r)
        #expect(try AuditCodec.decodeBody(body) == r)
        #expect(body.withUnsafeBytes { AuditCodec.check($0, stage: "guard") } == nil)
        #expect(body.withUnsafeBytes { AuditCodec.check($0, stage: "other") }?.contains("naming stage 'guard' came from stage 'other'") == true)
        // Detail order in the dictionary never changes the bytes: one record, one encoding.
        var shuffled = r; shuffled.details = Dictionary(uniqueKeysWithValues: r.details.reversed())
        #expect(AuditCodec.body(shuffled) == body)
        // Every single-byte change and every truncation: check() refuses exactly what decode refuses.
        var g = SplitMix64(state: 9)
        for i in 0..<body.count {
            var b = body
            b[i] ^= UInt8.random(in: 1...255, using: &g)
            let decodes = (try? AuditCodec.decodeBody(b)) != nil
            let passes = b.withUnsafeBytes { AuditCodec.check($0, stage: nil) } == nil
            #expect(decodes == passes, "byte \(i)")
            let cut = Array(body.prefix(i))
            #expect((try? AuditCodec.decodeBody(cut)) == nil)
            #expect(cut.withUnsafeBytes { AuditCodec.check($0, stage: nil) } != nil)
        }
        // Entries split; a torn frame does not.
        var frame: [UInt8] = []
        AuditCodec.appendEntry(rec(1), into: &frame); AuditCodec.appendEntry(rec(2), into: &frame)
        #expect(frame.withUnsafeBytes { AuditCodec.entryCount($0) } == 2)
        #expect(try frame.withUnsafeBytes { try AuditCodec.entries($0).map { try AuditCodec.decodeBody($0) } } == [rec(1), rec(2)])
        #expect(frame.dropLast().withUnsafeBytes { AuditCodec.entryCount($0) } == nil)
    }

    @Test func chain_isSha256OfCanonicalAndPrevious_fromAGenesisOfZeros() throws {
        let key = try SigningKey.generate()
        let path = Paths.tempDir("audit-chain") + "/audit.db"
        let log = try AuditLog(path: path, pipeline: "p", signer: key)
        try append(log, 1...3)
        let reader = try AuditReader(path: path)
        var prev = [UInt8](repeating: 0, count: 32)
        var seen: [Int64] = []
        try reader.forEach { e in
            var canonical: [UInt8] = [AuditCodec.version]
            withUnsafeBytes(of: UInt64(e.seq).littleEndian) { canonical.append(contentsOf: $0) }
            canonical += AuditCodec.body(e.record)
            let stored = try storedRec(path, e.seq)
            #expect(stored == canonical)
            // Independent of PipeAudit's hashing: PipeKit's portable SHA-256.
            #expect(e.hash == PipeKit.SHA256.hash(canonical + prev))
            prev = e.hash
            seen.append(e.seq)
            #expect(e.record == rec(Int(e.seq)))
            return true
        }
        #expect(seen == [1, 2, 3])
        #expect(log.headHash == prev)
        #expect(reader.meta["genesis"] == String(repeating: "0", count: 64))
    }

    @Test func verify_intactLog_reportsUnanchoredTail() throws {
        let key = try SigningKey.generate()
        let path = try makeLog("audit-ok", key: key)
        let r = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        #expect(r.ok && r.records == 105 && r.checkpoints == 2 && r.lastGoodCheckpoint == 100 && r.unanchored == 5 && r.pinned)
        // Reopened, the log continues the chain from its head.
        let log = try AuditLog(path: path, pipeline: "p", signer: key)
        #expect(log.headSeq == 105 && log.checkpointSeq == 100)
        try append(log, 106...110); try log.checkpoint(timeNs: 3)
        let r2 = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        #expect(r2.ok && r2.records == 110 && r2.unanchored == 0 && r2.checkpoints == 3)
    }

    @Test func theLogIsAppendOnly_throughSQLiteToo() throws {
        let key = try SigningKey.generate()
        let path = try makeLog("audit-ao", key: key)
        let db = try Database(path: path)
        #expect(throws: StoreError.self) { try db.execute("UPDATE records SET rec = x'00' WHERE seq = 3") }
        #expect(throws: StoreError.self) { try db.execute("DELETE FROM records WHERE seq = 105") }
        #expect(throws: StoreError.self) { try db.execute("DELETE FROM checkpoints") }
    }

    @Test func verify_namesTheFirstBadSeq_forEditDeleteAndReorder() throws {
        let key = try SigningKey.generate()
        // Edited: one byte of record 37's reason.
        let edited = try makeLog("audit-edit", key: key)
        var r37 = try storedRec(edited, 37)
        r37[r37.count - 30] ^= 1
        try tamper(edited, "UPDATE records SET rec = ? WHERE seq = 37", [.blob(r37)])
        let e = try AuditVerifier.verify(path: edited, publicKey: key.publicKey)
        #expect(!e.ok && e.firstBad?.seq == 37 && e.breaks == 1, "\(String(describing: e.firstBad))")
        #expect(e.firstBad?.reason.contains("does not chain") == true)
        // Deleted: record 37 gone.
        let deleted = try makeLog("audit-del", key: key)
        try tamper(deleted, "DELETE FROM records WHERE seq = 37")
        let d = try AuditVerifier.verify(path: deleted, publicKey: key.publicKey)
        #expect(d.firstBad?.seq == 37 && d.firstBad?.reason.contains("missing") == true, "\(String(describing: d.firstBad))")
        // Reordered: records 20 and 21 swap contents (and hashes).
        let swapped = try makeLog("audit-swap", key: key)
        let a = try storedRec(swapped, 20), b = try storedRec(swapped, 21)
        try tamper(swapped, "UPDATE records SET rec = ? WHERE seq = 20", [.blob(b)])
        try tamper(swapped, "UPDATE records SET rec = ? WHERE seq = 21", [.blob(a)])
        let s = try AuditVerifier.verify(path: swapped, publicKey: key.publicKey)
        #expect(s.firstBad?.seq == 20 && s.firstBad?.reason.contains("record 21") == true, "\(String(describing: s.firstBad))")
    }

    @Test func verify_catchesARehashedChain_andADeletedTail_byTheCheckpoints() throws {
        let key = try SigningKey.generate()
        // An attacker edits record 37 and recomputes every hash after it: the chain is
        // consistent again, but the signed heads at 50 and 100 are no longer reached.
        let path = try makeLog("audit-rehash", key: key)
        let reader = try AuditReader(path: path)
        var recs: [(Int64, [UInt8])] = []
        try reader.forEach { e in recs.append((e.seq, try storedRec(path, e.seq))); return true }
        var prev = [UInt8](repeating: 0, count: 32)
        for (seq, var r) in recs {
            if seq == 37 { r[r.count - 30] ^= 1; try tamper(path, "UPDATE records SET rec = ? WHERE seq = 37", [.blob(r)]) }
            let h = PipeKit.SHA256.hash(r + prev)
            try tamper(path, "UPDATE records SET hash = ? WHERE seq = ?", [.blob(h), .int(seq)])
            prev = h
        }
        let v = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        #expect(v.firstBad == nil)
        #expect(!v.ok && v.badCheckpoints.map(\.seq) == [50, 100] && v.lastGoodCheckpoint == 0 && v.unanchored == 105)
        #expect(v.badCheckpoints.first?.reason.contains("no longer hash to the signed head") == true)

        // The tail deleted past the last checkpoint: the checkpoint names records that are gone.
        let cut = try makeLog("audit-tail", key: key)
        try tamper(cut, "DELETE FROM records WHERE seq > 95")
        let t = try AuditVerifier.verify(path: cut, publicKey: key.publicKey)
        #expect(t.firstBad == nil && t.badCheckpoints.map(\.seq) == [100] && t.lastGoodCheckpoint == 50 && t.unanchored == 45)
        #expect(t.badCheckpoints.first?.reason.contains("records were deleted from the end") == true)
    }

    @Test func verify_checksCheckpointSignaturesAndTheSigner() throws {
        let key = try SigningKey.generate(), other = try SigningKey.generate()
        let path = try makeLog("audit-sig", key: key)
        let wrong = try AuditVerifier.verify(path: path, publicKey: other.publicKey)
        #expect(!wrong.ok && wrong.badCheckpoints.count == 2 && wrong.badCheckpoints[0].reason.contains("is signed by key"))
        let db = try Database(path: path, readOnly: true)
        let st = try db.prepare("SELECT sig FROM checkpoints WHERE seq = 50"); try st.bind([]); _ = try st.step()
        var sig = st.blob(0); sig[5] ^= 0x40
        try tamper(path, "UPDATE checkpoints SET sig = ? WHERE seq = 50", [.blob(sig)])
        let bad = try AuditVerifier.verify(path: path)   // against the recorded key
        #expect(!bad.ok && !bad.pinned && bad.badCheckpoints.map(\.seq) == [50] && bad.badCheckpoints[0].reason.contains("signature does not verify"))
        #expect(bad.lastGoodCheckpoint == 100 && bad.unanchored == 5)
    }

    @Test func open_refusesAnotherPipelinesLog_aForeignDatabase_garbage_andABrokenHead() throws {
        let key = try SigningKey.generate()
        let path = try makeLog("audit-open", key: key)
        #expect { _ = try AuditLog(path: path, pipeline: "q", signer: key) } throws: { e in
            "\(e)".contains("belongs to pipeline 'p', not 'q'")
        }
        let foreign = Paths.tempDir("audit-foreign") + "/other.db"
        try Database(path: foreign).execute("CREATE TABLE kv(k TEXT)")
        #expect { _ = try AuditLog(path: foreign, pipeline: "p", signer: key) } throws: { e in "\(e)".contains("not an audit log") }
        #expect { _ = try AuditReader(path: foreign) } throws: { e in "\(e)".contains("not an audit log") }
        let garbage = Paths.tempDir("audit-garbage") + "/audit.db"
        try Data((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31) }).write(to: URL(fileURLWithPath: garbage))
        #expect { _ = try AuditLog(path: garbage, pipeline: "p", signer: key) } throws: { e in "\(e)".contains("not a readable audit database") }
        #expect { _ = try AuditVerifier.verify(path: garbage) } throws: { e in "\(e)".contains("not a readable audit database") }
        // A truncated file: cut the database (checkpointed into the main file) in half.
        let truncated = try makeLog("audit-trunc", key: key)
        try Database(path: truncated).execute("PRAGMA wal_checkpoint(TRUNCATE)")
        let size = (try FileManager.default.attributesOfItem(atPath: truncated)[.size] as? Int) ?? 0
        #expect(truncate(truncated, off_t(size / 2)) == 0)
        #expect(throws: (any Error).self) {
            let r = try AuditVerifier.verify(path: truncated, publicKey: key.publicKey)
            if !r.ok || r.records < 105 { throw AuditError("short: \(r.records) records, first bad \(String(describing: r.firstBad))") }
        }
        // A head that does not chain: the writer will not extend it.
        let broken = try makeLog("audit-head", key: key)
        try tamper(broken, "UPDATE records SET hash = zeroblob(32) WHERE seq = 105")
        #expect { _ = try AuditLog(path: broken, pipeline: "p", signer: key) } throws: { e in "\(e)".contains("does not chain") }
    }

    @Test func writer_refusesRecordsThatLieAboutTheirStage_orDoNotDecode() throws {
        let key = try SigningKey.generate()
        let path = Paths.tempDir("audit-writer") + "/audit.db"
        let w = try AuditWriter(.init(path: path, pipeline: "p", signer: key))
        w.start()
        var frame: [UInt8] = []
        AuditCodec.appendEntry(rec(1, stage: "a"), into: &frame)
        AuditCodec.appendEntry(rec(2, stage: "b"), into: &frame)       // claims another stage
        #expect(frame.withUnsafeBytes { w.submit(frame: $0, from: "a") } == 2)
        #expect([UInt8]([3, 0, 0, 0, 1, 2, 3]).withUnsafeBytes { w.submit(frame: $0, from: "a") } == 1)   // one entry, not a record
        #expect([UInt8]([200, 0, 0, 0, 1]).withUnsafeBytes { w.submit(frame: $0, from: "a") } == 1)      // a torn frame: counted as one
        w.submit(AuditRecord(decision: "lane-state", reason: "host's own"))
        let s = w.close()
        #expect(s.appended == 5 && s.refused == 3 && s.pending == 0 && s.headSeq == 5 && s.checkpointSeq == 5)
        var got: [AuditRecord] = []
        try AuditReader(path: path).forEach { got.append($0.record); return true }
        #expect(got.map(\.decision) == ["allow", "audit-refused", "audit-refused", "audit-refused", "lane-state"])
        #expect(got[1].reason.contains("stage 'a' sent a record naming stage 'b'"))
        #expect(got[2].reason.contains("does not decode") && got[3].reason.contains("does not split"))
        #expect(try AuditVerifier.verify(path: path, publicKey: key.publicKey).ok)
    }

    @Test func writer_onAFullDisk_keepsTheRecords_neverForks_andCatchesUp() throws {
        let dir = Paths.tempDir("audit-full")
        guard try mountTmpfs(dir, size: "16m", for: "fullDisk audit") else { return }
        defer { unmount(dir) }
        let key = try SigningKey.generate()
        let w = try AuditWriter(.init(path: dir + "/audit.db", pipeline: "p", signer: key, checkpointEvery: 100))
        w.start()
        // Fill the file system, leaving the log a little room.
        let ballast = dir + "/ballast"
        #expect(FileManager.default.createFile(atPath: ballast, contents: Data(count: 15_000_000)))
        for i in 1...4000 { w.submit(rec(i, stage: "host")) }
        var s = w.stats
        let deadline = Date().addingTimeInterval(20)
        while s.failedAppends == 0 && Date() < deadline { usleep(20_000); s = w.stats }
        #expect(s.failedAppends > 0 && s.lastError?.contains("disk full") == true, "\(s)")
        #expect(s.pending > 0 && s.headSeq < 4000)
        let stuckAt = s.headSeq
        // Whatever did land is an intact chain.
        let mid = try AuditVerifier.verify(path: dir + "/audit.db", publicKey: key.publicKey)
        #expect(mid.firstBad == nil && mid.lastSeq == stuckAt)
        // Space comes back: the queued records go in, in order, none lost, none twice.
        unlink(ballast)
        let end = w.close()
        #expect(end.pending == 0 && end.headSeq == 4000 && end.appended == 4000, "\(end)")
        let v = try AuditVerifier.verify(path: dir + "/audit.db", publicKey: key.publicKey)
        #expect(v.ok && v.records == 4000 && v.unanchored == 0)
        var n = 0
        try AuditReader(path: dir + "/audit.db").forEach { e in n += 1; #expect(e.record.reason == rec(n).reason); return true }
        #expect(n == 4000)
    }
}

@Suite("Audit log: what a forger with file access tries")
struct AuditForgeryTests {
    /// Record 5 edited with its own hash recomputed: the chain breaks at 6, and no checkpoint
    /// covering 5 stays valid (they are compared with the chain recomputed from genesis).
    @Test func aSplicedEdit_failsEveryCheckpointThatCoversIt() throws {
        let key = try SigningKey.generate()
        let path = Paths.tempDir("audit-splice") + "/audit.db"
        let log = try AuditLog(path: path, pipeline: "p", signer: key)
        try append(log, 1...10); try log.checkpoint(timeNs: 1)
        try append(log, 11...20); try log.checkpoint(timeNs: 2)
        var r5 = try storedRec(path, 5)
        r5[r5.count - 30] ^= 1
        let db = try Database(path: path, readOnly: true)
        let st = try db.prepare("SELECT hash FROM records WHERE seq = 4"); try st.bind([]); _ = try st.step()
        let h4 = st.blob(0)
        try tamper(path, "UPDATE records SET rec = ?, hash = ? WHERE seq = 5", [.blob(r5), .blob(PipeKit.SHA256.hash(r5 + h4))])
        let v = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        #expect(v.firstBad?.seq == 6 && v.firstBad?.reason.contains("it, or the record before it, was altered") == true)
        #expect(v.badCheckpoints.map(\.seq) == [10, 20] && v.lastGoodCheckpoint == 0 && v.unanchored == 20)
    }

    @Test func aReplacedKey_orACheckpointFromAnotherLog_isRefused() throws {
        let key = try SigningKey.generate(), other = try SigningKey.generate()
        let path = try makeLog("audit-key", key: key)
        #expect { _ = try AuditLog(path: path, pipeline: "p", signer: other) } throws: { e in "\(e)".contains("the configured key is") }
        // Another log of the same pipeline under the same key: its checkpoints do not fit here.
        let second = try makeLog("audit-key2", key: key)
        let src = try Database(path: second, readOnly: true)
        let st = try src.prepare("SELECT seq, head, time_ns, key, sig FROM checkpoints WHERE seq = 100"); try st.bind([]); _ = try st.step()
        let (head, sig) = (st.blob(1), st.blob(4))
        try tamper(path, "UPDATE checkpoints SET sig = ? WHERE seq = 100", [.blob(sig)])
        let v = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        // Same records, same key, same seq and head, but another log_id: the signature is refused.
        #expect(head.count == 32 && v.badCheckpoints.map(\.seq) == [100] && v.badCheckpoints[0].reason.contains("signature does not verify"))
    }

    @Test func impossibleSeqsAndNonASCIIDetailKeys_areRefusedNotTrapped() throws {
        let key = try SigningKey.generate()
        let path = try makeLog("audit-seq", key: key)
        try tamper(path, "INSERT INTO checkpoints(seq, head, time_ns, key, sig) VALUES(-1, zeroblob(32), 0, ?, zeroblob(64))", [.blob(key.publicKey)])
        let r = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        #expect(r.badCheckpoints.contains { $0.seq == -1 && $0.reason.contains("impossible seq") })
        try tamper(path, "INSERT INTO records(seq, rec, hash) VALUES(9223372036854775807, x'00', zeroblob(32))")
        let r2 = try AuditVerifier.verify(path: path, publicKey: key.publicKey)
        #expect(!r2.ok && r2.firstBad?.seq == 106)
        #expect { _ = try AuditLog(path: path, pipeline: "p", signer: key) } throws: { e in "\(e)".contains("impossible seq") || "\(e)".contains("does not chain") }
        var nfc = rec(1); nfc.details = ["é": .int(1)]
        let body = AuditCodec.body(nfc)
        #expect((try? AuditCodec.decodeBody(body)) == nil)
        #expect(body.withUnsafeBytes { AuditCodec.check($0, stage: nil) }?.contains("not ASCII") == true)
    }
}
