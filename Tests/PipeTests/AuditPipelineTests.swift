import Foundation
import PipeAudit
import PipeKit
import PipeStore
import Testing

@Suite("Audit log: pipelines and pipectl", .serialized)
struct AuditPipelineTests {
    static let twin = Paths.root + "/pipelines/twin-guard.yaml"

    @Test func aFinishedRun_verifies_tails_exports_traces_andCatchesAnEdit() throws {
        let run = Paths.tempDir("audit-run")
        let (r, _) = try runPipeline(Self.twin, runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        let db = run + "/audit.db"
        // Closed with a final checkpoint: nothing unanchored; the key was made for the run.
        let ok = try runProcess(Paths.pipectl, ["audit", "verify", db, "--pub", run + "/audit.pub", "--strict"], timeout: 60)
        #expect(ok.status == 0, "\(ok.stdout)\(ok.stderr)")
        #expect(ok.stdout.contains("chain: intact") && ok.stdout.contains("(pinned with --pub)") && ok.stdout.contains("unanchored: 0 record(s)"))
        let key = try #require(try? String(contentsOfFile: run + "/audit.key", encoding: .utf8))
        #expect(!key.isEmpty)
        let mode = (try FileManager.default.attributesOfItem(atPath: run + "/audit.key")[.posixPermissions] as? Int) ?? 0
        #expect(mode == 0o600)
        let v = try pipectlJSON(["audit", "verify", db])
        let records = try #require(v["records"]?.intValue)
        // Without --pub, the audit.pub the host wrote beside the log pins the signer.
        #expect(records >= 2000 && v["ok"] == .bool(true) && v["pinned"] == .bool(true) && v["pinned_by"] == .string("audit.pub beside the log"))

        // export: every record, in order, with seq and hash; the JSONL form of each record.
        let export = try runProcess(Paths.pipectl, ["audit", "export", db, "--format", "jsonl"], timeout: 60)
        let lines = try export.stdout.split(separator: "\n").map { try JSON.parse(String($0)) }
        #expect(lines.count == Int(records))
        #expect(lines.map { $0["seq"]?.intValue ?? 0 } == Array(1...records))
        #expect(lines.allSatisfy { ($0["hash"]?.stringValue?.count ?? 0) == 64 && $0["erin"]?["decision"]?.stringValue != nil })
        // A twin run has no executions: governance answers from its decisions alone.
        let gov = try runProcess(Paths.pipectl, ["audit", "export", db, "--format", "governance"], timeout: 30)
        let g = try JSON.parse(gov.stdout)["governance"]
        #expect(gov.status == 0 && g?["trust_foundation"]?["chain"] == .string("intact") && g?["usage_events"]?.listValue?.isEmpty == true)
        #expect(g?["questions"]?.listValue?[1]["answer"]?["allow"]?.intValue.map { $0 > 1000 } == true)

        // tail: the last three, one line each, the last one being the last seq.
        let tail = try runProcess(Paths.pipectl, ["audit", "tail", db, "-n", "3"], timeout: 30)
        let tl = tail.stdout.split(separator: "\n")
        #expect(tl.count == 3 && tl.last?.trimmingCharacters(in: .whitespaces).hasPrefix("\(records) ") == true, "\(tail.stdout)")

        // trace: an intent's decision and its parents (the physical and twin states it was judged on).
        let decision = try #require(lines.first { $0["erin"]?["decision"]?.stringValue == "block" })
        let intent = try #require(decision["erin"]?["envelope"]?.stringValue)
        let parents = decision["eraan"]?["parents"]?.listValue?.compactMap(\.stringValue) ?? []
        #expect(parents.count == 2)
        let t = try pipectlJSON(["trace", intent, "--db", db])
        #expect(t["envelope"]?.stringValue == intent)
        #expect(Set(t["parents"]?.listValue?.compactMap(\.stringValue) ?? []) == Set(parents))
        #expect(t["decisions"]?.listValue?.first?["erin"]?["decision"]?.stringValue == "block")
        // From a parent: the intent shows up as a descendant, by a unique prefix.
        let fromParent = try runProcess(Paths.pipectl, ["trace", String(parents[0].prefix(12)), "--db", db], timeout: 30)
        #expect(fromParent.status == 0 && fromParent.stdout.contains("descendants") && fromParent.stdout.contains(intent), "\(fromParent.stdout)\(fromParent.stderr)")
        let badID = try runProcess(Paths.pipectl, ["trace", "zz", "--db", db], timeout: 30)
        #expect(badID.status == 64 && badID.stderr.contains("8 to 32 hex digits"))

        // An edit is found, by seq, with exit 1.
        let edited = Paths.tempDir("audit-run-edit") + "/audit.db"
        let copy = try runProcess(Paths.pipectl, ["audit", "backup", edited, "--db", db], timeout: 60)
        #expect(copy.status == 0, "\(copy.stderr)")
        let w = try Database(path: edited)
        try w.execute("DROP TRIGGER records_no_update")
        let seq = decision["seq"]?.intValue ?? 0
        let get = try w.prepare("SELECT rec FROM records WHERE seq = ?")
        try get.bind([.int(seq)]); _ = try get.step()
        var bytes = get.blob(0)
        let at = try #require(Array(bytes.indices).first { bytes[$0...].starts(with: Array("blocked".utf8)) })
        bytes.replaceSubrange(at..<(at + 7), with: Array("allowed".utf8))   // the reason now says "allowed"
        try w.prepare("UPDATE records SET rec = ? WHERE seq = ?").run([.blob(bytes), .int(seq)])
        let bad = try runProcess(Paths.pipectl, ["audit", "verify", edited, "--pub", run + "/audit.pub"], timeout: 60)
        #expect(bad.status == 1 && bad.stdout.contains("chain: BROKEN at seq \(decision["seq"]?.intValue ?? 0):") && bad.stdout.contains("FAILED"), "\(bad.stdout)")

        // Usage errors: a missing file, a bad key.
        let missing = try runProcess(Paths.pipectl, ["audit", "verify", run + "/nope.db"], timeout: 30)
        #expect(missing.status == 1 && missing.stderr.contains("nope.db"))
        let badKey = try runProcess(Paths.pipectl, ["audit", "verify", db, "--pub", "xyz"], timeout: 30)
        #expect(badKey.status == 64)
    }

    @Test func aLiveLog_isBackedUpConsistently_showsInStatus_andContinuesAcrossRuns() throws {
        let text = try String(contentsOfFile: Self.twin, encoding: .utf8)
            .replacingOccurrences(of: "count: 2000", with: "count: 0\n      rate: 2000")
            .replacingOccurrences(of: "audit: decisions", with: "audit: { level: decisions, checkpoint_every: 500, checkpoint_interval_s: 0.5 }")
        let file = writeTemp(text, "twin-guard.yaml")
        let run = Paths.tempDir("audit-live")
        let p = try startPipeline(file, runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(2)
        let st = try pipectlJSON(["status", "--run-dir", run])
        let a = try #require(st["host"]?["audit"])
        #expect(a["path"]?.stringValue == run + "/audit.db")
        #expect((a["head_seq"]?.intValue ?? 0) > 0 && (a["checkpoints"]?.intValue ?? 0) > 0 && a["last_error"] == .null, "\(a)")
        // Backed up while the writer appends: the copy verifies on its own.
        let dest = Paths.tempDir("audit-bak") + "/copy.db"
        let b = try runProcess(Paths.pipectl, ["audit", "backup", dest, "--run-dir", run], timeout: 60)
        #expect(b.status == 0, "\(b.stderr)")
        let cv = try pipectlJSON(["audit", "verify", dest, "--pub", run + "/audit.pub"])
        #expect(cv["ok"] == .bool(true) && (cv["records"]?.intValue ?? 0) > 0 && (cv["checkpoints"]?.intValue ?? 0) > 0)
        #expect(try runProcess(Paths.pipectl, ["audit", "backup", dest, "--run-dir", run], timeout: 30).status == 1)   // never overwrites
        // tail with the log found through the running host.
        let tail = try runProcess(Paths.pipectl, ["audit", "tail", "-n", "2", "--run-dir", run], timeout: 30)
        #expect(tail.status == 0 && tail.stdout.split(separator: "\n").count == 2, "\(tail.stderr)")
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        #expect(p.terminationStatus == 0)
        let first = try AuditVerifier.verify(path: run + "/audit.db")
        #expect(first.ok && first.unanchored == 0)

        // The next run in the same directory extends the same chain under the same key.
        let bounded = writeTemp(text.replacingOccurrences(of: "count: 0\n      rate: 2000", with: "count: 100"), "twin-guard.yaml")
        let (r2, _) = try runPipeline(bounded, runDir: run)
        #expect(r2.status == 0, "\(r2.stderr)")
        let second = try AuditVerifier.verify(path: run + "/audit.db", publicKey: try KeyFilesTesting.pub(run))
        #expect(second.ok && second.records >= first.records + 100 && second.unanchored == 0 && second.checkpoints > first.checkpoints)

        // Another pipeline pointed at this log is refused before it starts.
        let other = writeTemp(text.replacingOccurrences(of: "pipeline: twin-guard", with: "pipeline: someone-else"), "someone-else.yaml")
        let r3 = try runProcess(Paths.pipehost, ["run", other, "--run-dir", run, "--quiet"], timeout: 60)
        #expect(r3.status != 0 && r3.stderr.contains("belongs to pipeline 'twin-guard', not 'someone-else'"), "\(r3.stderr)")
    }

    @Test func aWorkerProcess_auditsIntoTheHostsOneLog() throws {
        let text = try String(contentsOfFile: Self.twin, encoding: .utf8)
            .replacingOccurrences(of: "count: 2000", with: "count: 300")
            .replacingOccurrences(of: "    kind: twin\n", with: "    kind: twin\n    placement: process\n")
        #expect(text.contains("placement: process"))
        let run = Paths.tempDir("audit-worker")
        let (r, _) = try runPipeline(writeTemp(text, "twin-guard.yaml"), runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        var decisions: [AuditRecord] = []
        try AuditReader(path: run + "/audit.db").forEach { e in
            if e.record.decision == "allow" || e.record.decision == "block" { decisions.append(e.record) }
            return true
        }
        #expect(decisions.count == 300)
        #expect(decisions.allSatisfy { $0.stage == "guard" && $0.location.hasPrefix("worker:") }, "\(decisions.first?.location ?? "")")
        let v = try AuditVerifier.verify(path: run + "/audit.db", publicKey: try KeyFilesTesting.pub(run))
        #expect(v.ok && v.unanchored == 0)
    }

    /// The continuity bill of materials from an intake run's log: each scenario file with its
    /// surface status, signer and moves.
    @Test func cbom_fromAnIntakeRun() throws {
        let run = Paths.tempDir("audit-cbom")
        let (r, _) = try runPipeline(Paths.root + "/pipelines/continuity-inbox.yaml", runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        let out = try runProcess(Paths.pipectl, ["audit", "export", run + "/audit.db", "--format", "cbom"], timeout: 60)
        #expect(out.status == 0, "\(out.stderr)")
        let c = try #require(try JSON.parse(out.stdout)["cbom"])
        func status(_ doc: String) -> String? { c["surface_status"]?.listValue?.first { $0["document"]?.stringValue == doc }?["status"]?.stringValue }
        #expect(status("capsule-1.tza") == "trusted-fork")
        #expect(status("report-1.txt") == "triage-fork")
        #expect(status("tampered-1.tza") == "reject-invalid")
        #expect(status("x-1.tza") == "unsealed")
        let surface = c["canonical_surface"]?.listValue?.first { $0["document"] == .string("report-1.txt") }
        #expect(surface?["surface"] == .string("report-1.tza") && surface?["matches_name"] == .bool(false))
        #expect(c["authority"]?.listValue?.contains { $0["document"] == .string("capsule-1.tza") && $0["signer_key_id"]?.stringValue?.count == 16 } == true)
        let moves = c["continuity"]?.listValue?.first { $0["document"] == .string("x-1.tza") }?["moves"]?.listValue ?? []
        #expect(moves.count == 1 && moves[0]["decision"] == .string("quarantine"))
        let facts = c["material_facts"]?.listValue?.first { $0["document"] == .string("x-1.tza") }
        #expect(facts?["intake_class"] == .string("executable"))
        #expect((c["som_events"]?.listValue?.count ?? 0) > 30)
    }

    @Test func auditSettings_areValidatedWithPositions() throws {
        let yaml = """
        pipeline: a
        audit: { level: sometimes, checkpoint_every: 0, colour: blue }
        stages:
          - { id: gen, kind: generator, config: { count: 1 } }
          - { id: out, kind: null-sink, inputs: [gen] }
        """
        let r = try runProcess(Paths.pipectl, ["validate", writeTemp(yaml, "a.yaml")], timeout: 30)
        #expect(r.status == 1)
        #expect(r.stdout.contains("a.yaml:2:17: audit.level must be `all` or `decisions`"), "\(r.stdout)")
        #expect(r.stdout.contains("audit.checkpoint_every must be an integer"))
        #expect(r.stdout.contains("unknown audit key 'colour'"))
    }
}

enum KeyFilesTesting {
    static func pub(_ run: String) throws -> [UInt8] {
        let text = try String(contentsOfFile: run + "/audit.pub", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        return try #require(Hex.decode(text))
    }
}
