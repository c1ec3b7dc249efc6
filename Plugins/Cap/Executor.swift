import Glibc
import PipeKit
import PipeSeal

/// `executor`: performs each cap through the `echo` or `command` executor and emits a receipt
/// with the true outcome, the measured latency and the continuation; follow-ups per the
/// continuation table (CONCEPTS.md), bounded by `max_hops`; receipts signed per batch (a Merkle
/// root per batch, each receipt carrying its proof) when a key is configured.
public final class ExecutorStage: Stage {
    public static let continuations = ["receipt", "continue", "fork", "freeze_resume", "fork_on_hop_off", "rebuild",
                                       "offline_fallback", "resync-needed", "reject"]

    public static let descriptor = StageDescriptor(
        kind: "executor",
        summary: "Performs caps (`echo`, or an allow-listed `command` run with argv, a timeout and an output limit) and emits receipts with the true outcome, measured latency and continuation; follow-ups per the continuation table up to `max_hops`; receipts batch-signed (Merkle root per batch) when `key` is set.",
        role: .transform,
        inputs: [InputPort("in", doc: "caps: `continuation` attribute (default receipt); for `command`, a JSON payload {\"argv\": [program, args...]}")],
        outputs: { _ in ["receipts", "followups", "triage", "triage_resync", "triage_reject"] },
        outputsDoc: "receipts, followups, triage (hop-limit), triage_resync, triage_reject",
        fields: [
            ConfigField("executor", .enumeration(["echo", "command"]), default: .string("echo"),
                        doc: "`echo`: the receipt's output is the cap's payload. `command`: run the payload's argv (argv[0] an absolute path on `allow`)."),
            ConfigField("allow", .list(.string), optional: true, doc: "Absolute paths of the programs `command` may run; anything else is rejected."),
            ConfigField("timeout_ms", .int(min: 1, max: 3_600_000), default: .int(5000), doc: "A command still running after this is killed (its process group) and the cap rejected."),
            ConfigField("max_output_bytes", .int(min: 0, max: 16 << 20), default: .int(65536), doc: "Output kept in the receipt (stdout and stderr together); the rest is discarded and `truncated` set."),
            ConfigField("max_hops", .int(min: 0, max: 1_000_000), default: .int(8), doc: "A follow-up whose hops would exceed this goes to `triage` with reason `hop-limit`."),
            ConfigField("key", .string, optional: true, doc: "Ed25519 signing key file (`pipehost keygen`): receipts are then signed per batch. Relative to the run directory."),
            ConfigField("create_key", .bool, default: .bool(false), doc: "Generate `key` (mode 0600, with a `.pub` beside it) when it does not exist."),
            ConfigField("batch_size", .int(min: 1, max: 65536), default: .int(64), doc: "Receipts per signed batch (at most)."),
            ConfigField("batch_ms", .int(min: 0, max: 60_000), default: .int(10), doc: "A batch is signed at the latest this long after its first receipt."),
        ],
        check: { c in
            if c.string("executor") == "command" && (c.strings("allow") ?? []).isEmpty {
                return [ConfigIssue(key: "allow", message: "the `command` executor needs an `allow` list of absolute program paths")]
            }
            if let bad = (c.strings("allow") ?? []).first(where: { !$0.hasPrefix("/") }) {
                return [ConfigIssue(key: "allow", message: "'\(bad)' is not an absolute path")]
            }
            return []
        },
        make: { try ExecutorStage(config: $0) })

    enum Kind { case echo, command }
    let kind: Kind
    let allow: Set<String>
    let timeoutNs: UInt64
    let maxOutput: Int
    let maxHops: UInt32
    let keyPath: String?
    let createKey: Bool
    let batchSize: Int
    let batchNs: UInt64
    var signer: SigningKey?
    var outs: [String: OutputHandle] = [:]
    var pending: [(receipt: ConfigValue, cap: Envelope)] = []
    var firstPendingAt: UInt64 = 0
    var executed = 0, rejected = 0, resync = 0, followups = 0, hopLimited = 0, batches = 0
    var latencySumUs: UInt64 = 0

    init(config c: ConfigReader) throws {
        kind = c.string("executor") == "command" ? .command : .echo
        allow = Set(c.strings("allow") ?? [])
        timeoutNs = UInt64(c.int("timeout_ms") ?? 5000) * 1_000_000
        maxOutput = Int(c.int("max_output_bytes") ?? 65536)
        maxHops = UInt32(c.int("max_hops") ?? 8)
        keyPath = c.string("key")
        createKey = c.bool("create_key") ?? false
        batchSize = Int(c.int("batch_size") ?? 64)
        batchNs = UInt64(c.int("batch_ms") ?? 10) * 1_000_000
    }

    public func start(context: any StageContext) throws {
        for n in ["receipts", "followups", "triage", "triage_resync", "triage_reject"] { outs[n] = try context.output(n) }
        if let k = keyPath {
            do {
                let (key, created) = try KeyFiles.loadOrCreateSigningKey(context.resolvePath(k), create: createKey)
                if created { context.logger.notice("executor: generated signing key \(context.resolvePath(k)) (key id \(Hex.encode(key.keyID)))") }
                signer = key
            } catch { throw StageError.halt("executor key: \(error)") }
        }
    }

    func out(_ n: String) -> OutputHandle { outs[n] ?? OutputHandle(index: 0, name: n) }

    struct Outcome { var outcome: String; var reason: String; var output: [UInt8]; var truncated: Bool; var exitStatus: Int32?; var latencyNs: UInt64 }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        let cap = envelope
        let asked = cap.attrs["continuation"]?.stringValue ?? "receipt"
        var result: Outcome
        var continuation = asked
        if !Self.continuations.contains(asked) {
            let why = asked == "resume"
                ? "continuation 'resume' was not resolved (a mux coffee_lane_policy resolves it before the executor)"
                : "unknown continuation '\(asked)' (expected \(Self.continuations.joined(separator: ", ")))"
            result = Outcome(outcome: "rejected", reason: why, output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            continuation = "reject"
            context.count("unknown_continuations")
        } else {
            result = perform(cap)
            if result.outcome == "rejected" { continuation = "reject" }
            if result.outcome == "resync-needed" { continuation = "resync-needed" }
            if asked == "resync-needed" && result.outcome == "executed" { result.outcome = "resync-needed" }
            if asked == "reject" && result.outcome == "executed" { result.outcome = "rejected"; result.reason = "the cap asked to be rejected" }
        }
        switch result.outcome {
        case "executed": executed += 1
        case "rejected": rejected += 1
        default: resync += 1
        }
        latencySumUs &+= result.latencyNs / 1000
        let latencyUs = Int64(result.latencyNs / 1000)
        var details: [String: AttrValue] = ["outcome": .string(result.outcome), "continuation": .string(continuation),
                                             "latency_us": .int(latencyUs), "executor": .string(kind == .echo ? "echo" : "command")]
        if let s = result.exitStatus { details["exit_status"] = .int(Int64(s)) }
        context.audit(.about(cap, decision: "execute", reason: result.reason.isEmpty ? result.outcome : result.reason, details: details))

        var receipt: [(String, ConfigValue)] = [
            ("cap", .string(cap.id.description)), ("intent", .string(cap.intent)), ("actor", .string(cap.actor)),
            ("outcome", .string(result.outcome)), ("reason", .string(result.reason)), ("continuation", .string(continuation)),
            ("latency_us", .int(latencyUs)), ("executor", .string(kind == .echo ? "echo" : "command")),
            ("hops", .int(Int64(cap.hops))), ("rank", .int(Int64(clamping: cap.rank))), ("time_ns", .int(Int64(clamping: context.wallClockNs))),
            ("output", .string(String(decoding: result.output, as: UTF8.self))), ("truncated", .bool(result.truncated)),
        ]
        if let s = result.exitStatus { receipt.append(("exit_status", .int(Int64(s)))) }
        let body = ConfigValue.object(receipt)

        // Where the cap itself goes, and its follow-ups.
        switch continuation {
        case "reject":
            var t = cap; t.attrs["triage_reason"] = .string(result.reason.isEmpty ? "rejected" : result.reason)
            context.emit(t, to: out("triage_reject"))
        case "resync-needed":
            var t = cap; t.attrs["triage_reason"] = .string(result.reason.isEmpty ? "resync-needed" : result.reason)
            context.emit(t, to: out("triage_resync"))
        default:
            emitFollowups(cap, continuation: continuation, context: context)
        }
        emitReceipt(body, cap: cap, context: context)
    }

    static let followupIntents: [String: [String]] = [
        "continue": [""], "fork": [".fork.alpha", ".fork.beta"], "freeze_resume": [".resume.frozen"],
        "fork_on_hop_off": [".resume.catchup", ".resume.live"], "rebuild": [".resume.rebuild"], "offline_fallback": [".resume.offline"],
    ]

    func emitFollowups(_ cap: Envelope, continuation: String, context: any StageContext) {
        guard let suffixes = Self.followupIntents[continuation] else { return }
        for (i, suffix) in suffixes.enumerated() {
            var f = cap.derived(output: "followups", index: UInt32(i))
            f.hops = cap.hops &+ 1
            f.intent = cap.intent + suffix
            // `continue` keeps going (until max_hops); every other follow-up ends its chain.
            f.attrs["continuation"] = .string(continuation == "continue" ? "continue" : "receipt")
            f.attrs["followup_of"] = .string(continuation)
            // A new event: placed again by causal-time when looped back (rank and clock from its parent there).
            f.rank = 0
            f.clock = [:]
            if f.hops > maxHops {
                hopLimited += 1
                f.attrs["triage_reason"] = .string("hop-limit: hops \(f.hops) > max_hops \(maxHops)")
                context.audit(.about(f, decision: "triage", reason: "hop-limit: hops \(f.hops) > max_hops \(maxHops)"))
                context.emit(f, to: out("triage"))
            } else {
                followups += 1
                context.emit(f, to: out("followups"))
            }
        }
    }

    func perform(_ cap: Envelope) -> Outcome {
        switch kind {
        case .echo:
            let t0 = CommandRunner.monotonicNs()
            let p = cap.payload
            let kept = Array(p.prefix(maxOutput))
            return Outcome(outcome: "executed", reason: "", output: kept, truncated: p.count > maxOutput, exitStatus: nil,
                           latencyNs: CommandRunner.monotonicNs() - t0)
        case .command:
            guard let v = try? JSON.parse(bytes: cap.payload), let list = v["argv"]?.listValue, !list.isEmpty else {
                return Outcome(outcome: "rejected", reason: "the cap's payload has no {\"argv\": [program, args...]}", output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            }
            let argv = list.compactMap(\.stringValue)
            guard argv.count == list.count, let prog = argv.first else {
                return Outcome(outcome: "rejected", reason: "argv must be a list of strings", output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            }
            guard allow.contains(prog) else {
                return Outcome(outcome: "rejected", reason: "'\(prog)' is not on the allow-list", output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            }
            let r = CommandRunner.run(argv, timeoutNs: timeoutNs, maxOutput: maxOutput)
            if let e = r.spawnError { return Outcome(outcome: "rejected", reason: e, output: [], truncated: false, exitStatus: nil, latencyNs: r.elapsedNs) }
            if r.timedOut {
                return Outcome(outcome: "rejected", reason: "timed out after \(timeoutNs / 1_000_000) ms (killed)", output: r.stdout,
                               truncated: r.truncated, exitStatus: nil, latencyNs: r.elapsedNs)
            }
            if let s = r.signal {
                return Outcome(outcome: "rejected", reason: "killed by signal \(s)", output: r.stdout, truncated: r.truncated, exitStatus: nil, latencyNs: r.elapsedNs)
            }
            let status = r.exitStatus ?? -1
            return Outcome(outcome: status == 0 ? "executed" : "rejected", reason: status == 0 ? "" : "exit status \(status)",
                           output: r.stdout, truncated: r.truncated, exitStatus: status, latencyNs: r.elapsedNs)
        }
    }

    func emitReceipt(_ body: ConfigValue, cap: Envelope, context: any StageContext) {
        guard signer != nil else {
            send(receipt: .object([("receipt", body)]), cap: cap, context: context)
            return
        }
        if pending.isEmpty { firstPendingAt = context.now }
        pending.append((body, cap))
        if pending.count >= batchSize { flush(context) }
    }

    func send(receipt payload: ConfigValue, cap: Envelope, context: any StageContext) {
        var r = cap.derived(output: "receipts", index: 0, payload: Array(JSON.serialize(payload).utf8))
        r.attrs["outcome"] = payload["receipt"]?["outcome"]?.stringValue.map { .string($0) }
        r.attrs["kind"] = .string("receipt")
        context.emit(r, to: out("receipts"))
    }

    /// Signs the pending batch's Merkle root and emits every receipt with its proof.
    func flush(_ context: any StageContext) {
        guard let signer, !pending.isEmpty else { return }
        let leaves = pending.map { Receipts.leaf($0.receipt) }
        let (root, paths) = Receipts.tree(leaves)
        let sig = signer.sign(Receipts.domain + root)
        batches += 1
        let rootHex = Hex.encode(root), sigHex = Hex.encode(sig), kid = Hex.encode(signer.keyID)
        for (i, p) in pending.enumerated() {
            let proof = ConfigValue.object([
                ("batch_root", .string(rootHex)), ("index", .int(Int64(i))), ("count", .int(Int64(pending.count))),
                ("path", .list(paths[i].map { .string(Hex.encode($0)) })), ("batch_sig", .string(sigHex)), ("key_id", .string(kid)),
            ])
            send(receipt: .object([("receipt", p.receipt), ("proof", proof)]), cap: p.cap, context: context)
        }
        pending.removeAll(keepingCapacity: true)
    }

    public var heldCount: Int { pending.count }
    public var tickInterval: UInt64? { max(1_000_000, min(batchNs, 1_000_000_000)) }
    public func tick(context: any StageContext) throws {
        if !pending.isEmpty && context.now &- firstPendingAt >= batchNs { flush(context) }
        report(context)
    }
    public func drain(context: any StageContext) throws { flush(context); report(context) }

    func report(_ c: any StageContext) {
        c.report("executed", .int(Int64(executed))); c.report("rejected", .int(Int64(rejected)))
        c.report("resync_needed", .int(Int64(resync))); c.report("followups", .int(Int64(followups)))
        c.report("hop_limited", .int(Int64(hopLimited)))
        if signer != nil { c.report("batches_signed", .int(Int64(batches))); c.report("receipts_waiting", .int(Int64(pending.count))) }
        let n = executed + rejected + resync
        if n > 0 { c.report("mean_latency_us", .double(Double(latencySumUs) / Double(n))) }
    }
}
