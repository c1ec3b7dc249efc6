import Testing
import Foundation
import PipeConfig
import PipeKit
import PipeRegistry
import PipeRuntime
import CoreStages

/// A test-only stage that counts envelopes per actor in its durable key-value store.
final class TallyStage: Stage {
    static let descriptor = StageDescriptor(
        kind: "tally", summary: "test: counts per actor in the durable store", role: .transform, usesStore: true,
        make: { _ in TallyStage() })
    var out = OutputHandle(index: 0, name: "out")
    func start(context: any StageContext) throws { out = try context.output("out") }
    func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        guard let store = context.store else { throw StageError.halt("no store") }
        let key = "count:" + envelope.actor
        let n = (try store.get(key)).flatMap { Int(String(decoding: $0, as: UTF8.self)) } ?? 0
        try store.put(key, Array(String(n + 1).utf8))
        context.report("total", .int(Int64(n + 1)))
        context.emit(envelope, to: out)
    }
}

func runEmbedded(_ yaml: String, registry: StageRegistry, runDir: String, byReference: Bool = true) throws -> RunSummary {
    let (spec, diags) = PipelineLoader.load(text: yaml, file: "embedded.yaml", registry: registry)
    guard let spec, diags.isEmpty else { throw RuntimeError.plan(diags.map(\.description).joined(separator: "; ")) }
    let plan = try PipelinePlan.make(spec: spec, edges: PipelineValidator(spec: spec, registry: registry).edges, registry: registry)
    var options = HostOptions(runDirectory: runDir)
    options.inprocByReference = byReference
    return try PipelineHost(plan: plan, registry: registry, options: options).run()
}

@Suite("Runtime, embedded host", .serialized)
struct RuntimeTests {
    static let unbuildable = StageDescriptor(kind: "unbuildable", summary: "test: make() throws", role: .transform,
                                             make: { _ in throw StageError.halt("no such device") })
    let registry = StageRegistry(builtInStages.descriptors + [TallyStage.descriptor, Self.unbuildable])

    @Test func stageThatCannotBeBuilt_failsThePipelineAtOnce() throws {
        let yaml = """
        pipeline: unbuildable
        stages:
          - { id: gen, kind: generator, config: { count: 0 } }
          - { id: u, kind: unbuildable, inputs: [gen] }
          - { id: sink, kind: null-sink, inputs: [u] }
        """
        let start = Date()
        let s = try runEmbedded(yaml, registry: registry, runDir: Paths.tempDir("unbuildable"))
        #expect(s.failure == "stage 'u' failed: cannot start: no such device")
        #expect(Date().timeIntervalSince(start) < 10)
    }

    @Test func durableStore_isSQLiteBackedAndSurvivesARestart() throws {
        let yaml = """
        pipeline: tally
        stages:
          - { id: gen, kind: generator, config: { count: 50, actor: a } }
          - { id: t, kind: tally, inputs: [gen] }
          - { id: sink, kind: null-sink, inputs: [t] }
        """
        let run = Paths.tempDir("tally")
        let first = try runEmbedded(yaml, registry: registry, runDir: run)
        #expect(first.failure == nil)
        #expect(first.stages.first { $0.id == "t" }?.status.first { $0.0 == "total" }?.1 == .int(50))
        #expect(FileManager.default.fileExists(atPath: run + "/state/t.kv.sqlite"))
        let second = try runEmbedded(yaml, registry: registry, runDir: run)
        #expect(second.stages.first { $0.id == "t" }?.status.first { $0.0 == "total" }?.1 == .int(100))
    }

    @Test func auditAll_recordsRoutineRoutingAndDecisionsOnlyDoesNot() throws {
        func records(_ level: String) throws -> [String] {
            let yaml = """
            pipeline: audited
            audit: \(level)
            stages:
              - { id: gen, kind: generator, config: { count: 20 } }
              - { id: pass, kind: passthrough, inputs: [gen] }
              - { id: sink, kind: null-sink, inputs: [pass] }
            """
            let run = Paths.tempDir("audit-\(level)")
            let s = try runEmbedded(yaml, registry: registry, runDir: run)
            #expect(s.failure == nil)
            let text = (try? auditJSONL(run)) ?? ""
            return text.split(separator: "\n").map(String.init)
        }
        let all = try records("all")
        #expect(all.count == 40)  // gen and pass each route 20 envelopes
        let first = try JSON.parse(try #require(all.first))
        #expect(first["erin"]?["decision"]?.stringValue == "route")
        #expect(first["eromheen"]?["stage"] != nil && first["erachter"]?["reason"] != nil && first["eraan"]?["actor"] != nil)
        #expect(try records("decisions").isEmpty)
    }

    @Test func haltingStage_failsThePipelineWithItsReason() throws {
        let yaml = """
        pipeline: halts
        stages:
          - { id: src, kind: file-source, config: { path: /nonexistent/input.jsonl } }
          - { id: sink, kind: null-sink, inputs: [src] }
        """
        let s = try runEmbedded(yaml, registry: registry, runDir: Paths.tempDir("halt"))
        #expect(s.failure?.contains("stage 'src' failed: start failed: cannot open /nonexistent/input.jsonl") == true)
    }

    @Test func lanesWithNoEndInTheHostProcess_areRelayed_andAProcessStageGetsIpcEndsAndNoSecret() throws {
        // gen (in-process) -> a (worker w1) -> p (process) -> b (worker w2) -> sink (in-process):
        // a -> p and p -> b have no end in the host process, so the host relays them.
        let yaml = """
        remote:
          listen: tcp://127.0.0.1:7800
          key: /nonexistent/curve.key
          workers: { w1: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7", w2: "Yne@$w-vo<fVvi]a<NY6T1ed:M$fCG*[IaLV{hID" }
        stages:
          - { id: gen, kind: generator }
          - { id: a, kind: passthrough, inputs: [gen], placement: { worker: w1 } }
          - { id: p, kind: passthrough, inputs: [a], placement: process }
          - { id: b, kind: passthrough, inputs: [p], placement: { worker: w2 } }
          - { id: sink, kind: null-sink, inputs: [b] }
        """
        let (spec, diags) = PipelineLoader.load(text: yaml, file: "relay.yaml", registry: registry)
        let sp = try #require(spec)
        #expect(diags.isEmpty)
        let plan = try PipelinePlan.make(spec: sp, edges: PipelineValidator(spec: sp, registry: registry).edges, registry: registry)
        var next = 9000
        let security = TCPSecurity(curve: true, serverPublicKey: "PUB", serverSecretKey: "SECRET")
        let layout = try RemoteLayout.make(plan: plan, bindHost: "127.0.0.1", connectHost: "127.0.0.1", security: security) { () throws(RuntimeError) -> Int in
            next += 1; return next
        }
        let ap = try #require(plan.lanes.first { $0.from == "a" && $0.to == "p" }), pb = try #require(plan.lanes.first { $0.from == "p" && $0.to == "b" })
        #expect(ap.transport == "tcp" && pb.transport == "tcp")
        #expect(layout.relayed == [ap.id, pb.id])
        // Only the remote ends get tcp ports: a sends into the relay and takes credits from it,
        // b takes data from it and returns credits to it; each port admits only its worker.
        #expect(layout.relayIn[ap.id] != nil && layout.laneRet[ap.id] != nil && layout.laneData[ap.id] == nil && layout.relayRet[ap.id] == nil)
        #expect(layout.laneData[pb.id] != nil && layout.relayRet[pb.id] != nil && layout.relayIn[pb.id] == nil && layout.laneRet[pb.id] == nil)
        #expect(layout.admits[layout.relayIn[ap.id] ?? 0] == ["w1"])
        #expect(layout.admits[layout.laneData[pb.id] ?? 0] == ["w2"])
        let run = "/run"
        let pa = try #require(plan.assignment(for: "p", runTag: "t", runDir: run, remote: layout))
        // The process stage: ipc ends at the relay, marked lossy (tcp rules), and no CURVE secret.
        #expect(pa.tcp == nil)
        #expect(pa.inputs.first?.returnEndpoint == "ipc:///run/sock/relay/lane-\(ap.id).ret")
        #expect(pa.inputs.first?.lossy == true && pa.inputs.first?.bindReturnEndpoint == false && pa.inputs.first?.peer == nil)
        let out = try #require(pa.outputs.first { $0.name == "out" }?.lanes.first)
        #expect(out.endpoint == "ipc:///run/sock/relay/lane-\(pb.id).in" && out.lossy && !out.bind)
        #expect(pa.bindInput == ["ipc:///run/sock/p.in"] && pa.bindReturn == ["ipc:///run/sock/p.ret"])
        // The lossy flag survives the ASSIGN round trip (and is absent where false).
        #expect(try Assignment(json: pa.json) == pa)
        #expect(!JSON.serialize(try #require(plan.assignment(for: "gen", runTag: "t", runDir: run, remote: layout)).json).contains("lossy"))
        // The remote ends connect to the relay's ports, and get no secret either.
        let aa = try #require(plan.assignment(for: "a", runTag: "t", runDir: run, remote: layout))
        #expect(aa.outputs.first { $0.name == "out" }?.lanes.first?.endpoint == "tcp://127.0.0.1:\(layout.relayIn[ap.id] ?? 0)")
        #expect(aa.connectReturn.contains("tcp://127.0.0.1:\(layout.laneRet[ap.id] ?? 0)"))
        #expect(aa.tcp?.serverSecretKey == nil && aa.tcp?.curve == true)
        let ba = try #require(plan.assignment(for: "b", runTag: "t", runDir: run, remote: layout))
        #expect(ba.connectInput.contains("tcp://127.0.0.1:\(layout.laneData[pb.id] ?? 0)"))
        #expect(ba.inputs.first?.returnEndpoint == "tcp://127.0.0.1:\(layout.relayRet[pb.id] ?? 0)")
    }
}
