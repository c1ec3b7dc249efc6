import Foundation
import PipeKit
import Yams

/// `pipectl test`: test cases written in YAML next to a pipeline (`NAME.test.yaml` beside
/// `NAME.yaml`), run against the pipeline's own stages in the embedded harness. The format is in
/// docs/pipeline-reference.md ("Pipeline tests").
public struct PipelineTestFile: Sendable {
    public var file: String
    /// The pipeline file the tests are about.
    public var pipeline: String
    public var tests: [PipelineTest]
}

public struct PipelineTest: Sendable {
    public var name: String
    public var pos: SourcePos
    /// The stages under test: one stage, or a sub-chain (wired as in the pipeline).
    public var target: [String]
    /// The input port of the first target stage (default: its first port).
    public var port: String?
    /// Input envelopes in the JSONL form (maps).
    public var input: [ConfigValue]
    /// The harness's wall clock, in Unix ns (default 1.7e18).
    public var wallNs: UInt64?
    /// Moves the manual clock forward after feeding (ticks fire).
    public var advanceMs: UInt64?
    /// Expectations per output (`out`, or `stage.output` in a chain; `dead_letter` included).
    public var expect: [(output: String, expectation: Expectation, pos: SourcePos)]

    public enum Expectation: Sendable {
        /// Exactly these envelopes, in order; each item lists the fields it checks.
        case envelopes([ConfigValue])
        /// Exactly this many envelopes.
        case count(Int)
    }
}

public enum PipelineTestLoader {
    static let testKeys = ["name", "target", "port", "input", "wall_ns", "advance_ms", "expect"]

    /// `NAME.test.yaml` for `NAME.yaml`.
    public static func testFile(forPipeline path: String) -> String {
        path.hasSuffix(".yaml") ? String(path.dropLast(5)) + ".test.yaml" : path + ".test.yaml"
    }

    public static func load(path: String) -> (PipelineTestFile?, [Diagnostic]) {
        var diags: [Diagnostic] = []
        func error(_ p: SourcePos, _ m: String) { diags.append(Diagnostic(file: path, pos: p, message: m)) }
        func pos(_ n: Node) -> SourcePos { n.mark.map { SourcePos(line: $0.line, column: $0.column) } ?? .start }
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            return (nil, [Diagnostic(file: path, pos: .start, message: "cannot read test file (missing, unreadable or not UTF-8)")])
        }
        let root: Node
        do {
            guard let r = try Yams.compose(yaml: text) else { return (nil, [Diagnostic(file: path, pos: .start, message: "empty test file")]) }
            root = r
        } catch {
            return (nil, [Diagnostic(file: path, pos: .start, message: "YAML error: \(error)")])
        }
        guard let top = root.mapping else { return (nil, [Diagnostic(file: path, pos: pos(root), message: "expected a mapping with `tests`")]) }
        let dir = (path as NSString).deletingLastPathComponent
        var pipeline = path.hasSuffix(".test.yaml") ? String(path.dropLast(10)) + ".yaml" : ""
        var tests: [PipelineTest] = []
        var sawTests = false
        for (k, v) in top {
            switch k.string {
            case "pipeline":
                guard let p = v.scalar?.string, !p.isEmpty else { error(pos(v), "pipeline must be a file name"); continue }
                pipeline = p.hasPrefix("/") ? p : (dir.isEmpty ? p : dir + "/" + p)
            case "tests":
                sawTests = true
                guard let seq = v.sequence else { error(pos(v), "tests must be a list"); continue }
                for item in seq {
                    guard let m = item.mapping else { error(pos(item), "a test must be a mapping with name, target, input and expect"); continue }
                    var t = PipelineTest(name: "", pos: pos(item), target: [], port: nil, input: [], wallNs: nil, advanceMs: nil, expect: [])
                    for (tk, tv) in m {
                        switch tk.string {
                        case "name": t.name = tv.scalar?.string ?? ""
                        case "target":
                            if let s = tv.scalar?.string { t.target = [s] }
                            else if let seq = tv.sequence { t.target = seq.compactMap { $0.scalar?.string } }
                            else { error(pos(tv), "target must be a stage id or a list of stage ids (a sub-chain)") }
                        case "port": t.port = tv.scalar?.string
                        case "input":
                            guard let seq = tv.sequence else { error(pos(tv), "input must be a list of envelopes (JSONL fields)"); continue }
                            for e in seq {
                                let c = configValue(e)
                                if case .map = c { t.input.append(c) } else { error(pos(e), "an input envelope must be a mapping of JSONL fields") }
                            }
                        case "wall_ns":
                            if let i = tv.int, i >= 0 { t.wallNs = UInt64(i) } else { error(pos(tv), "wall_ns must be a non-negative integer (Unix ns)") }
                        case "advance_ms":
                            if let i = tv.int, i >= 0 { t.advanceMs = UInt64(i) } else { error(pos(tv), "advance_ms must be a non-negative integer") }
                        case "expect":
                            guard let em = tv.mapping else { error(pos(tv), "expect must map outputs to a list of envelopes or { count: N }"); continue }
                            for (ok, ov) in em {
                                let name = ok.string ?? ""
                                if let seq = ov.sequence {
                                    t.expect.append((name, .envelopes(seq.map(configValue)), pos(ok)))
                                } else if let cm = ov.mapping, cm.count == 1, cm.first?.key.string == "count", let n = cm.first?.value.int, n >= 0 {
                                    t.expect.append((name, .count(n), pos(ok)))
                                } else {
                                    error(pos(ov), "expect.\(name) must be a list of envelopes or { count: N }")
                                }
                            }
                        default:
                            var msg = "unknown test key '\(tk.string ?? "?")'"
                            if let s = didYouMean(tk.string ?? "", among: testKeys) { msg += " (did you mean '\(s)'?)" }
                            error(pos(tk), msg)
                        }
                    }
                    if t.name.isEmpty { error(t.pos, "a test needs a name") }
                    if t.target.isEmpty { error(t.pos, "test '\(t.name)' needs a target (a stage id or a list of them)") }
                    if t.expect.isEmpty { error(t.pos, "test '\(t.name)' expects nothing (add expect:)") }
                    tests.append(t)
                }
            default:
                error(pos(k), "unknown key '\(k.string ?? "?")' (expected pipeline, tests)")
            }
        }
        if !sawTests { error(pos(root), "missing `tests` list") }
        if pipeline.isEmpty { error(pos(root), "name the pipeline (`pipeline: FILE`) or call the file NAME.test.yaml next to NAME.yaml") }
        return (PipelineTestFile(file: path, pipeline: pipeline, tests: tests), diags)
    }

    static func configValue(_ n: Node) -> ConfigValue {
        switch n {
        case .scalar(let s):
            if s.style == .plain {
                if n.null != nil { return .null }
                if let b = n.bool { return .bool(b) }
                if let i = n.int { return .int(Int64(i)) }
                if let d = n.float { return .double(d) }
            }
            return .string(s.string)
        case .sequence(let seq): return .list(seq.map(configValue))
        case .mapping(let m): return .map(m.map { ConfigEntry(key: $0.key.string ?? "", value: configValue($0.value)) })
        case .alias: return .null
        }
    }
}
