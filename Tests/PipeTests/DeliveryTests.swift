import Testing
import Foundation
import PipeConfig
import PipeKit
import PipeKitTesting
import PipeRegistry
import PipeStore
import CoreStages
@testable import PipeRuntime

/// Ids of a JSONL output file, in order.
func outputIDs(_ path: String) throws -> [String] {
    try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").map { line in
        let s = line.dropFirst(7)   // {"id":"
        return String(s.prefix(32))
    }
}

/// Rows still pending in a durable source's journal.
func journalPending(_ path: String) throws -> Int {
    let db = try Database(path: path, readOnly: true)
    let q = try db.prepare("SELECT count(*) FROM pending")
    try q.bind([])
    _ = try q.step()
    return Int(q.int(0))
}

/// A stage's status figure; -1 when the stage or the figure is missing (so `== 0` proves it is there).
func statusInt(_ s: ConfigValue, _ stageID: String, _ key: String) -> Int {
    Int(stage(s, stageID)?["status"]?[key]?.intValue ?? -1)
}

/// Waits until `path` has at least `lines` lines (or `seconds` pass).
func waitForLines(_ path: String, atLeast lines: Int, seconds: Double = 60) -> Int {
    let deadline = Date().addingTimeInterval(seconds)
    var n = 0
    while Date() < deadline {
        if let d = FileManager.default.contents(atPath: path) { n = d.reduce(0) { $0 + ($1 == 0x0A ? 1 : 0) } }
        if n >= lines { return n }
        usleep(50_000)
    }
    return n
}

/// Runs `yaml`, kills worker `worker` with SIGKILL once `out.jsonl` has `after` lines, waits for
/// the run to finish and checks that `out.jsonl` holds `expect` distinct ids, each once. Returns
/// the run summary.
func killWorkerMidRun(_ yaml: String, tag: String, worker: String, after: Int, expect n: Int, runDir: String? = nil) throws -> ConfigValue {
    let run = runDir ?? Paths.tempDir(tag)
    let p = try startPipeline(writeTemp(yaml, tag + ".yaml"), runDir: run)
    defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
    #expect(waitForLines(run + "/out.jsonl", atLeast: after) >= after)
    let st = try pipectlJSON(["status", "--run-dir", run])
    let pid = try #require(st["stages"]?.listValue?.first { $0["id"]?.stringValue == worker }?["pid"]?.intValue)
    #expect(kill(Int32(pid), SIGKILL) == 0)
    p.waitUntilExit()
    #expect(p.terminationStatus == 0, "\((try? String(contentsOfFile: run + ".host.log", encoding: .utf8)) ?? "")")
    let ids = try outputIDs(run + "/out.jsonl")
    #expect(ids.count == n)
    #expect(Set(ids).count == n)
    return try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
}

/// Rows left in a spill queue file.
func spillRows(_ path: String) throws -> Int {
    let db = try Database(path: path, readOnly: true)
    let q = try db.prepare("SELECT count(*) FROM spill")
    try q.bind([])
    return try q.step() ? Int(q.int(0)) : -1
}

extension ExclusivePipelines {
    @Suite("Delivery: acknowledgements, journals, deduplication, crashes", .serialized)
    struct DeliveryTests {
        @Test func deliveryConfig_isParsedAndBadValuesNameTheirPosition() throws {
            let ok = """
            pipeline: p
            delivery: { mode: at-least-once, ack_timeout_ms: 250, max_pending: 100, max_attempts: 3, dedup_window: 5000 }
            stages:
              - { id: gen, kind: generator, config: { durable: true } }
              - { id: out, kind: null-sink, inputs: [gen] }
            """
            let (spec, diags) = PipelineLoader.load(text: ok, file: "p.yaml", registry: builtInStages)
            #expect(diags.isEmpty, "\(diags)")
            #expect(spec?.delivery.mode == .atLeastOnce)
            #expect(spec?.delivery.ackTimeoutMs == 250 && spec?.delivery.maxPending == 100)
            #expect(spec?.delivery.maxAttempts == 3 && spec?.delivery.dedupWindow == 5000)
            let plain = PipelineLoader.load(text: "pipeline: p\nstages: [{ id: gen, kind: generator }]\n", file: "p.yaml", registry: builtInStages).0
            #expect(plain?.delivery.mode == .atMostOnce)
            let bad = """
            pipeline: p
            delivery: { mode: exactly-once, ack_timeout: 5, max_pending: 0 }
            stages:
              - { id: gen, kind: generator }
            """
            let got = PipelineLoader.load(text: bad, file: "p.yaml", registry: builtInStages).1.map(\.description)
            #expect(got.contains("p.yaml:2:19: delivery.mode must be at-most-once or at-least-once"), "\(got)")
            #expect(got.contains { $0.hasPrefix("p.yaml:2:33: unknown delivery key 'ack_timeout' (did you mean 'ack_timeout_ms'?)") }, "\(got)")
            #expect(got.contains("p.yaml:2:62: delivery.max_pending must be an integer from 1 to 10000000"), "\(got)")
            // A journal needs acknowledgements to empty it.
        let durableAlone = PipelineLoader.load(text: "pipeline: p\nstages:\n  - { id: gen, kind: generator, config: { durable: true } }\n", file: "p.yaml", registry: builtInStages).1
        #expect(durableAlone.map(\.description) == ["p.yaml:3:43: stage 'gen': `durable: true` needs `delivery: at-least-once` (without acknowledgements nothing would ever leave the journal; docs/delivery.md)"])
        let scalar = PipelineLoader.load(text: "pipeline: p\ndelivery: sometimes\nstages: [{ id: gen, kind: generator }]\n", file: "p.yaml", registry: builtInStages).1
            #expect(scalar.first?.description.hasPrefix("p.yaml:2:11: delivery must be at-most-once or at-least-once") == true)
        }

        @Test func ackFrame_matchesTheDocumentedVectorAndRefusesBadBodies() throws {
            let ids = [EnvelopeID(hi: 0, lo: 1), EnvelopeID(hi: 0, lo: 2)]
            let one = FrameEncoder.ack(lane: 1, seq: 1, ids: [ids[0], ids[1]])
            // docs/wire-format.md, ACK vector (two ids this time: the count and order are what matter).
            #expect(Hex.encode(one) == "504c010401000000010000000000000002000000" + "00000000000000000000000000000001" + "00000000000000000000000000000002")
            var seen: [EnvelopeID] = []
            try withFrame(one) { f in try f.forEachAckID { seen.append($0) } }
            #expect(seen == ids)
            #expect(try withFrame(one) { try $0.ackIDs() } == ids)
            // A count that does not match the bytes, and a count past the limit.
            var short = one; short.removeLast()
            #expect(throws: DecodeError.self) { try withFrame(short) { f in try f.forEachAckID { _ in } } }
            #expect(throws: DecodeError.self) { try withFrame(one) { f in try f.forEachAckID(limit: 1) { _ in } } }
            let id = EnvelopeID(hi: 0x0011_2233_4455_6677, lo: 0x8899_aabb_ccdd_eeff)
            let big = FrameEncoder.ack(lane: 9, seq: 3, ids: [id])
            #expect(Hex.encode(Array(big.suffix(16))) == "00112233445566778899aabbccddeeff")
        }

        @Test func fileSink_cutsATornLastLineAndReportsTheIdsItHolds() throws {
            let dir = Paths.tempDir("torn")
            let path = dir + "/out.jsonl"
            let a = "00000000000000000000000000000001", b = "00000000000000000000000000000002"
            let text = "{\"id\":\"\(a)\",\"payload\":1}\n{\"id\":\"\(b)\",\"payload\":2}\n{\"id\":\"0000000000000000000000000000"
            try text.write(toFile: path, atomically: true, encoding: .utf8)
            let h = try StageHarness(FileSinkStage.descriptor, config: .object([("path", .string(path)), ("append", .bool(true))]), runDirectory: dir)
            let got = try h.stage.deliveredIDs(limit: 10, context: h)
            #expect(got == [EnvelopeID(hex: a), EnvelopeID(hex: b)].compactMap { $0 })
            #expect(try String(contentsOfFile: path, encoding: .utf8) == "{\"id\":\"\(a)\",\"payload\":1}\n{\"id\":\"\(b)\",\"payload\":2}\n")
            #expect(try h.stage.deliveredIDs(limit: 1, context: h) == [EnvelopeID(hex: b)].compactMap { $0 })
            // A last line that is not one of ours is kept, and ended so that ours start on their own line.
            let foreign = dir + "/foreign.jsonl"
            try "{\"id\":\"\(a)\",\"payload\":1}\nnot an envelope".write(toFile: foreign, atomically: true, encoding: .utf8)
            let f = try StageHarness(FileSinkStage.descriptor, config: .object([("path", .string(foreign)), ("append", .bool(true))]), runDirectory: dir)
            #expect(try f.stage.deliveredIDs(limit: 10, context: f) == [EnvelopeID(hex: a)].compactMap { $0 })
            try f.stage.commit(context: f)
            #expect(try String(contentsOfFile: foreign, encoding: .utf8) == "{\"id\":\"\(a)\",\"payload\":1}\nnot an envelope\n")
            // Truncating at start: the old lines are gone, so there is nothing to recover...
            let fresh = dir + "/fresh.jsonl"
            try "{\"id\":\"\(a)\",\"payload\":1}\n".write(toFile: fresh, atomically: true, encoding: .utf8)
            let t = try StageHarness(FileSinkStage.descriptor, config: .object([("path", .string(fresh))]), runDirectory: dir)
            #expect(try String(contentsOfFile: fresh, encoding: .utf8) == "")
            #expect(try t.stage.deliveredIDs(limit: 10, context: t) == [])
            // ...but a restarted worker keeps what its earlier incarnation wrote, and knows its ids.
            try "{\"id\":\"\(a)\",\"payload\":1}\n".write(toFile: fresh, atomically: true, encoding: .utf8)
            let r = try StageHarness(FileSinkStage.descriptor, config: .object([("path", .string(fresh))]), runDirectory: dir, restarts: 1)
            #expect(try r.stage.deliveredIDs(limit: 10, context: r) == [EnvelopeID(hex: a)].compactMap { $0 })
            #expect(try String(contentsOfFile: fresh, encoding: .utf8).count > 0)
        }

        @Test func atLeastOnce_fanOutReachesEverySinkOnceAndTheJournalEmpties() throws {
            let yaml = """
            pipeline: fan
            delivery: at-least-once
            stages:
              - { id: gen, kind: generator, config: { count: 20000, seed: 3, durable: true } }
              - { id: pass, kind: passthrough, inputs: [gen] }
              - { id: a, kind: file-sink, inputs: [pass], config: { path: a.jsonl, append: true } }
              - { id: b, kind: file-sink, inputs: [pass], config: { path: b.jsonl }, placement: process }
            """
            let run = Paths.tempDir("fan")
            let (r, s) = try runPipeline(writeTemp(yaml, "fan.yaml"), runDir: run)
            #expect(r.status == 0, "\(r.stderr)")
            let a = try outputIDs(run + "/a.jsonl"), b = try outputIDs(run + "/b.jsonl")
            #expect(a.count == 20000 && Set(a).count == 20000)
            #expect(a == b)
            #expect(try journalPending(run + "/state/gen.journal.sqlite") == 0)
            // Every envelope was acknowledged on both branches, and nothing had to go twice.
            #expect(statusInt(s, "gen", "delivery.acks_received") == 20000)
            #expect(statusInt(s, "pass", "delivery.acks_received") == 40000)
            #expect(statusInt(s, "a", "delivery.acks_sent") == 20000)
            #expect(statusInt(s, "gen", "delivery.redelivered") == 0)
            #expect(statusInt(s, "gen", "delivery.unacked") == 0)
            // pipectl journal reads the journal back: bound to its stage, at its end, nothing pending.
        let j = try pipectlJSON(["journal", run + "/state/gen.journal.sqlite"])
        #expect(j["pipeline"]?.stringValue == "fan" && j["stage"]?.stringValue == "gen" && j["kind"]?.stringValue == "generator")
        #expect(j["position"]?.stringValue == "20000 envelopes emitted")
        #expect(j["pending"]?.intValue == 0)
        let notJournal = try runProcess(Paths.pipectl, ["journal", run + "/audit.db"], timeout: 30)
        #expect(notJournal.status == 1 && notJournal.stderr.contains("not a readable source journal"), "\(notJournal.stderr)")
        // Run again with the same run directory: the durable source is done, nothing new arrives.
            let (r2, _) = try runPipeline(writeTemp(yaml, "fan.yaml"), runDir: run)
            #expect(r2.status == 0)
            #expect(try outputIDs(run + "/a.jsonl").count == 20000)
        }

        @Test func ackTimeout_redeliversAndTheSinkDropsTheDuplicates() throws {
            let yaml = """
            pipeline: slow
            delivery: { mode: at-least-once, ack_timeout_ms: 40 }
            defaults: { lane: { bound: 64 } }
            stages:
              - { id: gen, kind: generator, config: { count: 3000, seed: 5 } }
              - { id: slow, kind: null-sink, inputs: [gen], config: { delay_us: 300 } }
            """
            let run = Paths.tempDir("slow")
            let (r, s) = try runPipeline(writeTemp(yaml, "slow.yaml"), runDir: run)
            #expect(r.status == 0, "\(r.stderr)")
            let redelivered = statusInt(s, "gen", "delivery.redelivered"), duplicates = statusInt(s, "slow", "delivery.duplicates")
            #expect(redelivered > 0)
            #expect(duplicates > 0)
            // The sink processed each envelope once: what it took minus what it dropped as seen.
            #expect(statusInt(s, "slow", "delivery.acks_sent") == (stage(s, "slow")?["received"]?.intValue).map(Int.init))
            #expect(Int(stage(s, "slow")?["received"]?.intValue ?? 0) - duplicates == 3000)
            #expect(statusInt(s, "gen", "delivery.unacked") == 0)
        }

        @Test func killedWorker_midMillionRun_redeliversAndTheSinkGetsEachEnvelopeOnce() throws {
            let yaml = """
            pipeline: crash-million
            delivery: at-least-once
            stages:
              - { id: gen, kind: generator, config: { count: 1000000, seed: 11, payload_size: 16 } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: process }
              - { id: out, kind: file-sink, inputs: [pass], config: { path: out.jsonl, include_ingest: false } }
            """
            let s = try killWorkerMidRun(yaml, tag: "crash-million", worker: "pass", after: 100_000, expect: 1_000_000)
            #expect(stage(s, "pass")?["restarts"]?.intValue == 1)
            // The restarted pass must not take the sink's answer to its own restart (epoch + 1, maybe
            // after a CREDIT queued for its predecessor) for a sink restart: that dropped 512 copies the
            // sink had, and their late resends outlived its window (a duplicate line each).
            #expect(statusInt(s, "pass", "delivery.lost_with_consumer") == -1)
            #expect(statusInt(s, "gen", "delivery.redelivered") > 0)
            #expect(statusInt(s, "gen", "delivery.unacked") == 0)
        }

        @Test func killedHost_durableSourceRestarts_nothingLostNothingDuplicated() throws {
            let yaml = """
            pipeline: durable-crash
            delivery: { mode: at-least-once, max_attempts: 2 }
            stages:
              - { id: gen, kind: generator, config: { count: 300000, seed: 13, payload_size: 16, durable: true } }
            # Two attempts at most: the journal's replay is the second, and must be the only resend.
              - { id: pass, kind: passthrough, inputs: [gen] }
              - { id: out, kind: file-sink, inputs: [pass], config: { path: out.jsonl, append: true } }
            """
            let file = writeTemp(yaml, "durable-crash.yaml")
            let run = Paths.tempDir("durable-crash")
            let p = try startPipeline(file, runDir: run)
            defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
            let seen = waitForLines(run + "/out.jsonl", atLeast: 30_000)
            #expect(seen >= 30_000)
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let before = try outputIDs(run + "/out.jsonl").count
            #expect(before < 300_000, "the host finished before it was killed; the test proves nothing")
            let (r, s) = try runPipeline(file, runDir: run)
            #expect(r.status == 0, "\(r.stderr)")
            let ids = try outputIDs(run + "/out.jsonl")
            #expect(ids.count == 300_000)
            #expect(Set(ids).count == 300_000)
            #expect(try journalPending(run + "/state/gen.journal.sqlite") == 0)
            // The restart sent the journal's unacknowledged envelopes again (once each) and the sink knew them.
            #expect(statusInt(s, "gen", "delivery.redelivered") > 0)
            #expect(statusInt(s, "gen", "delivery.undeliverable") == 0, "nothing was given up on")
            // The same ids as one uninterrupted run.
            let clean = Paths.tempDir("durable-clean")
            let (rc, _) = try runPipeline(file, runDir: clean)
            #expect(rc.status == 0)
            #expect(Set(try outputIDs(clean + "/out.jsonl")) == Set(ids))
        }

        @Test func sigterm_drainsWithNothingUnacknowledgedAndARestartGoesOn() throws {
            let yaml = """
            pipeline: drain
            delivery: at-least-once
            stages:
              - { id: gen, kind: generator, config: { count: 60000, rate: 20000, seed: 17, durable: true } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: process }
              - { id: out, kind: file-sink, inputs: [pass], config: { path: out.jsonl, append: true } }
            """
            let file = writeTemp(yaml, "drain.yaml")
            let run = Paths.tempDir("drain")
            let p = try startPipeline(file, runDir: run)
            defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
            _ = waitForLines(run + "/out.jsonl", atLeast: 5_000)
            kill(p.processIdentifier, SIGTERM)
            p.waitUntilExit()
            #expect(p.terminationStatus == 0)
            let first = try outputIDs(run + "/out.jsonl")
            #expect(first.count > 0 && first.count < 60_000)
            #expect(try journalPending(run + "/state/gen.journal.sqlite") == 0)
            let s = try JSON.parse(try String(contentsOfFile: run + "/summary.json", encoding: .utf8))
            #expect(statusInt(s, "gen", "delivery.acks_received") == first.count)
            let (r, _) = try runPipeline(file, runDir: run)
            #expect(r.status == 0)
            let all = try outputIDs(run + "/out.jsonl")
            #expect(all.count == 60_000 && Set(all).count == 60_000)
        }

        @Test func killedReplica_resendsOvertakeTheirOriginals_andEachIsWrittenOnce() throws {
            let yaml = """
            pipeline: replica-crash
            delivery: at-least-once
            stages:
              - { id: gen, kind: generator, config: { count: 400000, seed: 19, payload_size: 16 } }
              - { id: pass, kind: passthrough, inputs: [gen], placement: process, replicas: 2 }
              - { id: out, kind: file-sink, inputs: [pass], config: { path: out.jsonl, include_ingest: false } }
            """
            let s = try killWorkerMidRun(yaml, tag: "replica-crash", worker: "pass.0", after: 50_000, expect: 400_000)
            #expect(stage(s, "pass.0")?["restarts"]?.intValue == 1)
            #expect(statusInt(s, "gen", "delivery.redelivered") > 0)
        }

        @Test func killedSinkWorker_behindTwoTransforms_restartsAppendingAndTheTimeoutResends() throws {
            // The sink's restart loses copies two hops from the source: the transforms cannot resend,
            // their lanes' lost heads must not hold later acknowledgements, and the source's timeout
            // brings the roots again; the restarted file sink keeps its file and knows its ids.
            let yaml = """
            pipeline: sink-crash
            delivery: { mode: at-least-once, ack_timeout_ms: 1000 }
            stages:
              - { id: gen, kind: generator, config: { count: 200000, seed: 29, payload_size: 16 } }
              - { id: a, kind: passthrough, inputs: [gen] }
              - { id: b, kind: passthrough, inputs: [a] }
              - { id: out, kind: file-sink, inputs: [b], config: { path: out.jsonl, include_ingest: false }, placement: process }
            """
            let s = try killWorkerMidRun(yaml, tag: "sink-crash", worker: "out", after: 40_000, expect: 200_000)
            #expect(stage(s, "out")?["restarts"]?.intValue == 1)
            #expect(statusInt(s, "gen", "delivery.redelivered") > 0)
            #expect(statusInt(s, "gen", "delivery.unacked") == 0)
        }

        /// A lane that spills: what is spilled is acknowledged upstream at once, so the source will
        /// never send it again; the spilling stage (`b`) delivers it. Its consumer (`slow`) is
        /// slower than `b`, so the lane is full and spilling whenever a worker is killed, with a
        /// window of read-back copies unacknowledged. Killed consumer: `b` sends those again.
        /// Killed spilling stage: its spill file still has their rows, and its restart reads them
        /// again as redeliveries, which the sink recognises (`slow` had passed them on). Either
        /// way nothing is lost and every row is deleted at the end.
        @Test(arguments: ["slow", "b"])
        func killedWorkerAroundASpillLane_loseNothingReadBack(killed: String) throws {
            let yaml = """
            pipeline: spill-crash-\(killed)
            delivery: { mode: at-least-once, ack_timeout_ms: 1000 }
            lanes:
              - { from: b, to: slow, bound: 64, when_full: spill }
            stages:
              - { id: gen, kind: generator, config: { count: 60000, seed: 31, payload_size: 16 } }
              - { id: b, kind: passthrough, inputs: [gen], placement: \(killed == "b" ? "process" : "in-process") }
              - { id: slow, kind: passthrough, inputs: [b], config: { delay_us: 10 }, placement: \(killed == "slow" ? "process" : "in-process") }
              - { id: out, kind: file-sink, inputs: [slow], config: { path: out.jsonl, include_ingest: false } }
            """
            let run = Paths.tempDir("spill-crash-\(killed)")
            let s = try killWorkerMidRun(yaml, tag: "spill-crash-\(killed)", worker: killed, after: 15_000, expect: 60_000, runDir: run)
            #expect(stage(s, killed)?["restarts"]?.intValue == 1)
            let l = try #require(lane(s, from: "b.out", to: "slow.in"))
            #expect((l["spilled"]?.intValue ?? 0) > 10_000, "too little spilled: the test proves nothing (\(l))")
            if killed == "slow" {
                // Read-back copies the killed consumer had not acknowledged went again.
                #expect(statusInt(s, "b", "delivery.redelivered") > 0)
            } else {
                #expect(statusInt(s, "out", "delivery.duplicates") > 0, "no read-back row came again after the restart")
            }
            #expect(statusInt(s, "b", "delivery.unacked") == 0)
            #expect(statusInt(s, "gen", "delivery.unacked") == 0)
            // Every row was deleted once acknowledged: nothing is left for a next run to send again.
            #expect(l["spill_depth"]?.intValue == 0)
            #expect(try spillRows(run + "/spill/b.out--slow.in.sqlite") == 0)
        }

        @Test func durableSource_droppedAndSpilledEnvelopesCountAsDelivered_noJournalRowsLeft() throws {
            for policy in ["drop_newest", "spill"] {
                let yaml = """
                pipeline: durable-\(policy.replacingOccurrences(of: "_", with: "-"))
                delivery: at-least-once
                lanes:
                  - { from: gen, to: slow, bound: 16, when_full: \(policy) }
                stages:
                  - { id: gen, kind: generator, config: { count: 3000, seed: 23, durable: true } }
                  - { id: slow, kind: null-sink, inputs: [gen], config: { delay_us: 100 } }
                """
                let run = Paths.tempDir("durable-\(policy)")
                let (r, s) = try runPipeline(writeTemp(yaml, "durable-\(policy).yaml"), runDir: run)
                #expect(r.status == 0, "\(policy): \(r.stderr)")
                let l = try #require(lane(s, from: "gen.out", to: "slow.in"))
                if policy == "spill" {
                    #expect((l["spilled"]?.intValue ?? 0) > 0, "nothing spilled: the test proves nothing")
                    #expect(l["received"]?.intValue == 3000)
                } else {
                    #expect((l["dropped"]?.intValue ?? 0) > 0, "nothing dropped: the test proves nothing")
                }
                #expect(try journalPending(run + "/state/gen.journal.sqlite") == 0, "\(policy)")
                #expect(statusInt(s, "gen", "delivery.unacked") == 0)
            }
        }

        @Test func corruptJournal_failsTheRunNamingTheFile() throws {
            let run = Paths.tempDir("journal-corrupt")
            try FileManager.default.createDirectory(atPath: run + "/state", withIntermediateDirectories: true)
            let journal = run + "/state/gen.journal.sqlite"
            try Data((0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }).write(to: URL(fileURLWithPath: journal))
            let yaml = """
            pipeline: corrupt
            delivery: at-least-once
            stages:
              - { id: gen, kind: generator, config: { count: 10, durable: true } }
              - { id: out, kind: null-sink, inputs: [gen] }
            """
            let (r, s) = try runPipeline(writeTemp(yaml, "corrupt.yaml"), runDir: run)
            #expect(r.status != 0)
            let failure = s["failure"]?.stringValue ?? r.stderr
            #expect(failure.contains("journal \(journal)"), "\(failure)")
            #expect(failure.contains("move it away"), "\(failure)")
        }

        @Test func journalOfAnotherPipeline_isRefusedWithAClearError() throws {
            let run = Paths.tempDir("journal-bind")
            let a = """
            pipeline: first
            delivery: at-least-once
            stages:
              - { id: gen, kind: generator, config: { count: 10, durable: true } }
              - { id: out, kind: null-sink, inputs: [gen] }
            """
            let (ra, _) = try runPipeline(writeTemp(a, "first.yaml"), runDir: run)
            #expect(ra.status == 0)
            let (rb, sb) = try runPipeline(writeTemp(a.replacingOccurrences(of: "pipeline: first", with: "pipeline: second"), "second.yaml"), runDir: run)
            #expect(rb.status != 0)
            let failure = sb["failure"]?.stringValue ?? rb.stderr
            #expect(failure.contains("belongs to pipeline 'first'"), "\(failure)")
        }
    }
}

@Suite("Delivery bookkeeping: the id table and the dedup window")
struct DeliveryTableTests {
    @Test func idTable_agreesWithADictionaryUnderRandomInsertsAndRemoves() {
        var g = SplitMix64(state: 99)
        var t = IDTable(capacity: 4)
        var ref: [String: Int32] = [:]
        // Few distinct ids and lanes, so that runs collide, wrap and shift back on removal.
        let ids = (0..<300).map { _ in EnvelopeID(hi: g.next() % 3, lo: g.next() % 500) }
        for step in 0..<200_000 {
            let id = ids[Int(g.next() % UInt64(ids.count))], tag = Int32(g.next() % 3)
            let k = "\(id)/\(tag)"
            switch g.next() % 3 {
            case 0:
                let v = Int32(step % 1000)
                let had = t.insert(id, tag: tag, value: v)
                #expect(had == ref[k], "step \(step)")
                if ref[k] == nil { ref[k] = v }
            case 1:
                #expect(t.remove(id, tag: tag) == ref.removeValue(forKey: k), "step \(step)")
            default:
                #expect(t.value(id, tag: tag) == ref[k], "step \(step)")
            }
            if step % 20_000 == 0 { #expect(t.count == ref.count) }
        }
        var walked = 0
        t.forEach { id, tag, v in walked += 1; #expect(ref["\(id)/\(tag)"] == v) }
        #expect(walked == ref.count)
        t.removeAll { _, tag, _ in tag == 1 }
        #expect(t.count == ref.filter { !$0.key.hasSuffix("/1") }.count)
    }

    @Test func fileSinkTail_isReadBlockByBlockAcrossBoundaries() throws {
        let dir = Paths.tempDir("tail")
        let path = dir + "/big.jsonl"
        // About 2.6 MiB: lines straddle the 1 MiB blocks the reader takes from the end.
        let ids = (0..<30_000).map { EnvelopeID(hi: 0xabc, lo: UInt64($0)) }
        var text = ""
        for (n, id) in ids.enumerated() { text += "{\"id\":\"\(id)\",\"payload\":\"\(String(repeating: "x", count: n % 90))\"}\n" }
        try text.write(toFile: path, atomically: true, encoding: .utf8)
        let h = try StageHarness(FileSinkStage.descriptor, config: .object([("path", .string(path)), ("append", .bool(true))]), runDirectory: dir)
        #expect(try h.stage.deliveredIDs(limit: 25_000, context: h) == Array(ids.suffix(25_000)))
        #expect(try h.stage.deliveredIDs(limit: 100_000, context: h) == ids)
    }

    @Test func dedupWindow_remembersTheLastWindowAndOnlyThat() throws {
        let w = try DedupWindow(capacity: 1024, seed: [], path: nil)
        for i in 0..<5000 { w.add(EnvelopeID(hi: 7, lo: UInt64(i)), save: false) }
        #expect(w.contains(EnvelopeID(hi: 7, lo: 4999)))
        #expect(w.contains(EnvelopeID(hi: 7, lo: 5000 - 1024)))
        #expect(!w.contains(EnvelopeID(hi: 7, lo: 5000 - 1025)))
        #expect(!w.contains(EnvelopeID(hi: 8, lo: 1)))
        // Looked up, then more arrive: the index catches up, and ids that left the ring are gone.
        for i in 5000..<6000 { w.add(EnvelopeID(hi: 7, lo: UInt64(i)), save: false) }
        #expect(w.contains(EnvelopeID(hi: 7, lo: 5999)))
        #expect(!w.contains(EnvelopeID(hi: 7, lo: 4000)))
        // Persisted windows come back after a restart.
        let path = Paths.tempDir("dedup") + "/d.sqlite"
        let a = try DedupWindow(capacity: 1024, seed: [], path: path)
        for i in 0..<10 { a.add(EnvelopeID(hi: 1, lo: UInt64(i))) }
        try a.save()
        let b = try DedupWindow(capacity: 1024, seed: [EnvelopeID(hi: 2, lo: 0)], path: path)
        #expect(b.contains(EnvelopeID(hi: 1, lo: 9)) && b.contains(EnvelopeID(hi: 2, lo: 0)))
        #expect(!b.contains(EnvelopeID(hi: 1, lo: 10)))
    }
}
