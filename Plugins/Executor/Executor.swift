import Glibc
import PipeKit
import PipeSeal
import PipeZMQ

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
            ConfigField("executor", .enumeration(["echo", "command", "external"]), default: .string("echo"),
                        doc: "`echo`: the receipt's output is the cap's payload. `command`: run the payload's argv (argv[0] an absolute path on `allow`). `external`: ask the service at `endpoint` (docs/cap-pipeline.md)."),
            ConfigField("endpoint", .string, optional: true, doc: "`external`: the executor service's ZeroMQ endpoint (ipc://PATH or tcp://HOST:PORT)."),
            ConfigField("curve_key", .string, optional: true, doc: "`external` over tcp: this host's CURVE secret key file (curve.key), with `server_key`. Relative to the run directory."),
            ConfigField("server_key", .string, optional: true, doc: "`external` over tcp: the service's CURVE public key (Z85, or a curve.pub path)."),
            ConfigField("insecure", .bool, default: .bool(false), doc: "`external` over tcp without CURVE (plaintext: anyone on the path reads and forges caps and answers); a warning is logged at start."),
            ConfigField("allow", .list(.string), optional: true, doc: "Absolute paths of the programs `command` may run; anything else is rejected."),
            ConfigField("timeout_ms", .int(min: 1, max: 3_600_000), default: .int(5000), doc: "A command still running after this is killed (its process group) and the cap rejected."),
            ConfigField("max_output_bytes", .int(min: 0, max: 256 << 10), default: .int(65536), doc: "Output kept in the receipt (stdout and stderr together); the rest is discarded and `truncated` set."),
            ConfigField("max_hops", .int(min: 0, max: 1_000_000), default: .int(8), doc: "A follow-up whose hops would exceed this goes to `triage` with reason `hop-limit`."),
            ConfigField("key", .string, optional: true, doc: "Ed25519 signing key file (`pipehost keygen`): receipts are then signed per batch. Relative to the run directory."),
            ConfigField("create_key", .bool, default: .bool(false), doc: "Generate `key` (mode 0600, with a `.pub` beside it) when it does not exist."),
            ConfigField("batch_size", .int(min: 1, max: 65536), default: .int(64), doc: "Receipts per signed batch (at most)."),
            ConfigField("batch_ms", .int(min: 0, max: 60_000), default: .int(10), doc: "A batch is signed at the latest this long after its first receipt."),
        ],
        check: { c in
            if c.string("executor") == "external" {
                guard let e = c.string("endpoint"), e.hasPrefix("ipc://") || e.hasPrefix("tcp://") else {
                    return [ConfigIssue(key: "endpoint", message: "the `external` executor needs an `endpoint` (ipc://PATH or tcp://HOST:PORT)")]
                }
                if (c.string("curve_key") == nil) != (c.string("server_key") == nil) {
                    return [ConfigIssue(key: "curve_key", message: "`curve_key` and `server_key` go together (CURVE to the executor service)")]
                }
                if e.hasPrefix("tcp://") && c.string("curve_key") == nil && c.bool("insecure") != true {
                    return [ConfigIssue(key: "endpoint", message: "a tcp endpoint needs CURVE (`curve_key` and `server_key`), or `insecure: true` for plaintext")]
                }
            }
            if c.string("executor") == "command" && (c.strings("allow") ?? []).isEmpty {
                return [ConfigIssue(key: "allow", message: "the `command` executor needs an `allow` list of absolute program paths")]
            }
            if let bad = (c.strings("allow") ?? []).first(where: { !$0.hasPrefix("/") }) {
                return [ConfigIssue(key: "allow", message: "'\(bad)' is not an absolute path")]
            }
            return []
        },
        make: { try ExecutorStage(config: $0) })

    enum Kind: String { case echo, command, external }
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
    let endpoint: String?, curveKey: String?, serverKey: String?
    var external: ExternalExecutor?
    var outs: [String: OutputHandle] = [:]
    /// Receipts waiting for their batch signature: canonical bytes, outcome and the cap.
    var pending: [(canonical: [UInt8], outcome: String, cap: Envelope)] = []
    var firstPendingAt: UInt64 = 0
    var executed = 0, rejected = 0, resync = 0, followups = 0, hopLimited = 0, batches = 0
    var latencySumUs: UInt64 = 0

    init(config c: ConfigReader) throws {
        kind = Kind(rawValue: c.string("executor") ?? "echo") ?? .echo
        endpoint = c.string("endpoint")
        curveKey = c.string("curve_key")
        serverKey = c.string("server_key")
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
        if kind == .external, let e = endpoint {
            var keys: (publicKey: String, secretKey: String, serverKey: String)?
            if let ck = curveKey, let sk = serverKey {
                do {
                    let own = try CurveKeyFiles.loadSecret(context.resolvePath(ck))
                    keys = (own.publicKey, own.secretKey, try CurveKeyFiles.loadPublic(sk, base: context.runDirectory))
                } catch { throw StageError.halt("executor: \(error)") }
            }
            if keys == nil && e.hasPrefix("tcp://") {
                context.logger.warning("executor: plaintext tcp to \(e) (insecure: true): caps and answers travel unencrypted and unauthenticated")
            }
            do { external = try ExternalExecutor(endpoint: e, keys: keys) } catch { throw StageError.halt("executor: cannot connect to \(e): \(error)") }
        }
        if let k = keyPath {
            do {
                let (key, created) = try KeyFiles.loadOrCreateSigningKey(context.resolvePath(k), create: createKey)
                if created { context.logger.notice("executor: generated signing key \(context.resolvePath(k)) (key id \(Hex.encode(key.keyID)))") }
                signer = key
            } catch { throw StageError.halt("executor key: \(error)") }
        }
    }

    func out(_ n: String) -> OutputHandle { outs[n] ?? OutputHandle(index: 0, name: n) }

    /// Why `cap` cannot be a cap at all (the fields every cap names, and the types of the
    /// attributes the executor reads), or nil. Such a cap is rejected with the reason, never run.
    static func malformed(_ cap: Envelope) -> String? {
        if cap.actor.isEmpty { return "malformed cap: no actor" }
        if cap.intent.isEmpty { return "malformed cap: no intent" }
        if let c = cap.attrs["continuation"], c.stringValue == nil { return "malformed cap: continuation is \(c), not text" }
        return nil
    }

    struct Outcome { var outcome: String; var reason: String; var output: [UInt8]; var truncated: Bool; var exitStatus: Int32?; var latencyNs: UInt64; var program: String? = nil }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        let cap = envelope
        let asked = cap.attrs["continuation"]?.stringValue ?? "receipt"   // not text: malformed, below
        var result: Outcome
        var continuation = asked
        if let missing = Self.malformed(cap) {
            result = Outcome(outcome: "rejected", reason: missing, output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            continuation = "reject"
            context.count("malformed_caps")
        } else if !Self.continuations.contains(asked) {
            let why = asked == "resume"
                ? "continuation 'resume' was not resolved (a mux coffee_lane_policy resolves it before the executor)"
                : "unknown continuation '\(asked)' (expected \(Self.continuations.joined(separator: ", ")))"
            result = Outcome(outcome: "rejected", reason: why, output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            continuation = "reject"
            context.count("unknown_continuations")
        } else if asked == "reject" || asked == "resync-needed" {
            // Asked for, not performed: the receipt says so and nothing runs.
            result = Outcome(outcome: asked == "reject" ? "rejected" : "resync-needed", reason: "the cap asked for continuation '\(asked)'; not performed",
                             output: [], truncated: false, exitStatus: nil, latencyNs: 0)
        } else {
            result = perform(cap)
            if result.outcome == "rejected" { continuation = "reject" }
        }
        switch result.outcome {
        case "executed": executed += 1
        case "rejected": rejected += 1
        default: resync += 1
        }
        latencySumUs &+= result.latencyNs / 1000
        let latencyUs = Int64(result.latencyNs / 1000)
        var details: [String: AttrValue] = ["outcome": .string(result.outcome), "continuation": .string(continuation),
                                             "latency_us": .int(latencyUs), "executor": .string(kind.rawValue)]
        if let s = result.exitStatus { details["exit_status"] = .int(Int64(s)) }
        if let p = result.program { details["program"] = .string(p) }
        details["hops"] = .int(Int64(cap.hops))
        // The lane's story, so the audit log alone can say how the cap got here (audit exports).
        for k in ["lane_class", "lane_collision_policy", "coffee_lane_policy", "coffee_reason", "lane_priority", "preemptible", "slot_key"] {
            if let v = cap.attrs[k] { details[k] = v }
        }
        context.audit(.about(cap, decision: "execute", reason: result.reason.isEmpty ? result.outcome : result.reason, details: details))

        var receipt: [(String, ConfigValue)] = [
            ("cap", .string(cap.id.description)), ("intent", .string(cap.intent)), ("actor", .string(cap.actor)),
            ("outcome", .string(result.outcome)), ("reason", .string(result.reason)), ("continuation", .string(continuation)),
            ("latency_us", .int(latencyUs)), ("executor", .string(kind.rawValue)),
            ("hops", .int(Int64(cap.hops))), ("rank", .int(Int64(clamping: cap.rank))), ("time_ns", .int(Int64(clamping: context.wallClockNs))),
            ("output", .string(String(decoding: result.output, as: UTF8.self))), ("truncated", .bool(result.truncated)),
        ]
        if let s = result.exitStatus { receipt.append(("exit_status", .int(Int64(s)))) }
        if let p = result.program { receipt.append(("program", .string(p))) }
        // Canonical form (docs/cap-pipeline.md): keys sorted, written once; the payload embeds these bytes.
        receipt.sort { $0.0 < $1.0 }
        var canonical: [UInt8] = []
        canonical.reserveCapacity(320 + result.output.count)
        JSON.write(.object(receipt), into: &canonical)

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
        emitReceipt(canonical, outcome: result.outcome, cap: cap, context: context)
    }

    static let followupIntents: [String: [String]] = [
        "continue": [""], "fork": [".fork.alpha", ".fork.beta"], "freeze_resume": [".resume.frozen"],
        "fork_on_hop_off": [".resume.catchup", ".resume.live"], "rebuild": [".resume.rebuild"], "offline_fallback": [".resume.offline"],
    ]

    func emitFollowups(_ cap: Envelope, continuation: String, context: any StageContext) {
        guard let suffixes = Self.followupIntents[continuation] else { return }
        for (i, suffix) in suffixes.enumerated() {
            var f = cap.derived(output: "followups", index: UInt32(i))
            f.hops = cap.hops == .max ? .max : cap.hops + 1
            f.attrs["slot"] = nil
            f.attrs["align_forced"] = nil
            f.attrs["time_diff_s"] = nil
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
            let t0 = monotonicNs()
            let p = cap.payload
            let kept = Array(p.prefix(maxOutput))
            return Outcome(outcome: "executed", reason: "", output: kept, truncated: p.count > maxOutput, exitStatus: nil,
                           latencyNs: monotonicNs() - t0)
        case .external:
            guard let x = external else {
                return Outcome(outcome: "rejected", reason: "the external executor is not connected", output: [], truncated: false, exitStatus: nil, latencyNs: 0)
            }
            let t0 = monotonicNs()
            let a = x.perform(cap, timeoutNs: timeoutNs, now: monotonicNs)
            let elapsed = monotonicNs() - t0
            var o = Outcome(outcome: a.outcome, reason: a.reason, output: Array(a.output.prefix(maxOutput)), truncated: a.output.count > maxOutput,
                            exitStatus: a.exitStatus, latencyNs: elapsed)
            o.program = x.endpoint
            return o
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
            var o: Outcome
            if let e = r.spawnError {
                o = Outcome(outcome: "rejected", reason: e, output: [], truncated: false, exitStatus: nil, latencyNs: r.elapsedNs)
            } else if r.timedOut {
                o = Outcome(outcome: "rejected", reason: "timed out after \(timeoutNs / 1_000_000) ms (killed)", output: r.stdout,
                            truncated: r.truncated, exitStatus: nil, latencyNs: r.elapsedNs)
            } else if let s = r.signal {
                o = Outcome(outcome: "rejected", reason: "killed by signal \(s)", output: r.stdout, truncated: r.truncated, exitStatus: nil, latencyNs: r.elapsedNs)
            } else {
                let status = r.exitStatus ?? -1
                o = Outcome(outcome: status == 0 ? "executed" : "rejected", reason: status == 0 ? "" : "exit status \(status)",
                            output: r.stdout, truncated: r.truncated, exitStatus: status, latencyNs: r.elapsedNs)
            }
            o.program = prog
            return o
        }
    }

    func emitReceipt(_ canonical: [UInt8], outcome: String, cap: Envelope, context: any StageContext) {
        guard signer != nil else {
            var p: [UInt8] = Array(#"{"receipt":"#.utf8)
            p.reserveCapacity(canonical.count + 16)
            p.append(contentsOf: canonical); p.append(UInt8(ascii: "}"))
            send(payload: p, outcome: outcome, cap: cap, context: context)
            return
        }
        if pending.isEmpty { firstPendingAt = context.now }
        pending.append((canonical, outcome, cap))
        if pending.count >= batchSize { flush(context) }
    }

    func send(payload: [UInt8], outcome: String, cap: Envelope, context: any StageContext) {
        var r = cap.derived(output: "receipts", index: 0, payload: payload)
        r.attrs["slot"] = nil   // the slot copy was for the executor; receipts keep only its key
        r.attrs["outcome"] = .string(outcome)
        r.attrs["kind"] = .string("receipt")
        context.emit(r, to: out("receipts"))
    }

    /// Signs the pending batch's Merkle root and emits every receipt with its proof.
    func flush(_ context: any StageContext) {
        guard let signer, !pending.isEmpty else { return }
        let leaves = pending.map { Receipts.leaf(canonical: $0.canonical) }
        let (root, paths) = Receipts.tree(leaves)
        let sig = signer.sign(Receipts.signedMessage(count: pending.count, root: root))
        batches += 1
        // The proof's fixed parts, written once per batch.
        let rootPart = Array(#","proof":{"batch_root":""#.utf8) + Array(Hex.encode(root).utf8) + Array(#"","index":"#.utf8)
        let tail = Array(#"],"batch_sig":""#.utf8) + Array(Hex.encode(sig).utf8) + Array(#"","key_id":""#.utf8)
            + Array(Hex.encode(signer.keyID).utf8) + Array(#""}}"#.utf8)
        let countPart = Array(#","count":\#(pending.count),"path":["#.utf8)
        for (i, p) in pending.enumerated() {
            var b: [UInt8] = Array(#"{"receipt":"#.utf8)
            b.reserveCapacity(p.canonical.count + 400 + 67 * paths[i].count)
            b.append(contentsOf: p.canonical)
            b.append(contentsOf: rootPart)
            b.append(contentsOf: String(i).utf8)
            b.append(contentsOf: countPart)
            for (k, h) in paths[i].enumerated() {
                if k > 0 { b.append(UInt8(ascii: ",")) }
                b.append(UInt8(ascii: "\"")); Hex.append(h, to: &b); b.append(UInt8(ascii: "\""))
            }
            b.append(contentsOf: tail)
            send(payload: b, outcome: p.outcome, cap: p.cap, context: context)
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
