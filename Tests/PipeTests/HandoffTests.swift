import Testing
import Foundation
import PipeKit
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
        let sink = try #require(try pipectlJSON(["status", "--run-dir", run])["stages"]?.listValue?.first { $0["id"]?.stringValue == "sink" })
        #expect(sink["dead_lettered"]?.intValue == 2)
        #expect(sink["state"]?.stringValue != "failed")
        let before = sink["received"]?.intValue ?? 0
        usleep(600_000)
        let after = try pipectlJSON(["status", "--run-dir", run])["stages"]?.listValue?.first { $0["id"]?.stringValue == "sink" }
        #expect((after?["received"]?.intValue ?? 0) > before)
        kill(p.processIdentifier, SIGTERM)
        p.waitUntilExit()
        let dl = try String(contentsOfFile: run + "/dead-letters.jsonl", encoding: .utf8)
        #expect(dl.contains("refused a HANDOFF frame on lane \(lane) names no batch of 1 left for it in this process"))
        #expect(dl.contains("refused a HANDOFF frame on lane \(lane) is malformed"))
    }
}
