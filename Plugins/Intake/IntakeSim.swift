import Foundation
import PipeKit
import PipeSeal

/// `intake-sim`: drops the continuity-intake scenario mix into a directory, as outside writers
/// would (write then close; staging name then rename; one name written three times quickly), so
/// `pipelines/continuity-inbox.yaml` shows every disposition from the README. Deterministic with
/// a seed. Emits one envelope per file dropped (what was written, the class it should get, and
/// `write_spread_ms`: first open to last close, which decides whether a rewrite is one arrival).
public final class IntakeSimStage: SourceStage {
    public static let descriptor = StageDescriptor(
        kind: "intake-sim",
        summary: "Writes the intake scenario mix (sealed, renamed, tampered, ELF, PDF, JSON, disguised, empty, random, staged, rewritten) into a directory.",
        role: .source,
        fields: [
            ConfigField("dir", .string, doc: "Directory to drop files into (created if missing); relative to the run directory."),
            ConfigField("rounds", .int(min: 1, max: 100_000), default: .int(1), doc: "How many times to drop the 11-file mix."),
            ConfigField("rate", .double(min: 0), default: .double(100), doc: "Files per second (0: as fast as possible)."),
            ConfigField("seed", .int(), default: .int(1), doc: "Seed for the random content."),
            ConfigField("key_seed", .int(min: 0, max: 255), default: .int(7),
                        doc: "Seed byte of the Ed25519 key that signs the sealed containers (the key is 32 copies of it; a demo key, not a secret)."),
            ConfigField("profile", .string, default: .string("continuity"), doc: "Surface profile of the sealed containers."),
        ],
        make: { IntakeSimStage(config: $0) })

    /// One file of the mix: its name, content, how it is written, and the class it should get.
    public struct Drop: Sendable {
        public enum Style: Sendable { case plain, staged, rewritten }
        public var name: String
        public var content: [UInt8]
        public var style: Style
        public var expect: IntakeClass
    }

    /// The scenario mix of the continuity-intake issue, round `n` (names carry `n`).
    public static func mix(round n: Int, key: SigningKey, profile: String, rng: inout SplitMix64, wallNs: UInt64) throws(SealError) -> [Drop] {
        func random(_ count: Int) -> [UInt8] { (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) } }
        let body = Array("continuity state \(n)\n".utf8) + random(200)
        let sealedName = "capsule-\(n).tza"
        let sealed = try SealedContainer.seal(files: [(path: "state.bin", mode: 0o644, data: body)], surfaceName: sealedName, profile: profile, key: key, createdNs: wallNs)
        let renamed = try SealedContainer.seal(files: [(path: "state.bin", mode: 0o644, data: body)], surfaceName: "report-\(n).tza", profile: profile, key: key, createdNs: wallNs)
        var tampered = sealed
        tampered[tampered.count - 80] ^= 0x01   // inside the last block's data
        return [
            Drop(name: sealedName, content: sealed, style: .plain, expect: .sealedTBZ),
            Drop(name: "report-\(n).txt", content: renamed, style: .plain, expect: .sealedTBZNoExt),
            Drop(name: "tampered-\(n).tza", content: tampered, style: .plain, expect: .sealedTBZ),
            Drop(name: "x-\(n).tza", content: [0x7F, 0x45, 0x4C, 0x46, 0x02, 0x01, 0x01, 0x00] + random(120), style: .plain, expect: .executable),
            Drop(name: "note-\(n).json", content: Array("%PDF-1.4\n%\u{e2}\u{e3}\n1 0 obj\n<<>>\nendobj\n".utf8), style: .plain, expect: .pdf),
            Drop(name: "data-\(n).json", content: Array("  \n\t{\"round\": \(n), \"state\": \"forward\"}\n".utf8), style: .plain, expect: .jsonText),
            Drop(name: "demo-\(n).claude", content: Array("plain text pretending to be a sealed capsule\n".utf8), style: .plain, expect: .disguised),
            Drop(name: "empty-\(n).dat", content: [], style: .plain, expect: .empty),
            Drop(name: "random-\(n).bin", content: random(256), style: .plain, expect: .unknown),
            Drop(name: "upload-\(n).csv", content: Array("a,b\n1,2\n".utf8), style: .staged, expect: .unknown),
            Drop(name: "burst-\(n).log", content: Array("line 3 of 3\n".utf8), style: .rewritten, expect: .unknown),
        ]
    }

    /// Writes `content` to `path` (created or truncated) and closes it.
    public static func write(_ content: [UInt8], to path: String) -> String? {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return "cannot create \(path): \(FS.errno_())" }
        defer { close(fd) }
        if let e = Mover.writeAll(fd, content, content.count) { return "\(path): \(e)" }
        return nil
    }

    /// Drops one file the way its style says.
    public static func drop(_ d: Drop, into dir: String) -> String? { dropTimed(d, into: dir).error }

    /// Drops one file; also says how long its writes took from the first open to the last close
    /// (a rewritten file is one arrival only if that fits in the inbox's coalesce window).
    public static func dropTimed(_ d: Drop, into dir: String) -> (error: String?, spreadNs: UInt64) {
        let path = dir + "/" + d.name
        let t0 = monotonicNs()
        switch d.style {
        case .plain: return (write(d.content, to: path), monotonicNs() - t0)
        case .staged:
            if let e = write(d.content, to: path + ".part") { return (e, 0) }
            return (rename(path + ".part", path) == 0 ? nil : "rename to \(path): \(FS.errno_())", monotonicNs() - t0)
        case .rewritten:
            for i in 1...3 {
                if let e = write(i == 3 ? d.content : Array("line \(i) of 3\n".utf8), to: path) { return (e, 0) }
            }
            return (nil, monotonicNs() - t0)
        }
    }

    var pacer: SourcePacer
    let dirSpec: String, profile: String
    var rng: SplitMix64
    let keySeed: UInt8
    let rounds: Int
    var dir = ""
    var key: SigningKey?
    var pending: [Drop] = []
    var round = 0
    var stopped = false
    var out = OutputHandle(index: 0, name: "out")

    init(config c: ConfigReader) {
        rounds = Int(c.int("rounds") ?? 1)
        pacer = SourcePacer(count: UInt64(rounds * 11), rate: c.double("rate") ?? 100)
        dirSpec = c.string("dir") ?? "inbox"; profile = c.string("profile") ?? "continuity"
        rng = SplitMix64(state: UInt64(bitPattern: c.int("seed") ?? 1))
        keySeed = UInt8(c.int("key_seed") ?? 7)
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out")
        dir = context.resolvePath(dirSpec)
        try FS.mkdirs(dir)
        do { key = try SigningKey(seed: [UInt8](repeating: keySeed, count: 32)) } catch { throw StageError.halt("intake-sim key: \(error)") }
        context.report("signer", .string(key.map { Hex.encode($0.publicKey) } ?? ""))
    }
    public func requestStop() { stopped = true }

    public func produce(budget: Int, context: any StageContext) throws -> SourceProgress {
        if stopped || pacer.finished { return .exhausted }
        let (allowed, waitNs) = pacer.allowance(now: context.now, budget: budget)
        if allowed == 0 { return .idle(afterNs: waitNs) }
        for _ in 0..<allowed {
            if pending.isEmpty {
                round += 1
                guard let key else { return .exhausted }
                do { pending = try Self.mix(round: round, key: key, profile: profile, rng: &rng, wallNs: context.wallClockNs) }
                catch { throw StageError.halt("intake-sim: \(error)") }
            }
            let d = pending.removeFirst()
            pacer.sent()
            let dropped = Self.dropTimed(d, into: dir)
            if let err = dropped.error { throw StageError.halt("intake-sim: \(err)") }
            context.emit(Envelope(actor: "intake-sim", intent: "intake.sim.drop", ingestNs: context.wallClockNs,
                                  attrs: ["filename": .string(d.name), "expect_class": .string(d.expect.rawValue),
                                          "size_bytes": .int(Int64(d.content.count)),
                                          "write_spread_ms": .double(Double(dropped.spreadNs) / 1e6)], payload: []), to: out)
        }
        return pacer.finished ? .exhausted : .active
    }
}
