import Glibc
import PipeKit
import PipeSeal
import PipeStore

/// Read access to an audit log (verify, tail, export, trace). Opens read-only, so it is safe on
/// a live log; a file that is not an audit log is refused with the reason.
public final class AuditReader {
    public let path: String
    let db: Database
    public let meta: [String: String]

    public init(path: String) throws(AuditError) {
        self.path = path
        guard access(path, R_OK) == 0 else { throw AuditError("\(path): \(String(cString: strerror(errno)))") }
        do {
            db = try Database(path: path, readOnly: true)
            let t = try db.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'")
            try t.bind([])
            guard try t.step() else { throw AuditError("\(path): not an audit log (no meta table)") }
            meta = try AuditSchema.readMeta(db)
        } catch {
            throw AuditError.store(path, error, doing: "opening the audit log")
        }
        guard meta["format"] == AuditSchema.format else {
            throw AuditError("\(path): unknown audit log format '\(meta["format"] ?? "none")' (this pipectl reads \(AuditSchema.format))")
        }
    }

    public var pipeline: String { meta["pipeline"] ?? "" }

    /// One stored record: its sequence number, chain hash and decoded content.
    public struct Entry: Sendable {
        public var seq: Int64
        public var hash: [UInt8]
        public var record: AuditRecord
    }

    /// Calls `body` for every record with seq >= `from`, in order; a record that does not decode
    /// is an error naming its seq.
    public func forEach(from: Int64 = 1, _ body: (Entry) throws -> Bool) throws {
        let st = try db.prepare("SELECT seq, rec, hash FROM records WHERE seq >= ? ORDER BY seq")
        try st.bind([.int(from)])
        while try st.step() {
            let seq = st.int(0)
            let rec = st.blobInPlace(1)
            guard rec.count >= 9, rec[0] == AuditCodec.version else {
                throw AuditError("\(path): record \(seq) has no canonical header (run `pipectl audit verify`)")
            }
            let r: AuditRecord
            do { r = try AuditCodec.decodeBody(UnsafeRawBufferPointer(rebasing: rec[9...])) } catch {
                throw AuditError("\(path): record \(seq) does not decode: \(error)")
            }
            if try !body(Entry(seq: seq, hash: st.blob(2), record: r)) { return }
        }
    }

    /// The highest sequence number (0 when empty).
    public func lastSeq() throws -> Int64 {
        let st = try db.prepare("SELECT coalesce(max(seq), 0) FROM records")
        try st.bind([])
        _ = try st.step()
        return st.int(0)
    }

    public struct Checkpoint: Sendable { public var seq: Int64; public var head: [UInt8]; public var timeNs: Int64; public var key: [UInt8]; public var sig: [UInt8] }

    public func checkpoints() throws -> [Checkpoint] {
        let st = try db.prepare("SELECT seq, head, time_ns, key, sig FROM checkpoints ORDER BY seq")
        try st.bind([])
        var out: [Checkpoint] = []
        while try st.step() { out.append(Checkpoint(seq: st.int(0), head: st.blob(1), timeNs: st.int(2), key: st.blob(3), sig: st.blob(4))) }
        return out
    }
}

/// What `pipectl audit verify` found.
public struct VerifyReport: Sendable {
    public var records = 0
    public var lastSeq: Int64 = 0
    /// The first sequence number at which the chain is broken, and why.
    public var firstBad: (seq: Int64, reason: String)?
    public var breaks = 0
    public var checkpoints = 0
    public var badCheckpoints: [(seq: Int64, reason: String)] = []
    public var lastGoodCheckpoint: Int64 = 0
    /// Records after the last valid checkpoint: intact as far as the chain shows, but a deleted
    /// tail would look the same.
    public var unanchored: Int64 = 0
    public var signer: String?
    public var pinned = false
    public var seconds = 0.0

    public var ok: Bool { firstBad == nil && badCheckpoints.isEmpty }
}

public enum AuditVerifier {
    /// Walks the whole chain: every record's seq is the next one, its canonical header names that
    /// seq, and `hash = sha256(canonical || prev_hash)`; then checks every checkpoint's signature
    /// (against `publicKey` when given, else the signer recorded in the log) and that its head is
    /// the chain's hash at its seq.
    public static func verify(path: String, publicKey: [UInt8]? = nil) throws(AuditError) -> VerifyReport {
        let reader = try AuditReader(path: path)
        var rep = VerifyReport()
        let t0 = monotonicSeconds()
        var recorded: [UInt8]?
        if let s = reader.meta["signer"] { recorded = Hex.decode(s) }
        let key = publicKey ?? recorded
        rep.signer = key.map { Hex.encode($0) }
        rep.pinned = publicKey != nil
        guard let logID = AuditSchema.binding(reader.meta) else { throw AuditError("\(path): no log_id in the meta table: not a log this version wrote, or the meta was altered") }
        var cps: [AuditReader.Checkpoint] = []
        do { cps = try reader.checkpoints() } catch { throw AuditError.store(path, error, doing: "reading checkpoints") }
        rep.checkpoints = cps.count
        // Chain hashes at checkpoint seqs, collected during the walk.
        var wanted: [Int64: [UInt8]] = [:]
        for c in cps { wanted[c.seq] = [] }
        do {
            let st = try reader.db.prepare("SELECT seq, rec, hash FROM records ORDER BY seq")
            try st.bind([])
            var expect: Int64 = 1
            // `chain` is recomputed from genesis over the records alone: what the checkpoints are
            // compared with, so a record edited with its own hash recomputed cannot pass them.
            // `storedPrev` is the previous row's stored hash: after the first break each row is
            // also checked against it alone, so one damaged row counts once, not as a cascade.
            var chain = ChainHash.genesis
            var computed = [UInt8](repeating: 0, count: 32)
            var storedPrev = ChainHash.genesis
            var local = [UInt8](repeating: 0, count: 32)
            var broken = false
            func bad(_ seq: Int64, _ why: String) {
                rep.breaks += 1
                if rep.firstBad == nil { rep.firstBad = (seq, why) }
            }
            while try st.step() {
                let seq = st.int(0)
                let rec = st.blobInPlace(1)
                let stored = st.blobInPlace(2)
                rep.records += 1
                rep.lastSeq = seq
                var gap = false
                if seq != expect {
                    gap = true
                    let what = seq > expect
                        ? "record \(expect)\(seq > expect &+ 1 ? "–\(seq &- 1)" : "") missing (next present is \(seq))"
                        : "sequence goes back to \(seq) after \(expect &- 1)"
                    bad(expect, what)
                    broken = true
                }
                if rec.count < 9 || rec[0] != AuditCodec.version {
                    bad(seq, "record \(seq) has no canonical header")
                    broken = true
                } else {
                    let inner = UInt64(littleEndian: rec.loadUnaligned(fromByteOffset: 1, as: UInt64.self))
                    if inner != UInt64(bitPattern: seq) {
                        bad(seq, "record \(seq) holds the content of record \(Int64(bitPattern: inner)) (moved or reordered)")
                        broken = true
                    }
                }
                chain.withUnsafeBytes { p in computed.withUnsafeMutableBytes { c in if let cb = c.baseAddress { ChainHash.link(rec, prev: p, into: cb) } } }
                if !broken {
                    if !computed.elementsEqual(stored) {
                        bad(seq, "record \(seq) does not chain: it, or the record before it, was altered (or one was inserted)")
                        broken = true
                    }
                } else if !gap {
                    storedPrev.withUnsafeBytes { p in local.withUnsafeMutableBytes { c in if let cb = c.baseAddress { ChainHash.link(rec, prev: p, into: cb) } } }
                    if !local.elementsEqual(stored) { rep.breaks += 1 }
                }
                swap(&chain, &computed)
                if wanted[seq] != nil { wanted[seq] = chain }
                storedPrev.withUnsafeMutableBytes { p in if stored.count == 32 { p.copyMemory(from: stored) } }
                expect = seq &+ 1
            }
        } catch {
            throw AuditError.store(path, error, doing: "reading records")
        }
        for c in cps {
            if c.seq > rep.lastSeq {
                rep.badCheckpoints.append((c.seq, "checkpoint at seq \(c.seq) but the log ends at \(rep.lastSeq): records were deleted from the end"))
                continue
            }
            guard let k = key else {
                rep.badCheckpoints.append((c.seq, "no signer key to check against (pass --pub)")); continue
            }
            if !c.key.elementsEqual(k) {
                rep.badCheckpoints.append((c.seq, "checkpoint at seq \(c.seq) is signed by key \(Hex.encode(Array(c.key.prefix(8))))…, not \(Hex.encode(Array(k.prefix(8))))…"))
                continue
            }
            guard c.seq > 0 else { rep.badCheckpoints.append((c.seq, "checkpoint at impossible seq \(c.seq)")); continue }
            let msg = c.head.withUnsafeBytes { AuditSchema.checkpointMessage(logID: logID, seq: c.seq, head: $0) }
            if !SigningKey.verify(c.sig, message: msg, publicKey: k) {
                rep.badCheckpoints.append((c.seq, "checkpoint at seq \(c.seq): signature does not verify")); continue
            }
            if let h = wanted[c.seq], !h.isEmpty, h != c.head {
                rep.badCheckpoints.append((c.seq, "checkpoint at seq \(c.seq): the records no longer hash to the signed head (some record at or before \(c.seq) was altered, inserted or removed)")); continue
            }
            if wanted[c.seq]?.isEmpty ?? true {
                rep.badCheckpoints.append((c.seq, "checkpoint at seq \(c.seq) names a record that is not in the log")); continue
            }
            rep.lastGoodCheckpoint = max(rep.lastGoodCheckpoint, c.seq)
        }
        rep.unanchored = rep.lastSeq - rep.lastGoodCheckpoint
        rep.seconds = monotonicSeconds() - t0
        return rep
    }

    static func monotonicSeconds() -> Double {
        var ts = timespec(); clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
