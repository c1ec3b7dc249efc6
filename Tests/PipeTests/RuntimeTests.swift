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

func runEmbedded(_ yaml: String, registry: StageRegistry, runDir: String) throws -> RunSummary {
    let (spec, diags) = PipelineLoader.load(text: yaml, file: "embedded.yaml", registry: registry)
    guard let spec, diags.isEmpty else { throw RuntimeError.plan(diags.map(\.description).joined(separator: "; ")) }
    let plan = try PipelinePlan.make(spec: spec, edges: PipelineValidator(spec: spec, registry: registry).edges, registry: registry)
    return try PipelineHost(plan: plan, registry: registry, options: HostOptions(runDirectory: runDir)).run()
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

    @Test func unsupportedForms_areRefusedWithAClearMessage() throws {
        // A lane between a remote stage and a `placement: process` stage: tcp lanes end in the host
        // process, whose context holds the ZAP handler.
        let remote = """
        remote:
          listen: tcp://127.0.0.1:7800
          insecure: true
          workers: { w1: "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7" }
        stages:
          - { id: gen, kind: generator, placement: { worker: w1 } }
          - { id: sink, kind: null-sink, inputs: [gen], placement: process }
        """
        #expect(throws: RuntimeError.self) { try runEmbedded(remote, registry: registry, runDir: Paths.tempDir("remote")) }
        do { _ = try runEmbedded(remote, registry: registry, runDir: Paths.tempDir("remote")) }
        catch { #expect("\(error)".contains("joins a remote stage and a `placement: process` stage")) }
    }
}
