import Testing
import Foundation
import AlignerStages
import CausalStages
import ExecutorStages
import GatewayStages
import MuxStages
import SlotStages
import PipeAudit
import PipeKit
import PipeRegistry
import PipeRuntime

@Suite("Docs stay true")
struct DocsTests {
    /// docs/wire-format.md with all white space removed, for hex look-ups.
    static func compactDoc(_ name: String) throws -> String {
        try String(contentsOfFile: Paths.root + "/docs/" + name, encoding: .utf8).filter { !$0.isWhitespace }
    }

    @Test func wireFormatDoc_printsTheVectorsTheEncoderProduces() throws {
        let doc = try Self.compactDoc("wire-format.md")
        let vectors: [[UInt8]] = [
            EnvelopeCodec.encode(vectorEnvelope()),
            FrameEncoder.endOfStream(lane: 3, seq: 9, total: 1000),
            FrameEncoder.credit(lane: 3, seq: 1, epoch: 2, limit: 64),
            FrameEncoder.heartbeat(lane: 0, seq: 1, timeNs: 1),
            FrameEncoder.handoff(lane: 3, seq: 9, sentNs: 0x1122334455667788, count: 5, token: 0xAABBCCDDEEFF0011),
            FrameEncoder.command(seq: 4, RunnerCommand(code: .stop)),
            FrameEncoder.ack(lane: 1, seq: 1, ids: [EnvelopeID(hi: 1, lo: 2)]),
            Hello(pid: 16, worker: "w").encode(seq: 1),
            StatsReport(stage: "s", timeNs: 1, flags: [.idle], received: 2, emitted: 3, deadLettered: 0, errors: 0, held: 0,
                        lanes: [LaneEndStats(lane: 1, role: .consumer, count: 10, credits: 4, queued: 0, endOfStream: false, epoch: 7, countInEpoch: 6)],
                        status: []).encode(seq: 1),
        ]
        for v in vectors { #expect(doc.contains(Hex.encode(v)), "missing vector \(Hex.encode(v))") }
        var b = DataFrameBuilder(lane: 7, seq: 2, sentNs: 0x1122334455667788)
        b.append(vectorEnvelope())
        #expect(doc.contains(Hex.encode(b.finish().prefix(32))))
        #expect(doc.contains(EnvelopeID.derived(from: EnvelopeID(hi: 1, lo: 2), output: "out", index: 0).description))
    }

    /// docs/audit-log.md shows one record's body, its canonical bytes at seq 1, its chain hash and
    /// the checkpoint message over it: what the code produces, byte for byte.
    @Test func auditLogDoc_printsTheVectorsTheCodeProduces() throws {
        let doc = try Self.compactDoc("audit-log.md")
        let r = auditVectorRecord()
        let body = AuditCodec.body(r)
        let canonical = [AuditCodec.version] + [1, 0, 0, 0, 0, 0, 0, 0] + body
        let hash = ChainHash.link(canonical, prev: ChainHash.genesis)
        #expect(hash == PipeKit.SHA256.hash(canonical + [UInt8](repeating: 0, count: 32)))
        // Log binding: log_id 000102…0f, pipeline "p".
        let binding = Array(0..<16).map { UInt8($0) } + [1, 0] + Array("p".utf8)
        let message = Array("pipeline-audit-checkpoint/1\0".utf8) + binding + [1, 0, 0, 0, 0, 0, 0, 0] + hash
        if ProcessInfo.processInfo.environment["PRINT_VECTORS"] != nil {
            print("body \(Hex.encode(body))\ncanonical \(Hex.encode(canonical))\nhash \(Hex.encode(hash))\nmessage \(Hex.encode(message))")
        }
        for v in [body, canonical, hash, message] { #expect(doc.contains(Hex.encode(v)), "missing vector \(Hex.encode(v))") }
        var entry: [UInt8] = []
        AuditCodec.appendEntry(r, into: &entry)
        #expect(try Self.compactDoc("wire-format.md").contains(Hex.encode(entry)), "wire-format.md: missing AUDIT entry \(Hex.encode(entry))")
    }

    /// docs/cap-pipeline.md shows a receipt's canonical bytes, its leaf, and the root and proof
    /// of a batch of three: what the executor computes.
    @Test func capPipelineDoc_printsTheReceiptVectors() throws {
        let doc = try Self.compactDoc("cap-pipeline.md")
        let receipts = (1...3).map { i in
            ConfigValue.object([("outcome", .string("executed")), ("cap", .string("0000000000000000000000000000000\(i)")), ("latency_us", .int(Int64(i)))])
        }
        let canonical = Receipts.canonical(receipts[0])
        #expect(String(decoding: canonical, as: UTF8.self) == #"{"cap":"00000000000000000000000000000001","latency_us":1,"outcome":"executed"}"#)
        let leaves = receipts.map(Receipts.leaf)
        let (root, paths) = Receipts.tree(leaves)
        if ProcessInfo.processInfo.environment["PRINT_VECTORS"] != nil {
            print("leaves \(leaves.map { Hex.encode($0) })\nroot \(Hex.encode(root))\npath2 \(paths[2].map { Hex.encode($0) })")
        }
        for v in leaves + [root] + paths[2] { #expect(doc.contains(Hex.encode(v)), "missing vector \(Hex.encode(v))") }
        #expect(doc.contains(String(decoding: canonical, as: UTF8.self).filter { !$0.isWhitespace }))
    }

    @Test func pipelineReference_containsTheGeneratedStageSection() throws {
        let doc = try String(contentsOfFile: Paths.root + "/docs/pipeline-reference.md", encoding: .utf8)
        let generated = StageDocs.markdown(builtInStages)
        #expect(doc.contains(generated), "docs/pipeline-reference.md is stale: regenerate with `pipectl stages --markdown`")
    }
}

func auditVectorRecord() -> AuditRecord {
    AuditRecord(decision: "quarantine", envelope: EnvelopeID(hi: 1, lo: 2), actor: "a", parents: [EnvelopeID(hi: 3, lo: 4)],
                stage: "s", location: "host:1", timeNs: 1_000_000_000, intent: "i", reason: "r",
                details: ["k": .int(5), "b": .bool(true)])
}
