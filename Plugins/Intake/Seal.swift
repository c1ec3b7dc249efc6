import Foundation
import PipeKit
import PipeSeal

/// `verify`: a trusted candidate is not trusted until its container verifies. Valid, signed by a
/// trusted key, and its declared surface (name, profile) matches the arrival -> `trusted-fork`;
/// valid but mismatched -> `triage-fork`; invalid -> `reject-invalid`, with the reason.
public final class VerifyStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "verify",
        summary: "Verifies sealed containers (Ed25519 over manifest and every block) and forks them by trust and surface.",
        role: .transform,
        inputs: [InputPort("in", doc: "trusted candidates (payload = the container)")],
        outputs: { _ in ["trusted-fork", "triage-fork", "reject-invalid"] },
        outputsDoc: "`trusted-fork`, `triage-fork`, `reject-invalid`",
        fields: [
            ConfigField("trusted_keys", .list(.string), doc: "Signer public keys trusted: 64 hex digits, or the path of a `.pub` file from `pipehost keygen`."),
            ConfigField("profile", .string, optional: true, doc: "The surface profile expected; a container declaring another one is a `triage-fork`."),
            ConfigField("name_attr", .string, default: .string("filename"), doc: "Attribute holding the arrival name the surface name must match."),
            ConfigField("max_age_s", .double(min: 0), optional: true,
                        doc: "Refuse containers sealed longer ago than this (by their signed `created_ns` against the stage's wall clock), or more than this far in the future; unset: no freshness check."),
        ],
        check: { c in
            (c.strings("trusted_keys") ?? []).isEmpty ? [ConfigIssue(key: "trusted_keys", message: "trusted_keys must name at least one key")] : []
        },
        make: { VerifyStage(config: $0) })

    let keySpecs: [String]
    let profile: String?
    let nameAttr: String
    let maxAgeNs: UInt64?
    var keys: [[UInt8]] = []
    var trusted = OutputHandle(index: 0, name: "trusted-fork")
    var triage = OutputHandle(index: 1, name: "triage-fork")
    var invalid = OutputHandle(index: 2, name: "reject-invalid")
    var counts: [String: Int] = [:]

    init(config c: ConfigReader) {
        keySpecs = c.strings("trusted_keys") ?? []
        profile = c.string("profile")
        nameAttr = c.string("name_attr") ?? "filename"
        maxAgeNs = c.double("max_age_s").map { UInt64(min($0, 1e9) * 1e9) }
    }

    public func start(context: any StageContext) throws {
        trusted = try context.output("trusted-fork"); triage = try context.output("triage-fork"); invalid = try context.output("reject-invalid")
        for spec in keySpecs {
            let path = spec.count == 64 && Hex.decode(spec) != nil ? spec : context.resolvePath(spec)
            do { keys.append(try KeyFiles.loadPublicKey(path)) } catch { throw StageError.halt("trusted key \(spec): \(error)") }
        }
        context.report("trusted_keys", .string(keys.map { Hex.encode($0.prefix(8)) }.joined(separator: ",")))
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        var e = envelope
        let name = e.attrs[nameAttr]?.stringValue ?? ""
        let status: String, reason: String
        do throws(SealError) {
            let opened = try SealedContainer.open(e.payload, trusted: keys)
            let m = opened.manifest
            if let maxAge = maxAgeNs {
                let now = context.wallClockNs
                let age = now >= m.createdNs ? now - m.createdNs : m.createdNs - now
                if age > maxAge {
                    let when = now >= m.createdNs ? "sealed \(age / 1_000_000_000) s ago" : "dated \(age / 1_000_000_000) s in the future"
                    throw SealError(message: "\(when), beyond max_age_s \(maxAge / 1_000_000_000) (a replayed or misdated container)")
                }
            }
            e.attrs["seal_signer"] = .string(m.signerID)
            e.attrs["seal_surface"] = .string(m.surfaceName)
            e.attrs["seal_profile"] = .string(m.profile)
            e.attrs["seal_files"] = .int(Int64(m.entries.count))
            var mismatches: [String] = []
            let arrived = FS.nameBytes(e, nameAttr: nameAttr) ?? []
            if !Array(m.surfaceName.utf8).elementsEqual(arrived) { mismatches.append("surface name '\(m.surfaceName)' but arrived as '\(name)'") }
            if let p = profile, m.profile != p { mismatches.append("profile '\(m.profile)' but this intake expects '\(p)'") }
            if mismatches.isEmpty {
                status = "trusted-fork"; reason = "valid, signed by trusted key \(m.signerID), surface matches"
            } else {
                status = "triage-fork"; reason = "valid, signed by trusted key \(m.signerID), but " + mismatches.joined(separator: "; ")
            }
        } catch {
            status = "reject-invalid"; reason = error.message
        }
        e.attrs["seal_status"] = .string(status)
        e.attrs["seal_reason"] = .string(reason)
        counts[status, default: 0] += 1
        context.count(status)
        context.audit(.about(e, decision: status, reason: reason,
                             details: ["filename": .string(name), "signer": e.attrs["seal_signer"] ?? .string(""),
                                       "surface": e.attrs["seal_surface"] ?? .string("")]))
        context.emit(e, to: status == "trusted-fork" ? trusted : status == "triage-fork" ? triage : invalid)
    }

    public var tickInterval: UInt64? { 1_000_000_000 }
    public func tick(context: any StageContext) throws { for (k, v) in counts { context.report(k, .int(Int64(v))) } }
    public func drain(context: any StageContext) throws { try tick(context: context) }
}

/// `reseal-sink`: the outbox. Seals each envelope's content (forward state: reseal candidates,
/// trusted forks) into a new container signed with this host's key, writes it to the outbox
/// (never overwriting; written whole, then fsynced), then moves the original inbox file into
/// `archive_dir`. Each step is audited; a failure leaves the original where it was.
public final class ResealSinkStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "reseal-sink",
        summary: "Seals forward state into the outbox with this host's Ed25519 key, then archives the original.",
        role: .sink,
        inputs: [InputPort("in", doc: "forward state to reseal (payload = content, `filename` = its name)")],
        fields: [
            ConfigField("dir", .string, default: .string("outbox"), doc: "The outbox directory (created if missing)."),
            ConfigField("key", .string, doc: "The signing key file (`signing.key` from `pipehost keygen`)."),
            ConfigField("create_key", .bool, default: .bool(false), doc: "Generate the key file (mode 0600, with a `.pub` beside it) when it does not exist."),
            ConfigField("profile", .string, default: .string("continuity"), doc: "The surface profile of resealed trusted forks (verified containers)."),
            ConfigField("candidate_profile", .string, default: .string("unverified"),
                        doc: "The surface profile of resealed content that was never verified (reseal candidates: JSON from anyone who can write to the inbox), so a peer that expects `profile` does not trust it as if verified."),
            ConfigField("archive_dir", .string, default: .string("archive"), doc: "Where the original inbox file is moved after its reseal."),
        ],
        make: { ResealSinkStage(config: $0) })

    let dirSpec: String, keySpec: String, createKey: Bool, profile: String, candidateProfile: String, archiveSpec: String
    var key: SigningKey?
    var outbox = ""
    var archive: FileMoveAction?
    var resealed = 0, failed = 0, archived = 0

    init(config c: ConfigReader) {
        dirSpec = c.string("dir") ?? "outbox"; keySpec = c.string("key") ?? ""; createKey = c.bool("create_key") ?? false
        profile = c.string("profile") ?? "continuity"; candidateProfile = c.string("candidate_profile") ?? "unverified"; archiveSpec = c.string("archive_dir") ?? "archive"
    }

    public func start(context: any StageContext) throws {
        outbox = context.resolvePath(dirSpec)
        try FS.mkdirs(outbox)
        let a = context.resolvePath(archiveSpec)
        try FS.mkdirs(a)
        archive = FileMoveAction(dir: a)
        let kp = context.resolvePath(keySpec)
        do {
            let (k, created) = try KeyFiles.loadOrCreateSigningKey(kp, create: createKey)
            if created { context.logger.notice("reseal-sink: generated signing key \(kp) (key id \(Hex.encode(k.keyID)))") }
            key = k
        } catch { throw StageError.halt("reseal-sink key: \(error)") }
        context.report("outbox", .string(outbox))
        context.report("key_id", .string(key.map { Hex.encode($0.keyID) } ?? ""))
    }

    public func process(_ e: Envelope, from arrival: Arrival, context: any StageContext) throws {
        guard let key, let archive else { return }
        let name = e.attrs["filename"]?.stringValue ?? e.id.description
        let base = (name as NSString).lastPathComponent
        let outName = Sniff.sealedExtensions.contains(Sniff.extensionOf(base)) ? base : base + ".tza"
        // Only a verified container keeps the trusted profile; anything else is marked unverified.
        let surfaceProfile = e.attrs["seal_status"]?.stringValue == "trusted-fork" ? profile : candidateProfile
        let sealed: [UInt8]
        do {
            sealed = try SealedContainer.seal(files: [(path: base.isEmpty || base == "." || base == ".." ? "payload" : base, mode: 0o644, data: e.payload)],
                                              surfaceName: outName, profile: surfaceProfile, key: key, createdNs: context.wallClockNs)
        } catch {
            failed += 1; context.count("move_failed")
            context.audit(.about(e, decision: "move-failed", reason: "cannot seal: \(error)", details: ["wanted": .string("reseal")]))
            return
        }
        switch Mover.write(sealed, in: outbox, name: Array(outName.utf8)) {
        case .failure(let why):
            failed += 1; context.count("move_failed")
            context.logger.warning("reseal of \(name) failed: \(why)")
            context.audit(.about(e, decision: "move-failed", reason: "cannot write to the outbox: \(why); the original stays where it was",
                                 details: ["wanted": .string("reseal"), "filename": .string(name)]))
            return
        case .success(let to):
            resealed += 1; context.count("resealed")
            context.audit(.about(e, decision: "reseal", reason: "sealed forward state with key \(Hex.encode(key.keyID))",
                                 details: ["filename": .string(name), "to": .string(to), "surface": .string(outName),
                                           "profile": .string(surfaceProfile), "bytes": .int(Int64(sealed.count))]))
        }
        if e.attrs["inbox_dir"] != nil {
            IntakeAudit.record(archive.apply(e), e, decision: "archive", context: context, moved: &archived, failed: &failed)
        }
    }

    public var tickInterval: UInt64? { 1_000_000_000 }
    public func tick(context: any StageContext) throws {
        context.report("resealed", .int(Int64(resealed))); context.report("archived", .int(Int64(archived)))
        context.report("move_failed", .int(Int64(failed)))
    }
    public func drain(context: any StageContext) throws { try tick(context: context) }
}
