import Testing
import Foundation
import PipeKit
import PipeRegistry
@testable import PipeRuntime

/// In-process lanes hand batches over by reference (HANDOFF frames, docs/wire-format.md).
@Suite("In-process handoff")
struct HandoffTests {
    final class Owner {}

    @Test func aBatchIsTakenOnce_byItsOwnContextLaneAndCount_only() {
        let table = LocalHandoff()
        let a = Owner(), b = Owner()
        let envs = (0..<3).map { Envelope(actor: "x", intent: "i", payload: [UInt8($0)]) }
        let t = table.put(envs, context: ObjectIdentifier(a), lane: 7)
        #expect(t != 0)
        #expect(table.take(t, context: ObjectIdentifier(b), lane: 7, count: 3) == nil)   // another pipeline's context
        #expect(table.take(t, context: ObjectIdentifier(a), lane: 8, count: 3) == nil)   // another lane
        #expect(table.take(t, context: ObjectIdentifier(a), lane: 7, count: 2) == nil)   // a count the frame does not match
        #expect(table.take(t &+ 1, context: ObjectIdentifier(a), lane: 7, count: 3) == nil)
        #expect(table.waiting == 1)
        #expect(table.take(t, context: ObjectIdentifier(a), lane: 7, count: 3) == envs)
        #expect(table.take(t, context: ObjectIdentifier(a), lane: 7, count: 3) == nil)   // taken once
        #expect(table.waiting == 0)
        withExtendedLifetime((a, b)) {}
    }

    @Test func discard_dropsOnlyTheStoppedConsumersBatches() {
        let table = LocalHandoff()
        let a = Owner(), b = Owner()
        let one = [Envelope(intent: "one")], two = [Envelope(intent: "two"), Envelope(intent: "two")]
        let t1 = table.put(one, context: ObjectIdentifier(a), lane: 1)
        let t2 = table.put(two, context: ObjectIdentifier(a), lane: 2)
        let t3 = table.put(two, context: ObjectIdentifier(b), lane: 1)
        #expect(Set([t1, t2, t3]).count == 3)
        #expect(table.discard(context: ObjectIdentifier(a), lanes: [1]) == 1)
        #expect(table.take(t1, context: ObjectIdentifier(a), lane: 1, count: 1) == nil)
        #expect(table.take(t2, context: ObjectIdentifier(a), lane: 2, count: 2) == two)
        #expect(table.take(t3, context: ObjectIdentifier(b), lane: 1, count: 2) == two)
        withExtendedLifetime((a, b)) {}
    }

    @Test func aHandoffFrame_roundTrips_andItsBodyIsChecked() throws {
        let f = FrameEncoder.handoff(lane: 3, seq: 9, sentNs: 0x1122334455667788, count: 5, token: 0xAABBCCDDEEFF0011)
        #expect(Hex.encode(f) == "504c010b0300000009000000000000008877665544332211050000001100ffeeddccbbaa")
        try f.withUnsafeBytes { raw in
            let v = try FrameView(raw)
            #expect(v.header.type == .handoff)
            let h = try v.handoff()
            #expect(h.sentNs == 0x1122334455667788 && h.count == 5 && h.token == 0xAABBCCDDEEFF0011)
            // The DATA accessors read the same leading fields (credit checks use them).
            #expect(v.dataDeclaredCount == 5 && v.dataSentNs == 0x1122334455667788)
        }
        try Array(f.dropLast()).withUnsafeBytes { raw in
            let v = try FrameView(raw)
            #expect(throws: DecodeError.self) { _ = try v.handoff() }
        }
    }

    /// A consumer with an in-process producer and one in a worker process binds inproc and ipc:
    /// a HANDOFF for the in-process lane sent over ipc names no batch here and is refused,
    /// dead-lettered and counted, and the lane goes on carrying the real ones.
    @Test func aForgedHandoffOnAnInProcessLane_isRefused_andTheLaneGoesOn() throws {
        let yaml = """
        pipeline: forged-handoff
        stages:
          - { id: gen, kind: generator, config: { count: 0, rate: 500 } }
          - { id: far, kind: generator, config: { count: 0, rate: 100 }, placement: process }
          - { id: sink, kind: null-sink, inputs: [gen, far] }
        """
        let run = Paths.tempDir("forged-handoff")
        let p = try startPipeline(writeTemp(yaml, "forged-handoff.yaml"), runDir: run)
        defer { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        sleep(1)
        let lanes = try pipectlJSON(["lanes", "--run-dir", run]).listValue ?? []
        let local = try #require(lanes.first { $0["from"]?.stringValue == "gen.out" })
        #expect(local["transport"]?.stringValue == "inproc")
        let lane = try #require(local["id"]?.intValue)
        let inject = """
        import zmq, struct, sys
        s = zmq.Context().socket(zmq.PUSH); s.connect(sys.argv[1])
        lane = int(sys.argv[2])
        s.send(b"PL" + bytes([1, 11]) + struct.pack("<IQ", lane, 1) + struct.pack("<QIQ", 0, 1, 0x123456789abcdef))
        s.send(b"PL" + bytes([1, 11]) + struct.pack("<IQ", lane, 2) + struct.pack("<QI", 0, 1))
        s.close(linger=2000)
        """
        let py = try runProcess("/usr/bin/python3", ["-c", inject, "ipc://\(run)/sock/sink.in", String(lane)], timeout: 30)
        #expect(py.status == 0, "\(py.stderr)")
        usleep(800_000)
        let sink = try #require(try liveStage(run, "sink"))
        #expect(sink["dead_lettered"]?.intValue == 2)
        #expect(sink["state"]?.stringValue != "failed")
        #expect(try keepsReceiving(run, "sink", from: sink["received"]?.intValue ?? 0, ms: 600))
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        let dl = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8)
        #expect(dl.contains("refused a HANDOFF frame on lane \(lane) names no batch of 1 left for it in this process"))
        #expect(dl.contains("refused a HANDOFF frame on lane \(lane) is malformed"))
    }
}

/// A test-only stage that puts every envelope, grown past the limits, on its own `dead_letter`
/// output (not through the runner's deadLetter), and passes the original on.
final class BulkyDeadLetterStage: Stage {
    static let descriptor = StageDescriptor(kind: "bulky-dead-letter", summary: "test: oversized dead letters", role: .transform,
                                            make: { _ in BulkyDeadLetterStage() })
    var out = OutputHandle(index: 0, name: "out"), dead = OutputHandle(index: 1, name: "dead_letter")
    func start(context: any StageContext) throws { out = try context.output("out"); dead = try context.output("dead_letter") }
    func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        var big = copy envelope
        big.payload = [UInt8](repeating: 0x61, count: 2 << 20)
        big.attrs["dead_letter_reason"] = .string("test: too big on purpose")
        context.emit(big, to: dead)
        context.emit(envelope, to: out)
    }
}

@Suite("In-process handoff, whole pipelines", .serialized)
struct HandoffPipelineTests {
    let registry = StageRegistry(builtInStages.descriptors + [BulkyDeadLetterStage.descriptor])

    func run(_ yaml: String, byReference: Bool, dir: String) throws -> RunSummary {
        try runEmbedded(yaml, registry: registry, runDir: dir, byReference: byReference)
    }

    /// The same seeded pipeline gives the same files, envelope for envelope, whether in-process
    /// lanes carry batches by reference or encoded: here one generator's output is copied to a
    /// branch that changes every envelope (causal-time ranks them) and one that passes them on,
    /// so both consumer threads hold the same envelopes while one of them changes its copies.
    @Test func byReferenceAndEncoded_giveTheSameOutput_withAFanOutWhoseOneBranchChangesEnvelopes() throws {
        let yaml = """
        pipeline: handoff-same
        defaults:
          lane: { bound: 64 }
        stages:
          - { id: gen, kind: generator, config: { count: 20000, payload: '{"n":{n}}', seed: 5 } }
          - { id: rank, kind: causal-time, inputs: [gen] }
          - { id: pass, kind: passthrough, inputs: [gen] }
          - { id: ranked, kind: file-sink, inputs: [rank.out], config: { path: ranked.jsonl, include_ingest: false } }
          - { id: plain, kind: file-sink, inputs: [pass], config: { path: plain.jsonl, include_ingest: false } }
        """
        var files: [[String]] = []
        for byReference in [true, false] {
            let dir = Paths.tempDir("handoff-same-\(byReference)")
            let s = try run(yaml, byReference: byReference, dir: dir)
            #expect(s.failure == nil)
            let lanes = s.lanes.filter { $0.from == "gen.out" }
            #expect(lanes.count == 2 && lanes.allSatisfy { $0.transport == "inproc" && $0.sent == 20000 && $0.received == 20000 })
            files.append(try ["ranked.jsonl", "plain.jsonl"].map { try String(contentsOfFile: dir + "/" + $0, encoding: .utf8) })
        }
        let ranked = files[0][0].split(separator: "\n"), plain = files[0][1].split(separator: "\n")
        #expect(ranked.count == 20000 && plain.count == 20000)
        #expect(ranked.first?.contains(#""rank":1"#) == true)   // changed on one branch...
        #expect(plain.first?.contains(#""rank":0"#) == true)    // ...and not on the other
        #expect(files[0] == files[1])
    }

    /// A stage's own dead letter over the limits is cut down at emit on an in-process lane, as a
    /// consumer of encoded frames would have refused it: the file gets the header and the reason.
    @Test func aStagesOwnOversizedDeadLetter_isCutDownBeforeItCrossesAnInProcessLane() throws {
        let yaml = """
        pipeline: handoff-dead
        stages:
          - { id: gen, kind: generator, config: { count: 3, seed: 1 } }
          - { id: bulky, kind: bulky-dead-letter, inputs: [gen] }
          - { id: sink, kind: null-sink, inputs: [bulky] }
        """
        let dir = Paths.tempDir("handoff-dead")
        let s = try run(yaml, byReference: true, dir: dir)
        #expect(s.failure == nil)
        let lines = try String(contentsOfFile: dir + "/dead-letters.jsonl", encoding: .utf8).split(separator: "\n")
        #expect(lines.count == 3)
        #expect(lines.allSatisfy { $0.utf8.count < 4096 && $0.contains("test: too big on purpose") && $0.contains(#""dead_letter_stage":"bulky""#) })
    }
}
