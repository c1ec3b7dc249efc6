import Foundation
import Glibc
import PipeAudit
import PipeConfig
import PipeKit
import PipeSeal

/// The host's side of the audit log: open it before any stage starts (so a log that belongs to
/// another pipeline, or whose chain is broken, stops the run before anything is decided), hand
/// it every record, watch the writer, close it with a final checkpoint.
extension PipelineHost {
    static func resolve(_ p: String, in dir: String) -> String { p.hasPrefix("/") ? p : dir + "/" + p }

    func openAuditLog(_ dir: String) throws(RuntimeError) {
        let spec = plan.spec.auditLog
        auditPath = Self.resolve(spec.path, in: dir)
        let keyPath = Self.resolve(spec.key, in: dir)
        let signer: SigningKey
        do {
            let (k, created) = try KeyFiles.loadOrCreateSigningKey(keyPath, create: spec.keyIsDefault)
            if created { log.info("audit checkpoint key created: \(keyPath) (public key beside it); pin it with `pipectl audit verify --pub`") }
            signer = k
        } catch {
            throw .io("audit checkpoint key \(keyPath): \(error)")
        }
        do {
            let w = try AuditWriter(.init(path: auditPath, pipeline: plan.spec.name, signer: signer,
                                          checkpointEvery: spec.checkpointEvery,
                                          checkpointIntervalNs: UInt64(spec.checkpointIntervalS * 1e9),
                                          location: "host:\(getpid())"))
            w.start()
            auditWriter = w
        } catch {
            throw .io("audit log: \(error)")
        }
    }

    /// Every 100 ms: say when appends start or stop failing; stop the pipeline when the writer
    /// can hold no more unwritten records.
    func checkAudit(_ now: UInt64) {
        guard let w = auditWriter, now &- lastAuditCheck >= 100_000_000 else { return }
        lastAuditCheck = now
        let s = w.stats
        if s.lastError != lastAuditError {
            if let e = s.lastError { log.error("audit log: \(e) (\(s.pending) records waiting; retrying)") }
            else if lastAuditError != nil { log.notice("audit log: appending again (head seq \(s.headSeq))") }
            lastAuditError = s.lastError
        }
        if s.failed && failure == nil {
            failure = "audit log cannot be written (\(s.lastError ?? "unknown error")); \(s.pending) records waiting exceed the bound, so the pipeline stops rather than decide without an audit trail"
            log.error("\(failure ?? "")")
        }
    }

    func closeAuditLog() {
        guard let w = auditWriter else { return }
        auditWriter = nil
        let s = w.close()
        if s.pending > 0 {
            let m = "audit log: \(s.pending) records could not be written (\(s.lastError ?? "unknown error")); the log ends at seq \(s.headSeq)"
            log.error("\(m)")
            if failure == nil { failure = m }
        } else if s.checkpointSeq < s.headSeq {
            let m = "audit log: the final checkpoint could not be written (\(s.checkpointError ?? s.lastError ?? "unknown error")); records \(s.checkpointSeq + 1)-\(s.headSeq) are unanchored"
            log.error("\(m)")
            if failure == nil { failure = m }
        }
        finalAudit = s
    }

    func auditJSON() -> ConfigValue {
        let s = auditWriter?.stats ?? finalAudit ?? AuditWriter.Stats()
        var o: [(String, ConfigValue)] = []
        o.append(("path", .string(auditPath)))
        o.append(("records", .int(Int64(auditCount))))
        o.append(("head_seq", .int(s.headSeq)))
        o.append(("checkpoint_seq", .int(s.checkpointSeq)))
        o.append(("checkpoints", .int(Int64(s.checkpoints))))
        o.append(("unanchored", .int(s.headSeq - s.checkpointSeq)))
        o.append(("pending", .int(Int64(s.pending))))
        o.append(("refused", .int(Int64(s.refused))))
        o.append(("failed_appends", .int(Int64(s.failedAppends))))
        o.append(("last_error", s.lastError.map { ConfigValue.string($0) } ?? .null))
        return .object(o)
    }
}
