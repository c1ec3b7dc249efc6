import AlignerStages
import CausalStages
import ExecutorStages
import GatewayStages
import MuxStages
import SlotStages
import Foundation
import PipeAudit
import PipeKit
import PipeKitTesting
import PipeSeal
import PipeStore
import Testing

private func cap(_ intent: String = "demo.run", actor: String = "anna", continuation: String? = nil, payload: String = "hello",
                 parent: EnvelopeID? = nil, rank: UInt64 = 0, clock: [String: UInt64] = [:]) -> Envelope {
    var e = Envelope(parent: parent, actor: actor, intent: intent, payload: Array(payload.utf8))
    if let c = continuation { e.attrs["continuation"] = .string(c) }
    e.rank = rank
    e.clock = clock
    return e
}

@Suite("Cap pipeline: causal-time")
struct CausalTimeTests {
    @Test func lamportReceiveRule_takesTheMaxPlusOne() throws {
        let h = try StageHarness(CausalTimeStage.descriptor)
        try h.feed(cap(rank: 0)); try h.feed(cap(rank: 10)); try h.feed(cap(rank: 3)); try h.feed(cap(rank: 11))
        #expect(h.take().map(\.rank) == [1, 11, 12, 13])
    }

    @Test func aChain100000Deep_runsInConstantStack() throws {
        let h = try StageHarness(CausalTimeStage.descriptor, config: .object([("unknown_parent", .string("triage")), ("vector_clocks", .bool(true))]))
        var prev = cap()
        try h.feed(prev)
        for _ in 1..<100_000 {
            let next = prev.derived(output: "out", index: 0)
            var n = next; n.clock = [:]; n.rank = 0
            try h.feed(n)
            prev = n
        }
        let out = h.take()
        #expect(out.count == 100_000 && h.take("triage").isEmpty)
        #expect(out.last?.rank == 100_000)
        #expect(out.last?.clock == ["anna": 100_000])
    }

    @Test func guard_unknownParentsAndClocksThatDoNotDominate_goToTriageWithTheReason() throws {
        let h = try StageHarness(CausalTimeStage.descriptor,
                                 config: .object([("unknown_parent", .string("triage")), ("vector_clocks", .bool(true)), ("window", .int(2))]))
        let root = cap(actor: "a")
        try h.feed(root)
        let placedRoot = try #require(h.take().first)
        #expect(placedRoot.clock == ["a": 1])
        // A child with a clock equal to its parent's is a violation (the sketch accepted it).
        try h.feed(cap(actor: "b", parent: root.id, clock: ["a": 1]))
        // One that strictly dominates passes.
        try h.feed(cap(actor: "b", parent: root.id, clock: ["a": 1, "b": 1]))
        // One concurrent with its parent does not.
        try h.feed(cap(actor: "c", parent: root.id, clock: ["c": 5]))
        let passed = h.take(), triaged = h.take("triage")
        #expect(passed.count == 1 && passed[0].clock == ["a": 1, "b": 1])
        #expect(triaged.count == 2)
        #expect(triaged[0].attrs["triage_reason"]?.stringValue?.contains("is equal to its parent's {a:1}") == true)
        #expect(triaged[1].attrs["triage_reason"]?.stringValue?.contains("is concurrent with its parent's") == true)
        // The window holds 2 ids: after two more placements the root is forgotten.
        try h.feed(cap(actor: "x")); try h.feed(cap(actor: "y"))
        _ = h.take()
        try h.feed(cap(actor: "b", parent: root.id))
        let unknown = h.take("triage")
        #expect(unknown.count == 1 && unknown[0].attrs["triage_reason"]?.stringValue?.contains("unknown parent") == true)
        #expect(h.takeAudits().filter { $0.decision == "triage" }.count == 3)
        // With `accept` (the default) the same envelope is placed as a root.
        let lenient = try StageHarness(CausalTimeStage.descriptor)
        try lenient.feed(cap(parent: EnvelopeID(hi: 9, lo: 9)))
        #expect(lenient.take().count == 1 && lenient.take("triage").isEmpty)
    }

    @Test func relations_ofVectorClocks() {
        #expect(CausalRelation.of(["a": 1], ["a": 2]) == .before)
        #expect(CausalRelation.of(["a": 2, "b": 1], ["a": 2]) == .after)
        #expect(CausalRelation.of(["a": 1], ["a": 1, "b": 0]) == .equal)
        #expect(CausalRelation.of(["a": 1], ["b": 1]) == .concurrent)
    }
}

@Suite("Cap pipeline: executor and receipts")
struct ExecutorTests {
    static func keyDir() throws -> (dir: String, key: SigningKey) {
        let d = Paths.tempDir("exec-key")
        let k = try SigningKey.generate()
        try KeyFiles.writeSecret(KeyFiles.hex(of: k), to: d + "/signing.key")
        return (d, k)
    }

    @Test func echo_receiptsAreBatchSigned_andEachVerifiesAlone_andAFlippedByteFails() throws {
        let (dir, key) = try Self.keyDir()
        // Five are signed at once (the batch is full); two wait for the batch time.
        let h2 = try StageHarness(ExecutorStage.descriptor, config: .object([("key", .string("signing.key")), ("batch_size", .int(5)), ("batch_ms", .int(50))]),
                                  runDirectory: dir)
        for i in 0..<7 { try h2.feed(cap(payload: "cap \(i)")) }
        let signedNow = h2.take("receipts")
        #expect(signedNow.count == 5)
        #expect(h2.stage.heldCount == 2)
        try h2.advance(byMs: 60)
        let later = h2.take("receipts")
        #expect(later.count == 2)
        #expect(try h2.finish().held == 0)
        let receipts = signedNow + later
        var roots = Set<String>()
        for r in receipts {
            let payload = try JSON.parse(bytes: r.payload)
            #expect(Receipts.verify(payload, publicKey: key.publicKey) == nil, "\(payload)")
            #expect(payload["receipt"]?["outcome"]?.stringValue == "executed")
            roots.insert(payload["proof"]?["batch_root"]?.stringValue ?? "")
            // One byte of the receipt changed: it no longer reaches its root.
            var text = Array(JSON.serialize(payload).utf8)
            if let at = text.firstIndex(of: UInt8(ascii: "c")) {
                let start = text.indices.first { text[$0...].starts(with: Array("cap ".utf8)) } ?? at
                text[start] = UInt8(ascii: "C")
            }
            let flipped = try JSON.parse(bytes: text)
            #expect(Receipts.verify(flipped, publicKey: key.publicKey)?.contains("altered") == true)
        }
        #expect(roots.count == 2)
        let other = try SigningKey.generate()
        #expect(Receipts.verify(try JSON.parse(bytes: receipts[0].payload), publicKey: other.publicKey) != nil)
    }

    @Test func merkleProofs_verifyForEveryIndexOfEveryBatchSize() {
        for n in 1...17 {
            let leaves = (0..<n).map { Digest.sha256([UInt8(truncatingIfNeeded: $0)]) }
            let (root, paths) = Receipts.tree(leaves)
            for i in 0..<n {
                #expect(Receipts.root(leaf: leaves[i], index: i, count: n, path: paths[i]) == root, "n \(n) i \(i)")
                if n > 1 { #expect(Receipts.root(leaf: leaves[(i + 1) % n], index: i, count: n, path: paths[i]) != root) }
            }
        }
    }

    @Test func command_latencyIsMeasured_allowListAndTimeoutReject_withReasons() throws {
        let h = try StageHarness(ExecutorStage.descriptor, config: .object([
            // A timeout far above the 50 ms sleep: on a loaded 2-core machine starting a process alone
            // took over 300 ms once (the sleep then timed out); the 5 s sleep still times out well before it ends.
            ("executor", .string("command")), ("allow", .list([.string("/bin/sleep"), .string("/bin/echo")])), ("timeout_ms", .int(2000)),
        ]))
        try h.feed(cap(payload: #"{"argv":["/bin/sleep","0.05"]}"#))
        try h.feed(cap(payload: #"{"argv":["/bin/cat","/etc/passwd"]}"#))
        try h.feed(cap(payload: #"{"argv":["/bin/sleep","5"]}"#))
        try h.feed(cap(payload: #"{"argv":["/bin/echo","hi","there"]}"#))
        try h.feed(cap(payload: "not json"))
        let rs = try h.take("receipts").map { try JSON.parse(bytes: $0.payload)["receipt"] ?? .null }
        #expect(rs.count == 5)
        #expect(rs[0]["outcome"]?.stringValue == "executed" && (rs[0]["latency_us"]?.intValue ?? 0) >= 50_000)
        #expect(rs[1]["outcome"]?.stringValue == "rejected" && rs[1]["reason"]?.stringValue == "'/bin/cat' is not on the allow-list")
        #expect(rs[2]["outcome"]?.stringValue == "rejected" && rs[2]["reason"]?.stringValue?.contains("timed out after 2000 ms") == true)
        #expect((rs[2]["latency_us"]?.intValue ?? 0) >= 2_000_000 && (rs[2]["latency_us"]?.intValue ?? 0) < 4_500_000)
        #expect(rs[3]["outcome"]?.stringValue == "executed" && rs[3]["output"]?.stringValue == "hi there\n" && rs[3]["exit_status"]?.intValue == 0)
        #expect(rs[4]["outcome"]?.stringValue == "rejected" && rs[4]["reason"]?.stringValue?.contains("argv") == true)
        // Rejected caps go to triage_reject with the reason; every execution is audited.
        let rejected = h.take("triage_reject")
        #expect(rejected.count == 3 && rejected[0].attrs["triage_reason"]?.stringValue?.contains("allow-list") == true)
        let audits = h.takeAudits().filter { $0.decision == "execute" }
        #expect(audits.count == 5 && audits[0].details["latency_us"]?.intValue ?? 0 >= 50_000)
    }

    /// The measured latency of a command that sleeps 50 ms reaches its gateway event too.
    @Test func command_latencyReachesTheGatewayEvent() throws {
        let dir = Paths.tempDir("gw-latency")
        let h = try StageHarness(ExecutorStage.descriptor, config: .object([
            ("executor", .string("command")), ("allow", .list([.string("/bin/sleep")])),
        ]))
        try h.feed(cap("crane.wait", payload: #"{"argv":["/bin/sleep","0.05"]}"#))
        let receipt = try #require(h.take("receipts").first)
        let g = try StageHarness(GatewayEventsSink.descriptor, config: .object([("path", .string("events.jsonl"))]), runDirectory: dir)
        try g.feed(receipt, port: "executed", from: "exec.receipts")
        _ = try g.finish()
        g.stage.stop()
        let line = try String(contentsOfFile: dir + "/events.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(line.count == 1)
        let ev = try JSON.parse(String(line[0]))
        #expect(GatewayEvent.validate(ev).isEmpty, "\(GatewayEvent.validate(ev))")
        #expect((ev["latency_ms"]?.doubleValue ?? 0) >= 50 && ev["status"] == .string("executed") && ev["model"] == .string("/bin/sleep"))
        #expect(ev["provider"] == .string("command") && ev["verified"] == .bool(false) && ev["attestation_layer"] == .string("none"))
    }

    @Test func continuations_followTheTable_andMaxHopsStopsALoop() throws {
        let h = try StageHarness(ExecutorStage.descriptor, config: .object([("max_hops", .int(2))]))
        try h.feed(cap("job", continuation: "fork"))
        let forks = h.take("followups")
        #expect(forks.map(\.intent) == ["job.fork.alpha", "job.fork.beta"] && forks.allSatisfy { $0.hops == 1 })
        for (c, intents) in [("freeze_resume", ["job.resume.frozen"]), ("fork_on_hop_off", ["job.resume.catchup", "job.resume.live"]),
                             ("rebuild", ["job.resume.rebuild"]), ("offline_fallback", ["job.resume.offline"]), ("receipt", [])] {
            try h.feed(cap("job", continuation: c))
            #expect(h.take("followups").map(\.intent) == intents, "\(c)")
        }
        try h.feed(cap("job", continuation: "resync-needed"))
        #expect(h.take("triage_resync").count == 1)
        try h.feed(cap("job", continuation: "reject"))
        #expect(h.take("triage_reject").count == 1)
        // An unknown continuation is an error: rejected, with the reason, not turned into `receipt`.
        try h.feed(cap("job", continuation: "teleport"))
        let bad = h.take("triage_reject")
        #expect(bad.count == 1 && bad[0].attrs["triage_reason"]?.stringValue?.contains("unknown continuation 'teleport'") == true)
        // `continue` loops until max_hops, then hop-limit.
        var c = cap("loop", continuation: "continue")
        var hops: [UInt32] = []
        while true {
            try h.feed(c)
            guard let next = h.take("followups").first else { break }
            hops.append(next.hops)
            c = next
        }
        #expect(hops == [1, 2])
        let limited = h.take("triage")
        #expect(limited.count == 1 && limited[0].attrs["triage_reason"]?.stringValue == "hop-limit: hops 3 > max_hops 2")
        let receipts = try h.take("receipts").map { try JSON.parse(bytes: $0.payload)["receipt"]?["outcome"]?.stringValue ?? "" }
        #expect(receipts.filter { $0 == "rejected" }.count == 2 && receipts.contains("resync-needed"))
    }

    @Test func commandExecutor_withoutAnAllowList_isAConfigError() {
        #expect(throws: StageError.self) { _ = try StageHarness(ExecutorStage.descriptor, config: .object([("executor", .string("command"))])) }
        #expect(throws: StageError.self) {
            _ = try StageHarness(ExecutorStage.descriptor, config: .object([("executor", .string("command")), ("allow", .list([.string("sleep")]))]))
        }
    }
}

@Suite("Cap pipeline: running", .serialized)
struct CapPipelineTests {
    /// Receipts signed with a `pipehost keygen` key verify with `pipectl receipts verify`; one
    /// changed byte is named by its line; the looped pipeline ends by itself with small bounds.
    @Test func capExec_receiptsVerifyFromTheCommandLine_andTheLoopEnds() throws {
        let run = Paths.tempDir("cap-exec")
        let keys = try runProcess(Paths.pipehost, ["keygen", "-o", run + "/keys"], timeout: 30)
        #expect(keys.status == 0, "\(keys.stderr)")
        let text = try String(contentsOfFile: Paths.root + "/pipelines/cap-exec.yaml", encoding: .utf8)
            .replacingOccurrences(of: "key: keys/executor.key, create_key: true", with: "key: keys/signing.key")
        #expect(text.contains("key: keys/signing.key"))
        let (r, s) = try runPipeline(writeTemp(text, "cap-exec.yaml"), runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(s["failure"] == .null)
        let file = run + "/receipts.jsonl"
        let ok = try runProcess(Paths.pipectl, ["receipts", "verify", file, "--pub", run + "/keys/signing.pub"], timeout: 60)
        #expect(ok.status == 0 && ok.stdout.contains("1500 of 1500 receipt(s) valid"), "\(ok.stdout)\(ok.stderr)")
        // Another key: every receipt fails.
        let other = try runProcess(Paths.pipehost, ["keygen", "-o", run + "/other"], timeout: 30)
        #expect(other.status == 0)
        let wrong = try runProcess(Paths.pipectl, ["receipts", "verify", file, "--pub", run + "/other/signing.pub", "--json"], timeout: 60)
        let wrongJSON = try JSON.parse(wrong.stdout)
        #expect(wrong.status == 1 && wrongJSON["invalid"]?.intValue == 1500)
        // One byte of one receipt's output changed.
        var lines = try String(contentsOfFile: file, encoding: .utf8).split(separator: "\n").map(String.init)
        lines[41] = lines[41].replacingOccurrences(of: "inspect bay", with: "inspect bat")
        let tampered = run + "/tampered.jsonl"
        try (lines.joined(separator: "\n") + "\n").write(toFile: tampered, atomically: true, encoding: .utf8)
        let bad = try runProcess(Paths.pipectl, ["receipts", "verify", tampered, "--pub", run + "/keys/signing.pub"], timeout: 60)
        #expect(bad.status == 1 && bad.stdout.contains("tampered.jsonl:42: INVALID receipt") && bad.stdout.contains("altered")
                && bad.stdout.contains("1499 of 1500"), "\(bad.stdout)")
        let usage = try runProcess(Paths.pipectl, ["receipts", "verify", file], timeout: 30)
        #expect(usage.status == 64)
        // Every execution is in the audit log, with its latency.
        let executions = try auditJSONL(run).split(separator: "\n").filter { $0.contains(#""decision":"execute""#) }
        #expect(executions.count == 1500)
    }
}

extension CapPipelineTests {
    /// The whole chain: it ends by itself with its loops; every receipt verifies; every gateway
    /// event meets the contract (and the validator names a broken one); no hard_avoid cap was
    /// executed; the audit log is intact.
    @Test func capBus_wholeChain_receiptsEventsAndAudit() throws {
        let run = Paths.tempDir("cap-bus")
        let (r, s) = try runPipeline(Paths.root + "/pipelines/cap-bus.yaml", runDir: run)
        #expect(r.status == 0, "\(r.stderr)")
        #expect(s["failure"] == .null)
        let dead = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8)
        #expect(dead.isEmpty, "\(dead.prefix(500))")
        let v = try runProcess(Paths.pipectl, ["receipts", "verify", run + "/receipts.jsonl", "--pub", run + "/keys/executor.pub", "--json"], timeout: 60)
        let vj = try JSON.parse(v.stdout)
        #expect(v.status == 0 && vj["invalid"]?.intValue == 0 && (vj["receipts"]?.intValue ?? 0) > 1000, "\(v.stdout)")
        let ev = try runProcess(Paths.pipectl, ["events", "validate", run + "/gateway-events.jsonl", "--json"], timeout: 60)
        let evj = try JSON.parse(ev.stdout)
        #expect(ev.status == 0 && evj["invalid"]?.intValue == 0, "\(ev.stdout.prefix(2000))")
        let events = try String(contentsOfFile: run + "/gateway-events.jsonl", encoding: .utf8).split(separator: "\n").map { try JSON.parse(String($0)) }
        let executed = events.filter { $0["status"]?.stringValue != "dispatched" }
        #expect(executed.count == vj["receipts"]?.intValue.map(Int.init))
        #expect(executed.allSatisfy { $0["verified"] == .bool(true) && $0["attestation_layer"] == .string("self-signed") && $0.mapEntries?.count == 37 })
        #expect(!events.contains { $0["agent_id"] == .string("stranger") })
        #expect(events.contains { $0["lane_class"] == .string("offline") } && events.contains { $0["lane_class"] == .string("slow") })
        // One record with a missing field, an empty one and a wrong type: each is named.
        var broken = events[0]
        if case .map(var m) = broken {
            m.removeAll { $0.key == "surface" }
            if let i = m.firstIndex(where: { $0.key == "agent_id" }) { m[i].value = .string("") }
            if let i = m.firstIndex(where: { $0.key == "latency_ms" }) { m[i].value = .string("fast") }
            broken = .map(m)
        }
        let bad = run + "/bad-events.jsonl"
        try (JSON.serialize(events[1]) + "\n" + JSON.serialize(broken) + "\n").write(toFile: bad, atomically: true, encoding: .utf8)
        let b = try runProcess(Paths.pipectl, ["events", "validate", bad], timeout: 30)
        #expect(b.status == 1 && b.stdout.contains("bad-events.jsonl:2: surface: missing") && b.stdout.contains("bad-events.jsonl:2: agent_id: must not be empty")
                && b.stdout.contains("bad-events.jsonl:2: latency_ms: must be a number") && !b.stdout.contains(":1:"), "\(b.stdout)")
        let audit = try AuditVerifier.verify(path: run + "/audit.db")
        #expect(audit.ok && audit.unanchored == 0)
        let decisions = try auditJSONL(run).split(separator: "\n").map { try JSON.parse(String($0)) }
        let executions = decisions.filter { $0["erin"]?["decision"] == .string("execute") }
        let muxRejects = decisions.filter { $0["erin"]?["decision"] == .string("reject") && $0["details"]?["stage_kind"] == .string("mux") }
        #expect(executions.count == executed.count && muxRejects.count == 100)
        #expect(executions.allSatisfy { $0["details"]?["lane_class"]?.stringValue != nil && $0["details"]?["coffee_lane_policy"]?.stringValue != nil })

        // The audit log's own exports: gateway-event.v1 (one per execution and per mux refusal,
        // valid, anchored by the checkpoint, verified only with the pinned key), governance, cbom.
        let ge = try runProcess(Paths.pipectl, ["audit", "export", run + "/audit.db", "--format", "gateway-event.v1", "--pub", run + "/audit.pub"], timeout: 60)
        let geRecords = try ge.stdout.split(separator: "\n").map { try JSON.parse(String($0)) }
        #expect(ge.status == 0 && geRecords.count == executions.count + 100)
        #expect(geRecords.allSatisfy { GatewayEvent.validate($0).isEmpty }, "\(geRecords.lazy.map { GatewayEvent.validate($0) }.first { !$0.isEmpty } ?? [])")
        #expect(geRecords.allSatisfy { $0["attestation_layer"] == .string("self-signed") && $0["verified"] == .bool(true) })
        #expect(geRecords.filter { $0["status"] == .string("rejected") }.allSatisfy { $0["agent_id"] == .string("stranger") && $0["provider"] == .string("mux") })
        let gov = try JSON.parse(try runProcess(Paths.pipectl, ["audit", "export", run + "/audit.db", "--format", "governance"], timeout: 60).stdout)
        let links = gov["governance"]?["actor_model_provider_links"]?.listValue ?? []
        #expect(Set(links.compactMap { $0["actor"]?.stringValue }) == ["operator.anna", "agent.tool", "operator.ben"])
        #expect(gov["governance"]?["usage_events"]?.listValue?.count == executions.count)
        #expect(gov["governance"]?["trust_foundation"]?["chain"] == .string("intact"))
        let edges = gov["governance"]?["continuation_graph"]?["edges"]?.listValue ?? []
        #expect(!edges.isEmpty && edges.allSatisfy { $0["from"]?.stringValue?.count == 32 })
    }
}

@Suite("Cap pipeline: hostile input")
struct CapHostileInputTests {
    @Test func hugeOrUnreadableValues_failClosed_neverTrap() throws {
        // A proof claiming an enormous batch: refused, not an arithmetic trap.
        #expect(Receipts.root(leaf: [UInt8](repeating: 1, count: 32), index: 0, count: Int.max, path: [[UInt8](repeating: 2, count: 32)]) == nil)
        // Ranks and clocks beyond 2^62 go to triage.
        let place = try StageHarness(CausalTimeStage.descriptor, config: .object([("vector_clocks", .bool(true))]))
        try place.feed(cap(rank: .max)); try place.feed(cap(clock: ["x": .max]))
        #expect(place.take().isEmpty && place.take("triage").count == 2)
        // The coffee policy reads numbers given as text, and refuses what it cannot read.
        let mux = try StageHarness(MuxStage.descriptor, config: .object([("lanes", .object([("main", .object([]))])), ("default_lane", .string("main"))]))
        func policy(_ attrs: [String: AttrValue]) throws -> String {
            var e = cap(); for (k, v) in attrs { e.attrs[k] = v }
            try mux.feed(e)
            return (mux.take("main") + mux.take("triage_reject")).first?.attrs["coffee_lane_policy"]?.stringValue ?? ""
        }
        #expect(try policy(["trust_score": .string("0.1")]) == "hard_avoid")
        #expect(try policy(["trust_score": .string("high")]) == "hard_avoid")
        #expect(try policy(["recent_failures": .double(1e19)]) == "rebuild")
        #expect(try policy(["endpoint_status": .string("1e400")]) == "offline_fallback")
        #expect(try policy(["sealed_at": .int(Int64(mux.wallClockNs) + 3_600_000_000_000)]) == "hard_avoid")
    }

    @Test func aCapThatAsksToBeRejected_isNotRun() throws {
        let h = try StageHarness(ExecutorStage.descriptor, config: .object([("executor", .string("command")), ("allow", .list([.string("/bin/sleep")]))]))
        try h.feed(cap(continuation: "reject", payload: #"{"argv":["/bin/sleep","5"]}"#))
        let r = try JSON.parse(bytes: try #require(h.take("receipts").first).payload)["receipt"]
        #expect(r?["outcome"] == .string("rejected") && r?["latency_us"] == .int(0) && r?["reason"]?.stringValue?.contains("not performed") == true)
        #expect(h.take("triage_reject").count == 1)
    }

    @Test func aCapWithoutActorOrIntent_orANonTextContinuation_isRejectedWithTheReason_andNotRun() throws {
        let h = try StageHarness(ExecutorStage.descriptor, config: .object([("executor", .string("command")), ("allow", .list([.string("/bin/sleep")]))]))
        let run = #"{"argv":["/bin/sleep","5"]}"#
        try h.feed(cap(actor: "", payload: run))
        try h.feed(cap("", payload: run))
        var numeric = cap(payload: run); numeric.attrs["continuation"] = .int(5)
        try h.feed(numeric)
        let rs = try h.take("receipts").map { try JSON.parse(bytes: $0.payload)["receipt"] ?? .null }
        #expect(rs.map { $0["reason"]?.stringValue ?? "" } == ["malformed cap: no actor", "malformed cap: no intent", "malformed cap: continuation is 5, not text"])
        #expect(rs.allSatisfy { $0["outcome"] == .string("rejected") && $0["latency_us"] == .int(0) })
        #expect(h.take("triage_reject").map { $0.attrs["triage_reason"]?.stringValue ?? "" }.allSatisfy { $0.hasPrefix("malformed cap") })
        #expect(h.take("followups").isEmpty)
    }

    @Test func commandOutput_isCutAtMaxOutputBytes_andTheReceiptSaysSo() throws {
        let h = try StageHarness(ExecutorStage.descriptor, config: .object([
            ("executor", .string("command")), ("allow", .list([.string("/bin/echo")])), ("max_output_bytes", .int(8)),
        ]))
        try h.feed(cap(payload: #"{"argv":["/bin/echo","0123456789abcdef"]}"#))
        try h.feed(cap(payload: #"{"argv":["/bin/echo","short"]}"#))
        let rs = try h.take("receipts").map { try JSON.parse(bytes: $0.payload)["receipt"] ?? .null }
        #expect(rs.count == 2)
        #expect(rs[0]["output"]?.stringValue == "01234567" && rs[0]["truncated"] == .bool(true) && rs[0]["outcome"]?.stringValue == "executed")
        #expect(rs[1]["output"]?.stringValue == "short\n" && rs[1]["truncated"] == .bool(false))
    }

    @Test func json_refusesDuplicateKeysAndLeadingZeros() {
        #expect(throws: JSON.ParseError.self) { _ = try JSON.parse(#"{"outcome":"rejected","outcome":"executed"}"#) }
        #expect(throws: JSON.ParseError.self) { _ = try JSON.parse(#"{"latency_us":051234}"#) }
        #expect((try? JSON.parse(#"{"a":0,"b":0.5,"c":-0}"#)) != nil)
    }
}

@Suite("Cap pipeline: aligner")
struct AlignerTests {
    func ranked(_ r: UInt64, _ tag: String = "") -> Envelope { cap(tag.isEmpty ? "r\(r)" : tag, rank: r) }

    @Test func releasesTheSmallestRank_onceEveryInputHasAHead_withTheEpoch() throws {
        let h = try StageHarness(AlignerStage.descriptor, config: .object([("max_wait_ms", .int(100))]), laneCounts: ["in": 2])
        try h.feed(ranked(1), laneIndex: 0)
        try h.feed(ranked(3), laneIndex: 0)
        #expect(h.take().isEmpty)                       // input 1 has nothing yet
        try h.feed(ranked(2), laneIndex: 1)             // 1 and 2 are heads: 1 goes; then 3 vs 2: 2 goes
        try h.feed(ranked(4), laneIndex: 1)             // 3 vs 4: 3 goes
        let out = h.take()
        #expect(out.map(\.rank) == [1, 2, 3])
        #expect(out.map { $0.attrs["align_epoch"]?.intValue ?? 0 } == [1, 2, 3])
        #expect(out.allSatisfy { $0.attrs["align_forced"] == nil })
        #expect(h.stage.heldCount == 1)
        // Input 0 stays silent: after max_wait_ms on the stage clock the held 4 goes, forced.
        try h.advance(byMs: 99)
        #expect(h.take().isEmpty)
        try h.advance(byMs: 2)
        let forced = h.take()
        #expect(forced.map(\.rank) == [4] && forced[0].attrs["align_forced"] == .bool(true) && forced[0].attrs["align_epoch"] == .int(3))
        // A late envelope (rank below the last released) goes to triage with the reason.
        try h.feed(ranked(2, "late"), laneIndex: 0)
        let late = h.take("triage")
        #expect(late.count == 1 && late[0].attrs["triage_reason"] == .string("late: rank 2 < last released rank 4"))
        #expect(h.takeAudits().contains { $0.decision == "triage" && $0.reason.contains("late") })
        #expect(try h.finish().held == 0)
    }

    @Test func drain_releasesEverythingInRankOrder_andTheHeldLimitBoundsMemory() throws {
        let h = try StageHarness(AlignerStage.descriptor, config: .object([("max_wait_ms", .int(60_000)), ("max_held", .int(3))]), laneCounts: ["in": 3])
        for r in [5, 7, 9] { try h.feed(ranked(UInt64(r)), laneIndex: 0) }
        #expect(h.take().isEmpty && h.stage.heldCount == 3)
        try h.feed(ranked(6), laneIndex: 1)             // 4 held > 3: the smallest head (5) is forced out
        #expect(h.take().map(\.rank) == [5] && h.stage.heldCount == 3)
        try h.stage.drain(context: h)
        #expect(h.take().map(\.rank) == [6, 7, 9] && h.stage.heldCount == 0)
    }
}

@Suite("Cap pipeline: slot-injector")
struct SlotInjectorTests {
    func laned(_ lane: String, _ actor: String, rank: UInt64 = 1) -> Envelope {
        var e = cap(actor: actor, rank: rank); e.lane = lane; return e
    }

    /// A receipt as the executor makes it: derived from the cap (so it carries `slot_key`).
    func receipt(for c: Envelope, outcome: String, context: String = "") -> Envelope {
        let extra = context.isEmpty ? "" : #","context":\#(context)"#
        return c.derived(output: "receipts", index: 0, payload: Array(#"{"receipt":{"cap":"\#(c.id)","outcome":"\#(outcome)"}\#(extra)}"#.utf8))
    }

    @Test func slots_attachRecordTakeOutcomes_andSurviveARestart() throws {
        let dir = Paths.tempDir("slots")
        let config = ConfigValue.object([("history", .int(2))])
        var store = try SQLiteKeyValueStore(path: dir + "/slots.sqlite")
        let h = try StageHarness(SlotInjectorStage.descriptor, config: config, store: store)
        let a = laned("fast", "anna", rank: 1), b = laned("fast", "anna", rank: 2), c = laned("fast", "anna", rank: 3)
        try h.feed(a)
        let first = try #require(h.take().first)
        #expect(first.attrs["slot_key"] == .string("fast:anna"))
        #expect(first.attrs["slot"]?.stringValue?.contains(#""recent":[]"#) == true)   // the slot as it was before
        try h.feed(receipt(for: first, outcome: "executed", context: #"{"bay":7,"note":"quote \" and \\ and tab\t"}"#), port: "feedback")
        try h.feed(b); try h.feed(c)
        let third = try #require(h.take().last)
        let slot = try JSON.parse(third.attrs["slot"]?.stringValue ?? "")
        #expect(slot["recent"]?.listValue?.count == 2)   // history 2: a and b
        #expect(slot["recent"]?.listValue?.first?["outcome"] == .string("executed"))
        #expect(slot["context"]?["bay"] == .int(7))
        try h.feed(laned("slow", "ben"))
        _ = h.take()
        _ = try h.finish()   // drain writes the cache in one transaction
        // A new process: the slots are still there.
        store = try SQLiteKeyValueStore(path: dir + "/slots.sqlite")
        let h2 = try StageHarness(SlotInjectorStage.descriptor, config: config, store: store)
        #expect(h2.statusReport["slots"] == .int(2))
        try h2.feed(laned("fast", "anna", rank: 4))
        let again = try JSON.parse(try #require(h2.take().first?.attrs["slot"]?.stringValue))
        #expect(again["recent"]?.listValue?.map { $0["id"]?.stringValue ?? "" } == [b.id.description, c.id.description])
        #expect(again["uses"] == .int(3))
        // The attached text is written directly; it is exactly what the JSON serializer makes of it.
        let attached = try #require(third.attrs["slot"]?.stringValue)
        #expect(JSON.serialize(try JSON.parse(attached)) == attached)
    }

    @Test func unknownSlotFeedback_goesToTriage_andSlotsAreBoundedByCountAndTTL() throws {
        let store = try SQLiteKeyValueStore(path: Paths.tempDir("slots2") + "/s.sqlite")
        let h = try StageHarness(SlotInjectorStage.descriptor, config: .object([("max_slots", .int(16)), ("ttl_s", .double(60))]), store: store)
        // A receipt for a slot that never existed, and one without a slot key.
        var stray = cap(); stray.attrs["slot_key"] = .string("nowhere:nobody")
        try h.feed(receipt(for: stray, outcome: "executed"), port: "feedback")
        try h.feed(receipt(for: cap(), outcome: "executed"), port: "feedback")
        let triaged = h.take("triage")
        #expect(triaged.count == 2)
        #expect(triaged[0].attrs["triage_reason"]?.stringValue?.contains("unknown slot 'nowhere:nobody'") == true)
        #expect(triaged[1].attrs["triage_reason"]?.stringValue?.contains("without a slot_key") == true)
        #expect(h.takeAudits().filter { $0.decision == "triage" }.count == 2)
        // 20 actors on one lane: never more than 16 slots, the oldest evicted first.
        for i in 0..<20 {
            h.wallClockNs += 1_000_000
            try h.feed(laned("l", "actor\(i)"))
        }
        _ = h.take()
        try h.advance(byMs: 200)
        let slots = h.statusReport["slots"]?.intValue ?? 0
        #expect(slots <= 16 && slots > 0)
        #expect((h.statusReport["evicted_lru"]?.intValue ?? 0) == Int64(20 - slots))
        // Sixty seconds later, every slot has expired.
        h.wallClockNs += 61_000_000_000
        try h.advance(byMs: 200)
        #expect(h.statusReport["slots"] == .int(0) && (h.statusReport["evicted_ttl"]?.intValue ?? 0) == slots)
        _ = try h.finish()
        #expect(try store.keys(prefix: "slot/").isEmpty)
    }

    @Test func aTemplateWithAnUnknownPlaceholder_isAConfigError() {
        #expect(throws: StageError.self) { _ = try StageHarness(SlotInjectorStage.descriptor, config: .object([("key", .string("{lane}:{colour}"))])) }
    }
}

@Suite("Cap pipeline: mux (manual clock)")
struct MuxTests {
    static func mux(_ lanes: [(String, [(String, ConfigValue)])], extra: [(String, ConfigValue)] = []) throws -> StageHarness {
        try StageHarness(MuxStage.descriptor, config: .object([("lanes", .object(lanes.map { ($0.0, .object($0.1)) })), ("default_lane", .string(lanes[0].0))] + extra))
    }
    func from(_ actor: String, authority: String = "", _ attrs: [String: AttrValue] = [:]) -> Envelope {
        var e = cap("job.run", actor: actor); e.authority = authority
        for (k, v) in attrs { e.attrs[k] = v }
        return e
    }

    @Test func reject_refusesASecondActorInsideTheHold_andAcceptsItAfter() throws {
        let h = try Self.mux([("main", [("lane_collision_policy", .string("reject")), ("hold_ms", .int(500))])])
        try h.feed(from("anna"))
        try h.feed(from("ben"))
        #expect(h.take("main").map(\.actor) == ["anna"])
        let r = h.take("triage_reject")
        #expect(r.count == 1 && r[0].attrs["triage_reason"]?.stringValue?.contains("held by 'anna'") == true)
        try h.advance(byMs: 501)
        try h.feed(from("ben"))
        #expect(h.take("main").map(\.actor) == ["ben"])
        #expect(h.takeAudits().filter { $0.decision == "reject" }.count == 1)
    }

    @Test func gracefulYield_deliversAfterTheHold_notBefore() throws {
        let h = try Self.mux([("main", [("lane_collision_policy", .string("graceful_yield")), ("hold_ms", .int(500))])])
        try h.feed(from("anna")); try h.feed(from("ben"))
        #expect(h.take("main").map(\.actor) == ["anna"])
        try h.advance(byMs: 400)
        #expect(h.take("main").isEmpty && h.stage.heldCount == 1)
        try h.advance(byMs: 101)
        #expect(h.take("main").map(\.actor) == ["ben"] && h.take("triage_reject").isEmpty)
    }

    @Test func assertRoot_letsARootAuthorityThroughAtOnce() throws {
        let h = try Self.mux([("main", [("lane_collision_policy", .string("assert_root")), ("hold_ms", .int(500))])],
                             extra: [("root_authorities", .list([.string("root")]))])
        try h.feed(from("anna")); try h.feed(from("ben")); try h.feed(from("carl", authority: "root"))
        #expect(h.take("main").map(\.actor) == ["anna", "carl"])   // ben waits for the hold
        try h.advance(byMs: 501)
        #expect(h.take("main").map(\.actor) == ["ben"])
    }

    @Test func overrideAll_preemptsTheHoldersWaitingEnvelopes_unlessTheLaneIsNotPreemptible() throws {
        let h = try Self.mux([("main", [("lane_collision_policy", .string("override_all")), ("hold_ms", .int(500))])])
        try h.feed(from("anna"))
        h.blockedOutputs = ["main"]
        try h.feed(from("anna")); try h.feed(from("anna"))
        try h.feed(from("ben"))
        let pre = h.take("triage_reject")
        #expect(pre.count == 2 && pre.allSatisfy { $0.actor == "anna" && $0.attrs["triage_reason"] == .string("preempted") })
        #expect(h.takeAudits().filter { $0.decision == "preempt" }.count == 2)
        h.blockedOutputs = []
        try h.advance(byMs: 10)
        #expect(h.take("main").map(\.actor) == ["anna", "ben"])
        // Not preemptible: refused, audited, and the newcomer waits its turn as under queue.
        let n = try Self.mux([("main", [("lane_collision_policy", .string("override_all")), ("hold_ms", .int(500)), ("preemptible", .bool(false))])])
        try n.feed(from("anna"))
        n.blockedOutputs = ["main"]
        try n.feed(from("anna")); try n.feed(from("ben"))
        #expect(n.take("triage_reject").isEmpty)
        #expect(n.takeAudits().contains { $0.decision == "override-refused" })
        n.blockedOutputs = []
        try n.advance(byMs: 10)
        #expect(n.take("main").map(\.actor) == ["anna", "anna", "ben"])
    }

    @Test func burstLimit_withoutRefill_letsExactlyFiveThrough() throws {
        let wait = try Self.mux([("main", [("burst_limit", .int(5)), ("refill_per_s", .double(0))])])
        for _ in 0..<8 { try wait.feed(from("anna")) }
        // Three wait for tokens that never come: parked, not held, so a loop through the mux can close.
        #expect(wait.take("main").count == 5 && wait.stage.heldCount == 0)
        try wait.advance(byMs: 10_000)
        #expect(wait.take("main").isEmpty)
        try wait.stage.drain(context: wait)
        let refused = wait.take("triage_reject")
        #expect(refused.count == 3 && refused[0].attrs["triage_reason"]?.stringValue?.contains("burst token") == true)
        let triage = try Self.mux([("main", [("burst_limit", .int(5)), ("over_burst", .string("triage"))])])
        for _ in 0..<8 { try triage.feed(from("anna")) }
        #expect(triage.take("main").count == 5)
        let over = triage.take("triage_reject")
        #expect(over.count == 3 && over[0].attrs["triage_reason"]?.stringValue?.contains("over burst_limit 5") == true)
        // With a refill, the bucket fills again over time.
        let refill = try Self.mux([("main", [("burst_limit", .int(2)), ("refill_per_s", .double(10))])])
        for _ in 0..<4 { try refill.feed(from("anna")) }
        #expect(refill.take("main").count == 2)
        try refill.advance(byMs: 210)
        #expect(refill.take("main").count == 2)
    }

    @Test func priority_higherLaneFirst_politeAvoidLast_hardAvoidNever() throws {
        let h = try Self.mux([("low", [("priority", .int(1))]), ("high", [("priority", .int(9))])],
                             extra: [("routes", .object([("job.low", .string("low")), ("job.high", .string("high"))])),
                                     ("known_actors", .list([.string("anna"), .string("ben")]))])
        h.blockedOutputs = ["low", "high"]
        var l = from("anna"); l.intent = "job.low.x"
        var hi = from("ben"); hi.intent = "job.high"
        var polite = from("stranger"); polite.intent = "job.high.y"
        try h.feed(polite); try h.feed(l); try h.feed(hi)
        try h.feed(from("anna", ["trust_score": .double(0.1)]))
        let hard = h.take("triage_reject")
        #expect(hard.count == 1 && hard[0].attrs["coffee_lane_policy"] == .string("hard_avoid"))
        h.blockedOutputs = []
        try h.advance(byMs: 10)
        let order = (h.take("high") + h.take("low")).sorted { ($0.attrs["mux_seq"]?.intValue ?? 0) < ($1.attrs["mux_seq"]?.intValue ?? 0) }
        // The high lane's head is the polite stranger: the low lane goes first, then high's.
        #expect(order.map(\.actor) == ["anna", "stranger", "ben"], "\(order.map(\.actor))")
        #expect(order[1].attrs["coffee_lane_policy"] == .string("polite_avoid"))
        // Without polite envelopes, the higher priority wins when both are ready.
        let p = try Self.mux([("low", [("priority", .int(1))]), ("high", [("priority", .int(9))])],
                             extra: [("routes", .object([("job.low", .string("low")), ("job.high", .string("high"))]))])
        p.blockedOutputs = ["low", "high"]
        try p.feed(l); try p.feed(hi)
        p.blockedOutputs = []
        try p.advance(byMs: 10)
        let firsts = (p.take("high") + p.take("low")).sorted { ($0.attrs["mux_seq"]?.intValue ?? 0) < ($1.attrs["mux_seq"]?.intValue ?? 0) }
        #expect(firsts.map(\.actor) == ["ben", "anna"])
    }

    @Test func coffee_decidesFromAttributes_andResolvesResume() throws {
        let h = try Self.mux([("main", []), ("offline", [])])
        let now = Int64(h.wallClockNs)
        func policy(_ attrs: [String: AttrValue], continuation: String? = nil) throws -> (String, String?) {
            var e = from("anna", attrs)
            if let c = continuation { e.attrs["continuation"] = .string(c) }
            try h.feed(e)
            let got = h.take("main") + h.take("offline") + h.take("triage_reject")
            return (got.first?.attrs["coffee_lane_policy"]?.stringValue ?? "", got.first?.attrs["continuation"]?.stringValue)
        }
        #expect(try policy(["sealed_at": .int(now - 30_000_000_000)]).0 == "freeze_resume")
        #expect(try policy(["sealed_at": .int(now - 300_000_000_000)]).0 == "fork_on_hop_off")
        #expect(try policy(["sealed_at": .int(now - 7200_000_000_000)]).0 == "rebuild")
        #expect(try policy(["sealed_at": .int(now - 90_000_000_000_000)]).0 == "hard_avoid")
        #expect(try policy(["recent_failures": .int(4)]).0 == "rebuild")
        #expect(try policy(["endpoint_status": .int(503)]).0 == "offline_fallback")
        #expect(try policy([:]).0 == "sip_anyway")
        #expect(try policy(["sealed_at": .int(now - 30_000_000_000)], continuation: "resume") == ("freeze_resume", "freeze_resume"))
        #expect(try policy(["trust_score": .double(0.1)], continuation: "resume") == ("hard_avoid", "receipt"))
        // offline_fallback goes to the lane named offline.
        try h.feed(from("anna", ["endpoint_status": .string("down")]))
        #expect(h.take("offline").count == 1)
    }

    @Test func routes_hintThenExactThenLongestPrefix_andWhatNoRouteTakesIsRefusedWithTheReason() throws {
        let h = try StageHarness(MuxStage.descriptor, config: .object([
            ("lanes", .object([("a", .object([])), ("b", .object([])), ("c", .object([]))])),
            ("routes", .object([("job", .string("a")), ("job.x", .string("b"))])),
        ]))
        func lane(_ intent: String, hint: AttrValue? = nil) throws -> String {
            var e = cap(intent)
            if let hint { e.attrs["lane"] = hint }
            try h.feed(e)
            for l in ["a", "b", "c"] where !h.take(l).isEmpty { return l }
            return "refused: " + (h.take("triage_reject").first?.attrs["triage_reason"]?.stringValue ?? "?")
        }
        #expect(try lane("job.x") == "b")              // exact, though "job" is a prefix too
        #expect(try lane("job.x.y.z") == "b")          // the longest prefix of whole segments
        #expect(try lane("job.xy") == "a")             // "job.x" is not a segment prefix of "job.xy"
        #expect(try lane("job.x", hint: .string("c")) == "c")
        #expect(try lane("other") == "refused: no route for intent 'other' and no default_lane")
        #expect(try lane("job", hint: .string("nope")) == "refused: lane hint 'nope' names no lane of this mux")
        #expect(try lane("job", hint: .int(3)) == "refused: lane hint 3 is not text")
        // Each refusal is counted (pipectl status: metric.refused) and audited with its reason.
        #expect(h.metrics["refused"] == 3)
        #expect(h.takeAudits().filter { $0.decision == "reject" }.map(\.reason).contains("lane hint 3 is not text"))
    }

    @Test func badConfig_namesTheProblem() {
        #expect(throws: StageError.self) { _ = try StageHarness(MuxStage.descriptor, config: .object([("lanes", .object([]))])) }
        #expect(throws: StageError.self) {
            _ = try StageHarness(MuxStage.descriptor, config: .object([("lanes", .object([("a", .object([("lane_collision_policy", .string("shove"))]))]))]))
        }
        #expect(throws: StageError.self) {
            _ = try StageHarness(MuxStage.descriptor, config: .object([("lanes", .object([("a", .object([]))])), ("routes", .object([("x", .string("b"))]))]))
        }
    }
}
