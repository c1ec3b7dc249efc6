import ArgumentParser
import Foundation
import PipeAudit
import PipeKit
import PipeSeal

struct Audit: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify, read, export and back up a hash-chained audit log (docs/audit-log.md).",
        discussion: "DB is an audit log file (audit.db in a run directory). Left out, it is the running host's log, found as for `pipectl status`.",
        subcommands: [AuditVerify.self, AuditTail.self, AuditExport.self, AuditBackup.self])
}

/// Where the log is: the argument, or the running host's (asked over the control endpoint).
struct AuditSource: ParsableArguments {
    @Argument(help: "The audit log (default: the running host's).") var db: String?
    @OptionGroup var host: HostOptions

    func path() -> String { Self.path(db: db, host: host) }

    static func path(db: String?, host: HostOptions) -> String {
        if let db { return db }
        let st = host.call("status")
        guard let p = st["host"]?["audit"]?["path"]?.stringValue, !p.isEmpty else {
            fail("pipectl: the running host did not say where its audit log is; pass the file (audit.db in its run directory)", code: 64)
        }
        return p
    }

    func reader() -> AuditReader { Self.reader(path()) }

    static func reader(_ p: String) -> AuditReader {
        do { return try AuditReader(path: p) } catch { fail("pipectl: \(error)") }
    }
}

extension AuditRecord {
    /// One line for people: time, stage, decision, envelope, reason.
    func line(seq: Int64) -> String {
        let env = envelope.map { String($0.description.prefix(12)) } ?? "-"
        let seqText = String(seq)
        return "\(String(repeating: " ", count: max(0, 7 - seqText.count)))\(seqText)  \(RFC3339.format(ns: Int64(clamping: timeNs)))  \(stage.isEmpty ? "-" : stage)  \(decision)  \(env)  \(reason)"
    }

    /// The JSONL export form: seq and hash, then the provenance layers.
    func exportJSON(seq: Int64, hash: [UInt8]) -> ConfigValue {
        guard case .map(let o) = json else { return json }
        return .map([ConfigEntry(key: "seq", value: .int(seq)), ConfigEntry(key: "hash", value: .string(Hex.encode(hash)))] + o)
    }
}

struct AuditVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check the whole chain and every checkpoint signature.",
        discussion: """
            Names the first bad sequence number for an edited, deleted, inserted or reordered record; checks each \
            checkpoint's Ed25519 signature (against --pub when given, else the key recorded in the log: integrity, not \
            trust) and that the chain still reaches its head; reports the records after the last valid checkpoint as \
            unanchored (a deleted tail looks the same as one never written). Exit 0: intact; 1: broken; 64: usage. \
            With --strict, unanchored records also exit 1.
            """)
    @OptionGroup var source: AuditSource
    @Option(name: .customLong("pub"), help: "The checkpoint signer's public key: 64 hex digits or a .pub file (audit.pub).") var pub: String?
    @Flag(help: "Treat unanchored records as a failure.") var strict = false
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        var key: [UInt8]?
        if let p = pub {
            do { key = try KeyFiles.loadPublicKey(p) } catch { fail("pipectl audit verify: --pub \(p): \(error)", code: 64) }
        }
        let path = source.path()
        // Without --pub, the audit.pub the host wrote beside the log (when there) pins the signer:
        // a swapped key in the log's own meta table then shows.
        var pinnedBeside = false
        let beside = (path as NSString).deletingLastPathComponent + "/audit.pub"
        if key == nil, FileManager.default.fileExists(atPath: beside), let k = try? KeyFiles.loadPublicKey(beside) { key = k; pinnedBeside = true }
        let r: VerifyReport
        do { r = try AuditVerifier.verify(path: path, publicKey: key) } catch { fail("pipectl audit verify: \(error)") }
        let rate = r.seconds > 0 ? Double(r.records) / r.seconds : 0
        let nothingAnchored = r.records > 0 && r.lastGoodCheckpoint == 0
        let failed = !r.ok || nothingAnchored || (strict && r.unanchored > 0)
        if json {
            printJSON(.object([
                ("file", .string(path)), ("ok", .bool(!failed)), ("records", .int(Int64(r.records))), ("last_seq", .int(r.lastSeq)),
                ("first_bad_seq", r.firstBad.map { .int($0.seq) } ?? .null), ("first_bad_reason", r.firstBad.map { .string($0.reason) } ?? .null),
                ("breaks", .int(Int64(r.breaks))), ("checkpoints", .int(Int64(r.checkpoints))),
                ("bad_checkpoints", .list(r.badCheckpoints.map { .object([("seq", .int($0.seq)), ("reason", .string($0.reason))]) })),
                ("last_valid_checkpoint", .int(r.lastGoodCheckpoint)), ("unanchored", .int(r.unanchored)),
                ("signer", r.signer.map { .string($0) } ?? .null), ("pinned", .bool(r.pinned)),
                ("pinned_by", .string(pub != nil ? "--pub" : pinnedBeside ? "audit.pub beside the log" : "nothing: the key recorded in the log")),
                ("seconds", .double(r.seconds)), ("records_per_s", .double(rate)),
            ]))
        } else {
            print("\(path): \(r.records) records (last seq \(r.lastSeq)), \(r.checkpoints) checkpoint(s)")
            if let b = r.firstBad {
                print("chain: BROKEN at seq \(b.seq): \(b.reason)" + (r.breaks > 1 ? " (\(r.breaks) breaks in all)" : ""))
            } else {
                print("chain: intact")
            }
            for c in r.badCheckpoints { print("checkpoint: BAD at seq \(c.seq): \(c.reason)") }
            let valid = r.checkpoints - r.badCheckpoints.count
            let how = pub != nil ? " (pinned with --pub)" : pinnedBeside ? " (pinned with the audit.pub beside the log; --pub pins a copy you keep elsewhere)"
                : " (only the key recorded in the log: proves the file is undamaged, not who wrote it; pass --pub)"
            let who = r.signer.map { "\(String($0.prefix(16)))…" + how } ?? "no key"
            print("checkpoints: \(valid) valid" + (r.lastGoodCheckpoint > 0 ? ", last at seq \(r.lastGoodCheckpoint)" : "") + "; signer \(who)")
            print("unanchored: \(r.unanchored) record(s) after the last valid checkpoint" + (r.unanchored > 0 ? " (the chain cannot show these were not rewritten or cut)" : ""))
            if nothingAnchored { print("no valid checkpoint: nothing in this log is anchored") }
            print(String(format: "verified in %.3f s (%.0f records/s)", r.seconds, rate))
            print(failed ? "FAILED" : "OK")
        }
        if failed { throw ExitCode(1) }
    }
}

struct AuditTail: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "tail", abstract: "Print the last records (and, with --follow, new ones as they are appended).")
    @OptionGroup var source: AuditSource
    @Option(name: .short, help: "How many records.") var n = 20
    @Flag(name: .shortAndLong, help: "Keep printing records as they are appended (Ctrl-C stops).") var follow = false
    @Flag(help: "One JSON object per record (the export form).") var json = false

    func validate() throws { if n < 0 { throw ValidationError("-n must be 0 or more") } }

    func run() throws {
        let r = source.reader()
        var next: Int64, last: Int64
        do { last = try r.lastSeq() } catch { fail("pipectl audit tail: \(error)") }
        next = max(1, last - Int64(n) + 1)
        if n == 0 { next = last + 1 }
        repeat {
            do {
                try r.forEach(from: next) { e in
                    // Without --follow: exactly the last n as of the start, though the log grows.
                    if !follow && e.seq > last { return false }
                    let text = json ? JSON.serialize(e.record.exportJSON(seq: e.seq, hash: e.hash)) : e.record.line(seq: e.seq)
                    // Unbuffered under --follow, so a pipe sees each record as it lands.
                    if follow { FileHandle.standardOutput.write(Data((text + "\n").utf8)) } else { print(text) }
                    next = e.seq + 1
                    return true
                }
            } catch { fail("pipectl audit tail: \(error)") }
            if follow { usleep(200_000) }
        } while follow
    }
}

struct AuditExport: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Write the log's records in another form.",
        discussion: """
            jsonl: one object per record (seq, hash and the four provenance layers). gateway-event.v1: one record per             executed cap and per cap the mux refused (the contract `pipectl events validate` checks). governance: one             document (questions, trust foundation, actor/provider/model links, continuation graph, usage events). cbom: one             document (documents, canonical surfaces, surface status, authority, material facts, continuity, SoM events).             Each is built from the log alone (docs/audit-log.md, "Exports"); records are marked signed only when a valid             checkpoint covers them, and verified only when the signer was pinned with --pub.
            """)
    enum Format: String, ExpressibleByArgument, CaseIterable { case jsonl, gatewayEventV1 = "gateway-event.v1", governance, cbom }
    @OptionGroup var source: AuditSource
    @Option(help: "jsonl | gateway-event.v1 | governance | cbom") var format: Format = .jsonl
    @Option(help: "First sequence number (jsonl).") var from: Int64 = 1
    @Option(name: .customLong("pub"), help: "The checkpoint signer's public key, to mark anchored records verified.") var pub: String?

    func run() throws {
        let r = source.reader()
        var out: [UInt8] = []
        out.reserveCapacity(1 << 20)
        func line(_ v: ConfigValue) {
            JSON.write(v, into: &out)
            out.append(0x0A)
            if out.count >= 1 << 20 { FileHandle.standardOutput.write(Data(out)); out.removeAll(keepingCapacity: true) }
        }
        do {
            if format == .jsonl {
                try r.forEach(from: from) { e in line(e.record.exportJSON(seq: e.seq, hash: e.hash)); return true }
            } else {
                var key: [UInt8]?
                if let p = pub {
                    do { key = try KeyFiles.loadPublicKey(p) } catch { fail("pipectl audit export: --pub \(p): \(error)", code: 64) }
                }
                let views = AuditViews(reader: r, report: try AuditVerifier.verify(path: r.path, publicKey: key))
                switch format {
                case .gatewayEventV1: try views.gatewayEvents { line($0) }
                case .governance: line(try views.governance())
                case .cbom: line(try views.cbom())
                case .jsonl: break
                }
            }
        } catch { fail("pipectl audit export: \(error)") }
        FileHandle.standardOutput.write(Data(out))
    }
}

struct AuditBackup: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Make a consistent copy of a (live) audit log with SQLite's online backup API.",
        discussion: "The copy verifies on its own (`pipectl audit verify DEST`). DEST must not exist.")
    @Argument(help: "The file to write.") var dest: String
    @Option(help: "The audit log to copy (default: the running host's).") var db: String?
    @OptionGroup var host: HostOptions

    func run() throws {
        let src = AuditSource.path(db: db, host: host)
        do { try AuditLog.backup(src, to: dest) } catch { fail("pipectl audit backup: \(error)") }
        print("backed up \(src) to \(dest)")
    }
}

struct Trace: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print an envelope's lineage from the audit log: ancestors, every decision on the way, forks and follow-ups.",
        discussion: "ENVELOPE_ID is the 32-hex id (a unique prefix of at least 8 digits is enough).")
    @Argument(help: "The envelope id.") var envelope: String
    @Option(help: "The audit log (default: the running host's).") var db: String?
    @OptionGroup var host: HostOptions
    @Flag(help: "Print the lineage as JSON.") var json = false

    func run() throws {
        let want = envelope.lowercased()
        guard want.count >= 8, want.count <= 32, want.allSatisfy({ $0.isHexDigit }) else {
            fail("pipectl trace: ENVELOPE_ID must be 8 to 32 hex digits (got '\(envelope)')", code: 64)
        }
        let r = AuditSource.reader(AuditSource.path(db: db, host: host))
        var about: [EnvelopeID: [AuditReader.Entry]] = [:]
        var parentsOf: [EnvelopeID: Set<EnvelopeID>] = [:]
        var childrenOf: [EnvelopeID: Set<EnvelopeID>] = [:]
        var matches: Set<EnvelopeID> = []
        do {
            try r.forEach { e in
                guard let id = e.record.envelope else { return true }
                about[id, default: []].append(e)
                if id.description.hasPrefix(want) { matches.insert(id) }
                for p in e.record.parents {
                    parentsOf[id, default: []].insert(p)
                    childrenOf[p, default: []].insert(id)
                }
                return true
            }
        } catch { fail("pipectl trace: \(error)") }
        for (p, _) in childrenOf where p.description.hasPrefix(want) { matches.insert(p) }
        guard let id = matches.first else { fail("pipectl trace: no record in \(r.path) mentions an envelope \(want)…") }
        if matches.count > 1 { fail("pipectl trace: '\(want)' matches \(matches.count) envelopes; give more digits", code: 64) }

        // Ancestors: follow parents upward (bounded, cycle-safe).
        var ancestors: [EnvelopeID] = []
        var seen: Set<EnvelopeID> = [id]
        var frontier = Array(parentsOf[id] ?? [])
        while let p = frontier.popLast(), ancestors.count < 10_000 {
            guard seen.insert(p).inserted else { continue }
            ancestors.append(p)
            frontier.append(contentsOf: parentsOf[p] ?? [])
        }
        // Descendants, depth-first with their depth.
        var descendants: [(EnvelopeID, Int)] = []
        var stack: [(EnvelopeID, Int)] = (childrenOf[id] ?? []).sorted().map { ($0, 1) }
        while let (c, d) = stack.popLast(), descendants.count < 10_000 {
            guard seen.insert(c).inserted else { continue }
            descendants.append((c, d))
            stack.append(contentsOf: (childrenOf[c] ?? []).sorted().reversed().map { ($0, d + 1) })
        }
        if json {
            func decisions(_ e: EnvelopeID) -> ConfigValue { .list((about[e] ?? []).map { $0.record.exportJSON(seq: $0.seq, hash: $0.hash) }) }
            printJSON(.object([
                ("envelope", .string(id.description)),
                ("parents", .list((parentsOf[id] ?? []).sorted().map { .string($0.description) })),
                ("ancestors", .list(ancestors.map { .object([("envelope", .string($0.description)), ("decisions", decisions($0))]) })),
                ("decisions", decisions(id)),
                ("descendants", .list(descendants.map { .object([("envelope", .string($0.0.description)), ("depth", .int(Int64($0.1))),
                                                                 ("parents", .list((parentsOf[$0.0] ?? []).sorted().map { .string($0.description) })),
                                                                 ("decisions", decisions($0.0))]) })),
            ]))
            return
        }
        func show(_ e: EnvelopeID, indent: String) {
            for x in about[e] ?? [] { print(indent + x.record.line(seq: x.seq).trimmingCharacters(in: .whitespaces).replacingOccurrences(of: "  ", with: "  ")) }
            if (about[e] ?? []).isEmpty { print(indent + "(no decision recorded about it)") }
        }
        print("envelope \(id)")
        if !ancestors.isEmpty {
            print("ancestors (nearest first):")
            for a in ancestors { print("  \(a)"); show(a, indent: "    ") }
        }
        print("decisions:")
        show(id, indent: "  ")
        if !descendants.isEmpty {
            print("descendants (forks and follow-ups):")
            for (c, d) in descendants {
                let pad = String(repeating: "  ", count: d)
                print("\(pad)\(c)")
                show(c, indent: pad + "  ")
            }
        }
    }
}
