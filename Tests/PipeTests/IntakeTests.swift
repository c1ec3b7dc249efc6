import Testing
import Foundation
import PipeKit
import PipeKitTesting
import PipeSeal
@testable import IntakeStages

private let demoKey: SigningKey = {
    do { return try SigningKey(seed: [UInt8](repeating: 7, count: 32)) } catch { fatalError("\(error)") }
}()
private let otherKey: SigningKey = {
    do { return try SigningKey(seed: [UInt8](repeating: 9, count: 32)) } catch { fatalError("\(error)") }
}()

private func seal(_ data: [UInt8], as name: String, profile: String = "continuity", key: SigningKey = demoKey) throws -> [UInt8] {
    try SealedContainer.seal(files: [(path: "state.bin", mode: 0o644, data: data)], surfaceName: name, profile: profile, key: key, createdNs: 1)
}

private func classify(_ name: String, _ bytes: [UInt8]) -> IntakeClass { Sniff.classify(name: name, bytes: bytes).intakeClass }

/// Writes a file the way a plain writer does (open, write, close: one close-after-write event).
/// Writes a file as an outside writer would (open, write, close) and returns once the close has
/// reached inotify. It may not at once: a process that another test spawns at that moment holds a
/// copy of the descriptor until it execs, and IN_CLOSE_WRITE comes only with the last close.
/// Events go to every watcher at once, so when ours has it, the inbox's queue has it too.
func writeClosed(_ bytes: [UInt8], _ path: String) {
    let dir = (path as NSString).deletingLastPathComponent, name = (path as NSString).lastPathComponent
    let watch = inotify_init1(Int32(IN_NONBLOCK | IN_CLOEXEC))
    defer { if watch >= 0 { close(watch) } }
    let watching = watch >= 0 && inotify_add_watch(watch, dir, UInt32(IN_CLOSE_WRITE)) >= 0
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { Issue.record("cannot create \(path)"); return }
    _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
    close(fd)
    guard watching else { return }
    var buffer = [UInt8](repeating: 0, count: 4096)
    let deadline = Date().addingTimeInterval(10)
    while Date() < deadline {
        let n = buffer.withUnsafeMutableBytes { read(watch, $0.baseAddress, $0.count) }
        var off = 0
        let header = MemoryLayout<inotify_event>.size
        while n > 0, off + header <= n {
            let len = buffer.withUnsafeBytes { Int($0.loadUnaligned(fromByteOffset: off + 12, as: UInt32.self)) }
            let got = String(decoding: buffer[(off + header)..<min(n, off + header + len)].prefix { $0 != 0 }, as: UTF8.self)
            if got == name { return }
            off += header + len
        }
        usleep(1000)
    }
    Issue.record("no IN_CLOSE_WRITE for \(path) within 10 s")
}
private func write(_ bytes: [UInt8], _ path: String) { writeClosed(bytes, path) }

private func exists(_ path: String) -> Bool { FileManager.default.fileExists(atPath: path) }

@Suite("Continuity intake: sniffing rules")
struct SniffRuleTests {
    @Test func theNineRulesInOrder_contentBeatsName() {
        let tbz: [UInt8] = [0x54, 0x42, 0x5A, 0x02, 0x00, 0x00, 0x00, 0xAA]
        #expect(classify("upload.csv.part", tbz) == .staging)
        #expect(classify("a.TMP", [1]) == .staging)
        #expect(classify("x.tza", []) == .empty)
        #expect(classify("x.tza", [0x7F, 0x45, 0x4C, 0x46, 2, 1]) == .executable)      // an ELF named .tza: not triage
        #expect(classify("a.gpt", Array("MZ\u{90}".utf8)) == .executable)
        #expect(classify("run.json", Array("#!/bin/sh\n".utf8)) == .executable)
        #expect(classify("lib.kit", [0xCF, 0xFA, 0xED, 0xFE, 7, 0]) == .executable)
        #expect(classify("a.tza", tbz) == .sealedTBZ)
        #expect(classify("a.Capsule", tbz) == .sealedTBZ)
        #expect(classify("report.txt", tbz) == .sealedTBZNoExt)
        #expect(classify("noext", Array("TBZ old".utf8)) == .sealedTBZNoExt)
        #expect(classify("demo.claude", Array("plain text".utf8)) == .disguised)
        #expect(classify("demo.claude", Array("%PDF-1.7".utf8)) == .disguised)     // rule 6 before rule 7
        #expect(classify("note.json", Array("%PDF-1.4\n".utf8)) == .pdf)
        #expect(classify("data.txt", Array(" \n\t  {\"a\":1}".utf8)) == .jsonText)
        #expect(classify("data.txt", Array("[1,2]".utf8)) == .jsonText)
        #expect(classify("late.txt", Array(String(repeating: " ", count: 16).utf8) + Array("{}".utf8)) == .unknown)
        #expect(classify("rand.bin", [0x00, 0x13, 0x37]) == .unknown)
    }

    @Test func dispositionsAndSeverities_matchTheTable() {
        let expected: [IntakeClass: (Disposition, Severity)] = [
            .staging: (.ignore, .info), .empty: (.reject, .info), .executable: (.quarantine, .critical),
            .sealedTBZ: (.trustedCandidate, .info), .sealedTBZNoExt: (.trustedCandidate, .info), .disguised: (.triageDisguised, .alert),
            .pdf: (.reject, .warn), .jsonText: (.resealCandidate, .warn), .unknown: (.quarantine, .warn),
        ]
        for c in IntakeClass.allCases {
            #expect(c.disposition == expected[c]?.0, "\(c)")
            #expect(c.severity == expected[c]?.1, "\(c)")
        }
    }

    @Test func tbzHeaders_versionFlagsAndSSM() {
        func header(_ b: [UInt8]) -> TBZHeader { b.withUnsafeBytes { TBZHeader.read($0) } }
        #expect(header([0x54, 0x42, 0x5A, 0x02, 0x00, 0x05, 0x00]) == TBZHeader(version: 2, flags: 5))
        #expect(header([0x54, 0x42, 0x5A, 0x9D, 0x02, 0x00, 0x01, 0x00]) == TBZHeader(version: 2, flags: 1, ssm: 0x9D))
        #expect(header(Array("TBZ1legacy".utf8)) == TBZHeader(version: 1))
        #expect(header([0x54, 0x42, 0x5A, 0x02, 0x00, 0x05]) == TBZHeader(version: 1))   // cut short
        #expect(header(Array("PK\u{3}\u{4}".utf8)) == TBZHeader(version: 0))
        #expect(TBZHeader(version: 2, flags: 0x0B).flagList == "ssm,encrypted,compressed")
        #expect(Sniff.extensionOf("a/b.c/file") == "")
        #expect(Sniff.extensionOf(".hidden") == "")
        #expect(Sniff.extensionOf("x.TZA") == "tza")
    }
}

@Suite("Continuity intake: sealed containers")
struct SealedContainerTests {
    @Test func roundTrip_andEveryByteIsCovered() throws {
        let data = (0..<150_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let c = try SealedContainer.seal(files: [(path: "a/b.bin", mode: 0o600, data: data), (path: "c.txt", mode: 0o644, data: Array("hi".utf8))],
                                         surfaceName: "pack.tza", profile: "p1", key: demoKey, createdNs: 42)
        let o = try SealedContainer.open(c, trusted: [demoKey.publicKey])
        #expect(o.manifest.surfaceName == "pack.tza" && o.manifest.profile == "p1" && o.manifest.blockCount == 3)
        #expect(o.files.map(\.entry.path) == ["a/b.bin", "c.txt"])
        #expect(o.files[0].data == data && o.files[1].data == Array("hi".utf8))
        #expect(o.files[0].entry.mode == 0o600)
        // Flipping any single byte (header, manifest, signatures, block data) makes it fail.
        var failures = 0
        for i in stride(from: 0, to: c.count, by: 997) {
            var t = c; t[i] ^= 0x40
            if (try? SealedContainer.open(t)) == nil { failures += 1 }
        }
        #expect(failures == (c.count + 996) / 997)
    }

    @Test func invalidContainers_sayWhy() throws {
        let c = try seal(Array("state".utf8), as: "a.tza")
        func reason(_ b: [UInt8], trusted: [[UInt8]] = []) -> String {
            do { _ = try SealedContainer.open(b, trusted: trusted); return "valid" } catch { return error.message }
        }
        #expect(reason(c) == "valid")
        #expect(reason(c, trusted: [otherKey.publicKey]).contains("is not a trusted key"))
        #expect(reason(Array(c.dropLast(10))).contains("truncated"))
        #expect(reason(c + [0]).contains("unexpected bytes after block"))
        var t = c; t[t.count - 70] ^= 1
        #expect(reason(t) == "block 0 signature does not verify")
        #expect(reason(Array("TBZ no".utf8)) == "not a sealed container (no TBZ v2 header)")
        // A manifest re-signed by another key with the original blocks: the blocks no longer verify.
        let other = try seal(Array("state".utf8), as: "a.tza", key: otherKey)
        #expect(reason(other, trusted: [demoKey.publicKey]).contains("not a trusted key"))
        #expect(SealedContainer.unsafePathReason("../x") != nil && SealedContainer.unsafePathReason("/etc/x") != nil)
        #expect(SealedContainer.unsafePathReason("a//b") != nil && SealedContainer.unsafePathReason("a/b.txt") == nil)
        // A '/' followed by a combining mark is one Swift Character, but the kernel sees '..' then a component.
        #expect(SealedContainer.unsafePathReason("../\u{301}x") != nil)
        #expect(throws: SealError.self) { try SealedContainer.seal(files: [(path: "../evil", mode: 0o644, data: [1])], surfaceName: "x", profile: "p", key: demoKey, createdNs: 0) }
    }

    @Test func collectAndUnpack_aDirectoryTree_refusingSymlinksAndOverwrites() throws {
        let d = Paths.tempDir("seal")
        try FileManager.default.createDirectory(atPath: d + "/src/sub", withIntermediateDirectories: true)
        write(Array("one".utf8), d + "/src/one.txt"); write([1, 2, 3], d + "/src/sub/two.bin")
        let files = try SealedContainer.collect(path: d + "/src")
        #expect(files.map(\.path) == ["one.txt", "sub/two.bin"])
        let c = try SealedContainer.seal(files: files, surfaceName: "src.tza", profile: "p", key: demoKey, createdNs: 0)
        let written = try SealedContainer.unpack(try SealedContainer.open(c), into: d + "/out")
        #expect(written.count == 2)
        #expect(FileManager.default.contents(atPath: d + "/out/sub/two.bin") == Data([1, 2, 3]))
        #expect(throws: SealError.self) { try SealedContainer.unpack(try SealedContainer.open(c), into: d + "/out") }
        try FileManager.default.createSymbolicLink(atPath: d + "/src/link", withDestinationPath: "/etc/passwd")
        #expect(throws: SealError.self) { try SealedContainer.collect(path: d + "/src") }
    }
}

@Suite("Continuity intake: stages in the harness")
struct IntakeStageTests {
    func file(_ name: String, _ bytes: [UInt8]) -> Envelope {
        Envelope(actor: "test", intent: "intake.arrival", attrs: ["filename": .string(name)], payload: bytes)
    }

    @Test func sniffer_routesByDisposition_withAttributesOnEveryEnvelope() throws {
        let h = try StageHarness(SnifferStage.descriptor, config: .object([("mime", .string("always"))]))
        let sealed = try seal(Array("s".utf8), as: "a.tza")
        try h.feed(file("a.tza", sealed))
        try h.feed(file("x.tza", [0x7F, 0x45, 0x4C, 0x46, 2, 1, 1, 0, 9, 9]))
        try h.feed(file("note.json", Array("%PDF-1.4\n".utf8)))
        try h.feed(file("d.json", Array("  {\"a\": 1}".utf8)))
        try h.feed(file("demo.claude", Array("hello".utf8)))
        try h.feed(file("e.dat", []))
        try h.feed(file("u.part", Array("x".utf8)))
        let t = h.take("trusted-candidate")
        #expect(t.count == 1)
        let a = t.first?.attrs ?? [:]
        #expect(a["intake_class"] == .string("sealed-tbz") && a["disposition"] == .string("trusted-candidate"))
        #expect(a["extension"] == .string("tza") && a["size_bytes"] == .int(Int64(sealed.count)))
        #expect(a["magic_prefix_hex"] == .string("54425a0200000001"))
        #expect(a["tbz_version"] == .int(2) && a["tbz_flags"] == .int(0) && a["ssm"] == nil)
        #expect(a["mime"]?.stringValue?.isEmpty == false)
        #expect(h.take("quarantine").map { $0.attrs["filename"] } == [.string("x.tza")])
        #expect(h.take("reject").map { $0.attrs["filename"] } == [.string("note.json"), .string("e.dat")])
        let j = h.take("reseal-candidate")
        #expect(j.count == 1 && j.first?.attrs["mime"] == .string("application/json") && j.first?.attrs["tbz_version"] == .int(0))
        #expect(h.take("triage-disguised").count == 1)
        #expect(h.take("ignore").count == 1)
        let audits = h.takeAudits()
        #expect(audits.count == 7 && audits.allSatisfy { $0.decision == "classify" })
        #expect(audits.first?.reason == "sealed-tbz -> trusted-candidate")
    }

    @Test func sniffer_mimeWhenNeededOnlyForUnknown_offNever() throws {
        let inputs: [Envelope] = [file("d.json", Array("{}".utf8)), file("r.bin", [0, 1, 2, 3, 250, 251]), file("x.tza", Array("#!/bin/sh".utf8))]
        let needed = try StageHarness(SnifferStage.descriptor, config: .object([("mime", .string("when-needed"))]))
        let off = try StageHarness(SnifferStage.descriptor, config: .object([("mime", .string("off"))]))
        for e in inputs { try needed.feed(e); try off.feed(e) }
        let q = needed.take("quarantine")
        #expect(q.first { $0.attrs["filename"] == .string("r.bin") }?.attrs["mime"] != nil)
        #expect(q.first { $0.attrs["filename"] == .string("x.tza") }?.attrs["mime"] == nil)
        #expect(needed.take("reseal-candidate").first?.attrs["mime"] == nil)
        _ = try needed.finish()
        #expect(needed.statusReport["mime_calls"] == .int(1))
        #expect(off.take("quarantine").allSatisfy { $0.attrs["mime"] == nil })
    }

    @Test func sniffer_modes_passiveObservesOnly_strictQuarantines() throws {
        let passive = try StageHarness(SnifferStage.descriptor, config: .object([("mode", .string("passive")), ("mime", .string("off"))]))
        let strict = try StageHarness(SnifferStage.descriptor, config: .object([("mode", .string("strict")), ("mime", .string("off"))]))
        let inputs = [file("d.json", Array("{}".utf8)), file("demo.claude", Array("hi".utf8)), file("n.pdf", Array("%PDF-".utf8)),
                      file("a.tza", try seal([1], as: "a.tza"))]
        for e in inputs { try passive.feed(e); try strict.feed(e) }
        #expect(passive.take("observed").count == 4)
        for d in Disposition.allCases { #expect(passive.take(d.rawValue).isEmpty) }
        #expect(passive.takeAudits().count == 4)
        let q = strict.take("quarantine")
        #expect(q.map { $0.attrs["strict_from"] } == [.string("reseal-candidate"), .string("triage-disguised")])
        #expect(strict.take("reject").count == 1)                 // would be rejected: stays rejected
        #expect(strict.take("trusted-candidate").count == 1)      // goes on to verification
        #expect(strict.take("triage-disguised").isEmpty && strict.take("reseal-candidate").isEmpty)
    }

    @Test func verify_forksByTrustAndSurface() throws {
        let h = try StageHarness(VerifyStage.descriptor, config: .object([
            ("trusted_keys", .list([.string(Hex.encode(demoKey.publicKey))])), ("profile", .string("continuity"))]))
        let good = try seal(Array("state".utf8), as: "cap.tza")
        try h.feed(file("cap.tza", good))
        try h.feed(file("report.txt", good))
        try h.feed(file("cap.tza", try seal(Array("state".utf8), as: "cap.tza", profile: "other")))
        var tampered = good; tampered[tampered.count - 66] ^= 1
        try h.feed(file("cap.tza", tampered))
        try h.feed(file("cap.tza", try seal(Array("state".utf8), as: "cap.tza", key: otherKey)))
        #expect(h.take("trusted-fork").map { $0.attrs["seal_status"] } == [.string("trusted-fork")])
        let triage = h.take("triage-fork").compactMap { $0.attrs["seal_reason"]?.stringValue }
        #expect(triage.count == 2)
        #expect(triage.first?.contains("surface name 'cap.tza' but arrived as 'report.txt'") == true)
        #expect(triage.last?.contains("profile 'other' but this intake expects 'continuity'") == true)
        let bad = h.take("reject-invalid").compactMap { $0.attrs["seal_reason"]?.stringValue }
        #expect(bad == ["block 0 signature does not verify", "signer \(Hex.encode(otherKey.publicKey.prefix(8))) is not a trusted key"])
        #expect(h.takeAudits().map(\.decision) == ["trusted-fork", "triage-fork", "triage-fork", "reject-invalid", "reject-invalid"])
    }

    @Test func verify_maxAge_refusesReplayedAndFutureContainers() throws {
        let h = try StageHarness(VerifyStage.descriptor, config: .object([
            ("trusted_keys", .list([.string(Hex.encode(demoKey.publicKey))])), ("max_age_s", .double(3600))]))
        let now = h.wallClockNs
        func sealed(at ns: UInt64) throws -> [UInt8] {
            try SealedContainer.seal(files: [(path: "s", mode: 0o644, data: [1])], surfaceName: "c.tza", profile: "continuity", key: demoKey, createdNs: ns)
        }
        try h.feed(file("c.tza", try sealed(at: now - 60_000_000_000)))
        try h.feed(file("c.tza", try sealed(at: now - 7200_000_000_000)))
        try h.feed(file("c.tza", try sealed(at: now + 7200_000_000_000)))
        #expect(h.take("trusted-fork").count == 1)
        let bad = h.take("reject-invalid").compactMap { $0.attrs["seal_reason"]?.stringValue }
        #expect(bad == ["sealed 7200 s ago, beyond max_age_s 3600 (a replayed or misdated container)",
                        "dated 7200 s in the future, beyond max_age_s 3600 (a replayed or misdated container)"])
    }

    @Test func police_severitiesAgeAlertsAndOneFindingEach() throws {
        let run = Paths.tempDir("police")
        for d in ["quarantine", "triage", "inbox"] { try FileManager.default.createDirectory(atPath: run + "/" + d, withIntermediateDirectories: true) }
        write([0x7F, 0x45, 0x4C, 0x46, 1], run + "/quarantine/x.tza")
        write(Array("text".utf8), run + "/triage/demo.claude")
        write(Array("{}".utf8), run + "/inbox/d.json")
        write(try seal([1], as: "old.tza"), run + "/inbox/old.tza")
        let h = try StageHarness(PoliceStage.descriptor, config: .object([("interval_ms", .int(1000)), ("age_alert_s", .double(60))]), runDirectory: run)
        h.wallClockNs = UInt64(Date().timeIntervalSince1970 * 1e9)
        try h.produce(maxCalls: 5)
        let first = h.take("out")
        func sev(_ name: String, _ list: [Envelope]) -> String? { list.first { $0.attrs["filename"] == .string(name) }?.attrs["severity"]?.stringValue }
        #expect(first.count == 4)
        #expect(sev("x.tza", first) == "CRITICAL" && sev("demo.claude", first) == "ALERT" && sev("d.json", first) == "WARN" && sev("old.tza", first) == "INFO")
        #expect(h.takeAudits().filter { $0.decision == "police-finding" }.count == 4)
        // The next scan reports nothing new; two minutes later the INFO finding has aged into WARN.
        try h.advance(byMs: 1000); try h.produce(maxCalls: 5)
        #expect(h.take("out").isEmpty)
        h.wallClockNs += 120_000_000_000
        try h.advance(byMs: 1000); try h.produce(maxCalls: 5)
        let later = h.take("out")
        #expect(later.count == 1 && sev("old.tza", later) == "WARN")
        #expect(h.takeAudits().count == 1)
    }
}

/// An inbox stage in the harness on a fresh directory (real inotify, manual clock).
private func inbox(_ extra: [(String, ConfigValue)] = []) throws -> (StageHarness, String) {
    let run = Paths.tempDir("inbox")
    let h = try StageHarness(InboxStage.descriptor, config: .object([("dir", .string("inbox")), ("coalesce_ms", .int(100))] + extra), runDirectory: run)
    return (h, run + "/inbox")
}

@Suite("Continuity intake: inbox and file moves (real files)")
struct InboxTests {
    @Test func presentAtStart_coalescing_andStagingWaitsForTheRename() throws {
        let run = Paths.tempDir("inbox")
        try FileManager.default.createDirectory(atPath: run + "/inbox", withIntermediateDirectories: true)
        write(Array("early".utf8), run + "/inbox/early.txt")
        write(Array("half".utf8), run + "/inbox/upload.csv.part")
        let h = try StageHarness(InboxStage.descriptor, config: .object([("dir", .string("inbox")), ("coalesce_ms", .int(100))]), runDirectory: run)
        let dir = run + "/inbox"
        try h.produce()
        let start = h.take()
        #expect(start.map { $0.attrs["filename"] } == [.string("early.txt")])
        #expect(start.first?.attrs["arrival"] == .string("present-at-start") && start.first?.payload == Array("early".utf8))
        // The same name written three times quickly: one arrival, after the window, with the last content.
        // (Reading events between the writes: the kernel itself merges identical unread events.)
        for i in 1...3 {
            write(Array("v\(i)".utf8), dir + "/burst.log")
            try h.produce()
            try h.advance(byMs: 30)
        }
        #expect(h.take().isEmpty)                       // still inside coalesce_ms
        try h.advance(byMs: 10); try h.produce()
        let burst = h.take()
        #expect(burst.count == 1 && burst.first?.attrs["arrival_events"] == .int(3) && burst.first?.payload == Array("v3".utf8), "\(burst.map { ($0.attrs, $0.payload) })")
        // The staging file is ignored until renamed; then exactly one arrival.
        write(Array("full upload".utf8), dir + "/upload.csv.part")
        try h.advance(byMs: 500); try h.produce()
        #expect(h.take().isEmpty)
        #expect(rename(dir + "/upload.csv.part", dir + "/upload.csv") == 0)
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let up = h.take()
        #expect(up.map { $0.attrs["filename"] } == [.string("upload.csv")])
        #expect(up.first?.payload == Array("full upload".utf8) && up.first?.attrs["arrival_events"] == .int(1))
        // A hard link made into the inbox raises only IN_CREATE; it is an arrival all the same.
        let outside = Paths.tempDir("linksrc") + "/made-elsewhere.txt"
        write(Array("linked in".utf8), outside)
        #expect(link(outside, dir + "/linked.txt") == 0)
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        #expect(h.take().map(\.payload) == [Array("linked in".utf8)])
        #expect(h.deadLetters.isEmpty)
    }

    @Test func badInput_tooLargeSymlinksVanishedOddNames_neverLostNeverCrash() throws {
        let (h, dir) = try inbox([("max_bytes", .int(1000))])
        let outside = Paths.tempDir("outside") + "/secret.txt"
        write(Array("secret".utf8), outside)
        write([UInt8](repeating: 0x41, count: 5000), dir + "/big.bin")
        try FileManager.default.createSymbolicLink(atPath: dir + "/leak.tza", withDestinationPath: outside)
        write(Array("inside".utf8), dir + "/real.txt")
        try FileManager.default.createSymbolicLink(atPath: dir + "/alias.txt", withDestinationPath: dir + "/real.txt")
        write(Array("gone".utf8), dir + "/gone.txt")
        let odd: [UInt8] = Array("odd-".utf8) + [0xFF, 0xFE, 0x0A] + Array(".json".utf8)
        let oddPath = FS.join(dir, odd)
        let fd = open(oddPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644); #expect(fd >= 0)
        _ = Glibc.write(fd, "{\"odd\": true}", 13); close(fd)
        try h.produce()
        #expect(unlink(dir + "/gone.txt") == 0)          // vanishes between the event and the read
        try h.advance(byMs: 100); try h.produce()
        let got = h.take()
        let names = Set(got.compactMap { $0.attrs["filename"]?.stringValue })
        #expect(names == ["real.txt", "alias.txt", String(decoding: odd, as: UTF8.self)])
        #expect(got.first { $0.attrs["filename"] == .string("alias.txt") }?.payload == Array("inside".utf8))
        let oddEnv = got.first { $0.attrs["filename_hex"] != nil }
        #expect(oddEnv?.attrs["filename_hex"] == .string(Hex.encode(odd)))
        let reasons = h.deadLetters.map(\.reason).sorted()
        #expect(reasons.count == 2)
        #expect(reasons.first == "big.bin: 5000 bytes exceeds max_bytes 1000; not taken in")
        #expect(reasons.last == "leak.tza: a symlink leaving the inbox (to \(FS.realPath(outside) ?? outside)); not taken in")
        #expect(h.audits.contains { $0.decision == "inbox-vanished" && $0.reason == "gone.txt: gone before it could be read" })
        #expect(h.metrics["too_large"] == 1 && h.metrics["refused_symlink"] == 1 && h.metrics["vanished"] == 1)
        // Nothing was deleted or followed out of the inbox.
        #expect(exists(dir + "/big.bin") && exists(outside) && exists(dir + "/leak.tza"))
        // The odd name moves byte for byte.
        let q = Paths.tempDir("q")
        let sink = try StageHarness(MoveSinkStage.quarantine, config: .object([("dir", .string(q))]))
        if let e = oddEnv { try sink.feed(e) }
        #expect(access(FS.join(q, odd), F_OK) == 0 && access(oddPath, F_OK) != 0)
    }

    @Test func watermarks_depths6565StayOverloaded_everyTransitionAudited() throws {
        let (h, dir) = try inbox([("low", .int(2)), ("high", .int(6))])
        func depth(_ n: Int) throws {
            let have = (try FileManager.default.contentsOfDirectory(atPath: dir)).sorted()
            if have.count < n { for i in have.count..<n { write([1], dir + "/f\(i).bin") } }
            if have.count > n { for f in have.suffix(have.count - n) { try FileManager.default.removeItem(atPath: dir + "/" + f) } }
            try h.produce(maxCalls: 1)
        }
        for d in [6, 5, 6, 5] { try depth(d); #expect(h.statusReport["inbox_state"] == .string("overloaded"), "depth \(d)") }
        #expect(h.statusReport["inbox_depth"] == .int(5))
        var states = h.takeAudits().filter { $0.decision == "inbox-state" }.map(\.reason)
        #expect(states == ["normal -> overloaded at depth 6"])
        for d in [3, 1, 2] { try depth(d) }
        states = h.takeAudits().filter { $0.decision == "inbox-state" }.map(\.reason)
        #expect(states == ["overloaded -> recovering at depth 3", "recovering -> normal at depth 1", "normal -> pressure-rising at depth 2"])
    }

    @Test func moveSinks_neverOverwrite_skipChangedFiles_andLeaveFilesOnFailure() throws {
        let (h, dir) = try inbox()
        write(Array("one".utf8), dir + "/a.bin")
        write(Array("two".utf8), dir + "/b.bin")
        write(Array("three".utf8), dir + "/c.bin")
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let arrivals = h.take()
        #expect(arrivals.count == 3)
        func env(_ n: String) -> Envelope? { arrivals.first { $0.attrs["filename"] == .string(n) } }
        let q = Paths.tempDir("q")
        write(Array("already here".utf8), q + "/a.bin")
        let sink = try StageHarness(MoveSinkStage.quarantine, config: .object([("dir", .string(q))]))
        if let a = env("a.bin") { try sink.feed(a) }
        #expect(FileManager.default.contents(atPath: q + "/a.bin") == Data("already here".utf8))
        #expect(FileManager.default.contents(atPath: q + "/a.bin.1") == Data("one".utf8))
        #expect(!exists(dir + "/a.bin"))
        let moved = sink.takeAudits()
        #expect(moved.count == 1 && moved.first?.decision == "quarantine" && moved.first?.details["to"] == .string(q + "/a.bin.1"))
        // Rewritten after it was read: its new content is a new arrival, so it is left alone.
        usleep(20_000)
        write(Array("two, edited".utf8), dir + "/b.bin")
        if let b = env("b.bin") { try sink.feed(b) }
        #expect(exists(dir + "/b.bin") && !exists(q + "/b.bin"))
        #expect(sink.takeAudits().first?.reason.contains("changed since it was read") == true)
        // Replaced by a rename (a new inode under the same name) after it was read: left alone too.
        write(Array("new a".utf8), dir + "/a.bin")
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let newA = h.take().filter { $0.attrs["filename"] == .string("a.bin") }
        #expect(newA.count == 1)
        write(Array("newer a".utf8), dir + "/a.tmp")
        #expect(rename(dir + "/a.tmp", dir + "/a.bin") == 0)
        if let a = newA.first { try sink.feed(a) }
        #expect(FileManager.default.contents(atPath: dir + "/a.bin") == Data("newer a".utf8) && !exists(q + "/a.bin.2"))
        #expect(sink.takeAudits().first?.reason.contains("changed since it was read") == true)
        // The destination is unusable (replaced by a file): the move fails and says so.
        try FileManager.default.removeItem(atPath: q)
        write([0], q)
        if let c = env("c.bin") { try sink.feed(c) }
        #expect(FileManager.default.contents(atPath: dir + "/c.bin") == Data("three".utf8))
        let failed = sink.takeAudits()
        #expect(failed.first?.decision == "move-failed" && failed.first?.reason.contains("left where it was") == true)
        #expect(sink.metrics["move_failed"] == 3 && sink.metrics["moved"] == 1)
    }

    @Test func aFileDatedPast2262_isTakenNotACrash() throws {
        let (h, dir) = try inbox()
        write(Array("{}".utf8), dir + "/future.json")
        let t = try runProcess("/usr/bin/touch", ["-m", "-d", "2300-01-01", dir + "/future.json"], timeout: 10)
        #expect(t.status == 0)
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        #expect(h.take().map { $0.attrs["filename"] } == [.string("future.json")])
        let police = try StageHarness(PoliceStage.descriptor, config: .object([("dirs", .list([.string(dir)]))]))
        try police.produce(maxCalls: 3)
        #expect(police.take().first?.attrs["severity"] == .string("WARN"))
    }

    @Test func fullDisk_onMove_leavesTheFileAndSaysSo() throws {
        // A 64 KiB tmpfs as the quarantine: a cross-device move of a 200 KB file runs out of space.
        // (Where a tmpfs cannot be mounted, the ENOTDIR case of the test above covers the failure path.)
        let q = Paths.tempDir("tmpfs")
        guard try mountTmpfs(q, size: "64k", for: "fullDisk") else { return }
        defer { unmount(q) }
        let (h, dir) = try inbox()
        let big = (0..<200_000).map { UInt8(truncatingIfNeeded: $0) }
        write(big, dir + "/big.bin")
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let sink = try StageHarness(MoveSinkStage.quarantine, config: .object([("dir", .string(q))]))
        for e in h.take() { try sink.feed(e) }
        #expect(FileManager.default.contents(atPath: dir + "/big.bin") == Data(big))
        #expect((try FileManager.default.contentsOfDirectory(atPath: q)).isEmpty)      // the partial copy was removed
        let a = sink.takeAudits()
        #expect(a.first?.decision == "move-failed")
        #expect(a.first?.reason.contains("No space left on device") == true, "\(a.first?.reason ?? "")")
        // A FIFO (dead-lettered by the inbox) crossing file systems is refused, not waited on.
        #expect(mkfifo(dir + "/pipe", 0o644) == 0)
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let fifo = h.deadLetters.map(\.envelope).filter { $0.attrs["filename"] == .string("pipe") }
        #expect(fifo.count == 1 && h.deadLetters.last?.reason == "pipe: not a regular file; not taken in")
        for e in fifo { try sink.feed(e) }
        #expect(sink.takeAudits().first?.reason.contains("not a regular file; not copied") == true)
    }

    @Test func reseal_writesAVerifiableContainerToTheOutbox_thenArchivesTheOriginal() throws {
        let (h, dir) = try inbox()
        write(Array("  {\"state\": 1}".utf8), dir + "/data.json")
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let run = Paths.tempDir("reseal")
        let sink = try StageHarness(ResealSinkStage.descriptor, config: .object([("key", .string("keys/signing.key")), ("create_key", .bool(true))]), runDirectory: run)
        for e in h.take() { try sink.feed(e) }
        let key = try KeyFiles.loadSigningKey(run + "/keys/signing.key")
        let pub = try KeyFiles.loadPublicKey(run + "/keys/signing.pub")
        #expect(pub == key.publicKey)
        let attrs = try FileManager.default.attributesOfItem(atPath: run + "/keys/signing.key")
        #expect((attrs[.posixPermissions] as? Int) == 0o600)
        let sealed = [UInt8](FileManager.default.contents(atPath: run + "/outbox/data.json.tza") ?? Data())
        let o = try SealedContainer.open(sealed, trusted: [pub])
        #expect(o.manifest.surfaceName == "data.json.tza" && o.files.first?.data == Array("  {\"state\": 1}".utf8))
        #expect(o.manifest.profile == "unverified")        // never verified: not resealed as trusted
        #expect(exists(run + "/archive/data.json") && !exists(dir + "/data.json"))
        #expect(sink.takeAudits().map(\.decision) == ["reseal", "archive"])
    }

    @Test func reseal_toAnOutboxItCannotWrite_leavesTheOriginalAndSaysSo() throws {
        let (h, dir) = try inbox()
        write(Array("{\"state\": 2}".utf8), dir + "/data.json")
        try h.produce(); try h.advance(byMs: 100); try h.produce()
        let run = Paths.tempDir("reseal-fail")
        let sink = try StageHarness(ResealSinkStage.descriptor, config: .object([("key", .string("keys/signing.key")), ("create_key", .bool(true))]), runDirectory: run)
        // The outbox is not a directory any more (a full or broken disk looks the same to the sink).
        try? FileManager.default.removeItem(atPath: run + "/outbox")
        write([0], run + "/outbox")
        for e in h.take() { try sink.feed(e) }
        let audits = sink.takeAudits()
        #expect(audits.map(\.decision) == ["move-failed"])
        #expect(audits.first?.reason.hasPrefix("cannot write to the outbox: ") == true && audits.first?.reason.hasSuffix("; the original stays where it was") == true,
                "\(audits.first?.reason ?? "")")
        #expect(FileManager.default.contents(atPath: dir + "/data.json") == Data("{\"state\": 2}".utf8))
        #expect(!exists(run + "/archive/data.json"))
        #expect(sink.metrics["move_failed"] == 1 && sink.metrics["resealed"] == nil)
    }
}
