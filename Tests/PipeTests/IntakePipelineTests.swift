import Testing
import Foundation
import PipeKit
import PipeSeal
@testable import IntakeStages

/// Lists a directory (empty when missing).
private func ls(_ dir: String) -> Set<String> { Set((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []) }

private func auditLines(_ run: String) throws -> [ConfigValue] {
    try auditJSONL(run).split(separator: "\n").map { try JSON.parse(String($0)) }
}
private func decision(_ a: ConfigValue) -> String { a["erin"]?["decision"]?.stringValue ?? "" }
private func filename(_ a: ConfigValue) -> String { a["details"]?["filename"]?.stringValue ?? "" }

/// Where each file of the scenario mix must land (CONCEPTS.md's table, after verification).
private func expectedHome(_ name: String) -> String {
    switch name.split(separator: "-").first.map(String.init) ?? "" {
    case "capsule", "data": return "archive"      // resealed into the outbox, original archived
    case "report", "demo": return "triage"
    case "tampered", "note", "empty": return "reject"
    default: return "quarantine"                   // x (ELF), random, upload (staged), burst (rewritten)
    }
}

extension ExclusivePipelines {
    @Suite("Continuity intake: running pipelines", .serialized)
    struct IntakePipelineTests {
        @Test func continuityInbox_everyFileLandsWhereTheTableSays_eachAudited() throws {
            let run = Paths.tempDir("continuity")
            let (r, s) = try runPipeline(Paths.root + "/pipelines/continuity-inbox.yaml", runDir: run, timeout: 90)
            #expect(r.status == 0, "\(r.stderr)")
            let drops = try String(contentsOfFile: run + "/dropped.jsonl", encoding: .utf8).split(separator: "\n")
                .compactMap { try? JSON.parse(String($0)) }
            let dropped = drops.compactMap { $0["attrs"]?["filename"]?.stringValue }
            #expect(dropped.count == 33)
            // A rewritten file is one arrival when its three writes fit in the inbox's coalesce
            // window (100 ms here). A writer held up longer (a loaded machine) may make several:
            // an arrival read while the writer goes on is left in place as changed since it was
            // read, or is filed (its name gone, the next write makes a new file, a new arrival).
            let maySplit = Set(drops.filter { ($0["attrs"]?["write_spread_ms"]?.doubleValue ?? 0) > 100 }
                .compactMap { $0["attrs"]?["filename"]?.stringValue })
            #expect(drops.allSatisfy { $0["attrs"]?["write_spread_ms"]?.doubleValue != nil })
            #expect(ls(run + "/inbox").isEmpty)
            let audits = try auditLines(run)
            // Every arrival was classified once and moved once (or, for a split rewrite, left in
            // place as changed since it was read), with an audit record for each.
            var extraArrivals = 0, leftInPlace = 0
            for name in dropped {
                let mine = audits.filter { filename($0) == name }
                let classes = mine.filter { decision($0) == "classify" }.map { $0["details"]?["intake_class"]?.stringValue ?? "" }
                let failed = mine.filter { decision($0) == "move-failed" }.count
                let moves = mine.map(decision).filter { ["quarantine", "triage", "reject", "archive"].contains($0) }
                var home = expectedHome(name)
                if maySplit.contains(name) {
                    // A split rewrite is several arrivals. Each was either filed or left in place;
                    // the last one is filed. One read right after a truncation was classified
                    // empty, as its audit record says, and filed where empty files go.
                    #expect(!classes.isEmpty && classes.count == moves.count + failed, "\(name): \(mine.map(decision))")
                    for d in moves { #expect(ls(run + "/" + d).contains(name), "\(name) should be in \(d)/ as audited") }
                    if classes.last == "empty" { home = "reject" }
                } else {
                    #expect(classes.count == 1, "\(name): \(mine.map(decision))")
                    #expect(failed == 0, "\(name): \(mine.map(decision))")
                    #expect(moves.count == 1, "\(name): \(mine.map(decision))")
                }
                #expect(ls(run + "/" + home).contains(name), "\(name) should be in \(home)/")
                extraArrivals += max(0, classes.count - 1)
                leftInPlace += failed
            }
            #expect(ls(run + "/outbox") == Set((1...3).flatMap { ["capsule-\($0).tza", "data-\($0).json.tza"] }))
            let forks = audits.filter { ["trusted-fork", "triage-fork", "reject-invalid"].contains(decision($0)) }
            #expect(Dictionary(grouping: forks, by: decision).mapValues(\.count) == ["trusted-fork": 3, "triage-fork": 3, "reject-invalid": 3])
            #expect(audits.filter { decision($0) == "move-failed" }.count == leftInPlace)
            #expect(stage(s, "sniff")?["received"] == .int(Int64(33 + extraArrivals)))
        }

        @Test func filesDroppedIntoARunningIntake_landWhereTheTableSays() throws {
            let run = Paths.tempDir("live-intake")
            let keys = run + "/keys"
            try FileManager.default.createDirectory(atPath: keys, withIntermediateDirectories: true)
            let key = try SigningKey(seed: [UInt8](repeating: 3, count: 32))
            try KeyFiles.writeSecret(Hex.encode(key.publicKey), to: keys + "/sender.pub")
            // The example pipeline with its simulator removed: the test is the outside writer.
            var yaml = try String(contentsOfFile: Paths.root + "/pipelines/continuity-inbox.yaml", encoding: .utf8)
            yaml = yaml.replacingOccurrences(of: #"(?s)  - id: drops.*?include_ingest: false \}\n"#, with: "", options: .regularExpression)
            yaml = yaml.replacingOccurrences(of: "low: 20, high: 60, idle_exit_ms: 1500", with: "low: 2, high: 6, idle_exit_ms: 0")
            yaml = yaml.replacingOccurrences(of: "trusted_keys: [ea4a6c63e29c520abef5507b132ec5f9954776aebebe7b92421eea691446d22c]", with: "trusted_keys: [keys/sender.pub]")
            yaml = yaml.replacingOccurrences(of: "interval_ms: 1000, scans: 3", with: "interval_ms: 200, scans: 0")
            #expect(!yaml.contains("kind: intake-sim"))
            let file = writeTemp(yaml, "live-intake.yaml")
            let p = try startPipeline(file, runDir: run)
            defer { if p.isRunning { p.terminate() } }
            let inbox = run + "/inbox"
            var waited = 0
            while !FileManager.default.fileExists(atPath: inbox) && waited < 200 { usleep(20_000); waited += 1 }
            var rng = SplitMix64(state: 5)
            let mix = try IntakeSimStage.mix(round: 1, key: key, profile: "continuity", rng: &rng, wallNs: 1)
            func put(_ name: String, _ bytes: [UInt8]) { writeClosed(bytes, inbox + "/" + name) }
            for d in mix where d.style == .plain { put(d.name, d.content) }
            // The upload is staged, then renamed well after the coalescing window.
            let upload = mix.first { $0.style == .staged }
            put("upload-1.csv.part", upload?.content ?? [])
            // The same name written three times quickly.
            for i in 1...3 { put("burst-1.log", Array("version \(i)\n".utf8)) }
            // The same name rewritten in place with pauses longer than the coalesce window (100 ms):
            // several arrivals, each read whole and filed (or left in place when it changed since
            // it was read), none overwriting another.
            for i in 1...3 {
                if i > 1 { usleep(300_000) }
                #expect(IntakeSimStage.write(Array("slow \(i) of 3\n".utf8), to: inbox + "/slow-1.log") == nil)
            }
            usleep(400_000)
            #expect(ls(inbox).contains("upload-1.csv.part"))          // still waiting for its rename
            #expect(rename(inbox + "/upload-1.csv.part", inbox + "/upload-1.csv") == 0)
            let names = mix.map(\.name)
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline && !names.allSatisfy({ ls(run + "/" + expectedHome($0)).contains($0) }) { usleep(50_000) }
            for n in names { #expect(ls(run + "/" + expectedHome(n)).contains(n), "\(n) should be in \(expectedHome(n))/") }
            let slowFiled = { ls(run + "/quarantine").filter { $0.hasPrefix("slow-1.log") }.compactMap { FileManager.default.contents(atPath: run + "/quarantine/" + $0) } }
            while Date() < deadline && !slowFiled().contains(Data("slow 3 of 3\n".utf8)) { usleep(50_000) }
            // pipectl status shows the inbox depth and its watermark state.
            // (Stage reports travel with STATS every 100 ms: poll until the last move shows.)
            var inboxStatus: ConfigValue?
            for _ in 0..<50 {
                let status = try pipectlJSON(["status", "--run-dir", run])
                inboxStatus = status["stages"]?.listValue?.first { $0["id"]?.stringValue == "inbox" }?["status"]
                if inboxStatus?["inbox_depth"] == .int(0) { break }
                usleep(100_000)
            }
            #expect(inboxStatus?["inbox_depth"] == .int(0))
            #expect(["normal", "recovering"].contains(inboxStatus?["inbox_state"]?.stringValue ?? ""), "\(inboxStatus.map { JSON.serialize($0) } ?? "")")
            p.terminate()
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
            let audits = try auditLines(run)
            // One arrival for the staged upload (after the rename) and one for the rewritten name.
            #expect(audits.filter { decision($0) == "classify" && filename($0) == "upload-1.csv" }.count == 1)
            #expect(audits.filter { decision($0) == "classify" && filename($0).hasPrefix("upload-1.csv.") }.isEmpty)
            #expect(audits.filter { decision($0) == "classify" && filename($0) == "burst-1.log" }.count == 1)
            // The classify record says how the file arrived and how many events made the arrival.
            let burst = audits.first { decision($0) == "classify" && filename($0) == "burst-1.log" }?["details"]
            #expect((burst?["arrival_events"]?.intValue ?? 0) >= 1 && burst?["arrival"]?.stringValue == "event", "\(burst.map { JSON.serialize($0) } ?? "")")
            #expect(FileManager.default.contents(atPath: run + "/quarantine/burst-1.log") == Data("version 3\n".utf8))
            // The slow rewrite: every arrival was classified, and either filed under its own name
            // (slow-1.log, slow-1.log.1, ...) with the content it was classified with, or left in
            // place; the last version is filed; nothing is left in the inbox.
            let slow = audits.filter { filename($0) == "slow-1.log" }
            // (A read right after a truncation, before the write, is classified empty and
            // rejected: a window of microseconds, but a loaded machine can hit it.)
            let slowQuarantined = slow.filter { decision($0) == "quarantine" }.count
            let slowRejected = slow.filter { decision($0) == "reject" }.count
            let slowLeft = slow.filter { decision($0) == "move-failed" }.count
            let slowClassified = slow.filter { decision($0) == "classify" }
            #expect(slowClassified.count >= 2 && slowClassified.count == slowQuarantined + slowRejected + slowLeft, "\(slow.map(decision))")
            #expect(slowClassified.allSatisfy { ["unknown", "empty"].contains($0["details"]?["intake_class"]?.stringValue ?? "") },
                    "\(slowClassified.map { JSON.serialize($0) })")
            let filed = slowFiled()
            #expect(filed.count == slowQuarantined, "\(ls(run + "/quarantine"))")
            #expect(filed.contains(Data("slow 3 of 3\n".utf8)) && Set(filed).count == filed.count, "\(filed.map { String(decoding: $0, as: UTF8.self) })")
            #expect(!ls(inbox).contains("slow-1.log"))
            #expect(audits.first { decision($0) == "reject-invalid" }?["erachter"]?["reason"]?.stringValue == "block 0 signature does not verify")
            #expect(audits.first { decision($0) == "triage-fork" }?["erachter"]?["reason"]?.stringValue?.contains("surface name 'report-1.tza' but arrived as 'report-1.txt'") == true)
            // Eleven files at once pushed the inbox past high 6: the transitions are audited.
            let states = audits.filter { decision($0) == "inbox-state" }.compactMap { $0["erachter"]?["reason"]?.stringValue }
            #expect(states.contains { $0.hasPrefix("normal -> ") }, "\(states)")
            #expect(audits.contains { decision($0) == "police-finding" })
        }

        /// Root reads any file, so the host runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
        /// (setpriv, util-linux) and a mode-000 file is really unreadable to it.
        @Test func anUnreadableFile_isDeadLetteredWithTheReason_andStaysInTheInbox() throws {
            guard (try? runProcess("/usr/bin/setpriv", ["--bounding-set=-dac_override,-dac_read_search", "--", "/bin/true"], timeout: 10))?.status == 0 else {
                FileHandle.standardError.write(Data("unreadable-file test skipped: setpriv cannot drop capabilities here\n".utf8)); return
            }
            let dir = Paths.tempDir("unreadable")
            let inbox = dir + "/in"
            try FileManager.default.createDirectory(atPath: inbox, withIntermediateDirectories: true)
            try Data("{\"a\": 1}".utf8).write(to: URL(fileURLWithPath: inbox + "/ok.json"))
            try Data("secret".utf8).write(to: URL(fileURLWithPath: inbox + "/secret.bin"))
            chmod(inbox + "/secret.bin", 0)
            let yaml = """
                pipeline: unreadable
                stages:
                  - { id: inbox, kind: inbox, config: { dir: \(inbox), idle_exit_ms: 500 } }
                  - { id: sink, kind: file-sink, inputs: [inbox], config: { path: out.jsonl } }
                """
            let run = dir + "/run"
            let r = try runProcess("/usr/bin/setpriv", ["--bounding-set=-dac_override,-dac_read_search", "--", Paths.pipehost, "run", writeTemp(yaml, "unreadable.yaml"),
                                                        "--run-dir", run, "--summary-json", run + "/summary.json", "--quiet"], timeout: 60)
            #expect(r.status == 0, "\(r.stderr)")
            let dead = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8)
            #expect(dead.contains("secret.bin: cannot open: Permission denied; not taken in") && dead.contains("\"intake_error\":\"unreadable\""), "\(dead)")
            #expect(try String(contentsOfFile: run + "/out.jsonl", encoding: .utf8).contains("\"filename\":\"ok.json\""))
            #expect(FileManager.default.fileExists(atPath: inbox + "/secret.bin"))
            let audits = try auditLines(run)
            #expect(audits.contains { decision($0) == "dead-letter" && ($0["erachter"]?["reason"]?.stringValue ?? "").contains("secret.bin: cannot open") })
        }

        @Test func sealAndUnseal_fromTheCommandLine() throws {
            let d = Paths.tempDir("seal-cli")
            let keys = try runProcess(Paths.pipehost, ["keygen", "-o", d + "/keys"], timeout: 30)
            #expect(keys.status == 0)
            try FileManager.default.createDirectory(atPath: d + "/src/sub", withIntermediateDirectories: true)
            try "hello\n".write(toFile: d + "/src/a.txt", atomically: false, encoding: .utf8)
            try Data((0..<150_000).map { UInt8(truncatingIfNeeded: $0) }).write(to: URL(fileURLWithPath: d + "/src/sub/b.bin"))
            let seal = try runProcess(Paths.pipehost, ["seal", d + "/src", "--key", d + "/keys/signing.key", "-o", d + "/src.tza"], timeout: 30)
            #expect(seal.status == 0, "\(seal.stderr)")
            #expect(seal.stdout.contains("sealed 2 file(s)"))
            let ok = try runProcess(Paths.pipectl, ["unseal", d + "/src.tza", "--verify", "--pub", d + "/keys/signing.pub", "-o", d + "/out", "--json"], timeout: 30)
            #expect(ok.status == 0, "\(ok.stderr)")
            let v = try JSON.parse(ok.stdout)
            #expect(v["valid"] == .bool(true) && v["signer_trusted"] == .bool(true) && v["surface"] == .string("src.tza"))
            #expect(FileManager.default.contents(atPath: d + "/out/sub/b.bin") == FileManager.default.contents(atPath: d + "/src/sub/b.bin"))
            // A container signed by another key fails --pub; a flipped byte fails without it.
            let other = try runProcess(Paths.pipehost, ["keygen", "-o", d + "/other"], timeout: 30)
            #expect(other.status == 0)
            let wrongKey = try runProcess(Paths.pipectl, ["unseal", d + "/src.tza", "--verify", "--pub", d + "/other/signing.pub"], timeout: 30)
            #expect(wrongKey.status == 1 && wrongKey.stdout.contains("is not a trusted key"))
            var bytes = [UInt8](FileManager.default.contents(atPath: d + "/src.tza") ?? Data())
            bytes[bytes.count / 2] ^= 0x20
            try Data(bytes).write(to: URL(fileURLWithPath: d + "/bad.tza"))
            let bad = try runProcess(Paths.pipectl, ["unseal", d + "/bad.tza", "--verify", "-o", d + "/bad-out"], timeout: 30)
            #expect(bad.status == 1 && bad.stdout.contains("INVALID: block"))
            #expect(!FileManager.default.fileExists(atPath: d + "/bad-out/a.txt"))      // nothing unpacked
            let usage = try runProcess(Paths.pipectl, ["unseal", d + "/src.tza"], timeout: 30)
            #expect(usage.status != 0 && usage.stderr.contains("Usage"))
            // Sealing refuses symlinks and never overwrites without --force.
            try FileManager.default.createSymbolicLink(atPath: d + "/src/link", withDestinationPath: "/etc/hostname")
            let sym = try runProcess(Paths.pipehost, ["seal", d + "/src", "--key", d + "/keys/signing.key", "-o", d + "/x.tza"], timeout: 30)
            #expect(sym.status != 0 && sym.stderr.contains("is a symlink"))
            try FileManager.default.removeItem(atPath: d + "/src/link")
            let again = try runProcess(Paths.pipehost, ["seal", d + "/src", "--key", d + "/keys/signing.key", "-o", d + "/src.tza"], timeout: 30)
            #expect(again.status != 0 && again.stderr.contains("exists"))
        }
    }
}
