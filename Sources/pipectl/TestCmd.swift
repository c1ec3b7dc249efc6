import ArgumentParser
import Foundation
import PipeConfig
import PipeKit
import PipeStore
import PipeKitTesting
import PipeRegistry

struct TestCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "test",
        abstract: "Run the test cases written next to pipelines (NAME.test.yaml beside NAME.yaml) in the embedded harness.",
        discussion: """
        Each test feeds input envelopes to a stage (or a sub-chain wired as in the pipeline) and checks what comes out, the way Benthos and Vector test configs do. Format: docs/pipeline-reference.md, "Pipeline tests".
        FILE may be a pipeline (its NAME.test.yaml is used) or a test file. Exit 0 when every test passes, 1 otherwise.
        """)
    @Argument(help: "Pipeline files or test files.") var files: [String]
    @Flag(help: "Print the results as JSON.") var json = false

    func validate() throws { if files.isEmpty { throw ValidationError("give at least one pipeline or test file") } }

    func run() throws {
        var passed = 0, failed = 0
        var report: [ConfigValue] = []
        for f in files {
            let testPath = f.hasSuffix(".test.yaml") ? f : PipelineTestLoader.testFile(forPipeline: f)
            let (tf, diags) = PipelineTestLoader.load(path: testPath)
            guard let tf, diags.isEmpty else {
                for d in diags { FileHandle.standardError.write(Data((d.description + "\n").utf8)) }
                failed += 1
                report.append(.object([("file", .string(testPath)), ("error", .string(diags.first?.message ?? "invalid"))]))
                continue
            }
            let (spec, pdiags) = PipelineLoader.load(path: tf.pipeline, registry: builtInStages)
            guard let spec, pdiags.isEmpty else {
                for d in pdiags { FileHandle.standardError.write(Data((d.description + "\n").utf8)) }
                FileHandle.standardError.write(Data("\(testPath): the pipeline \(tf.pipeline) is invalid\n".utf8))
                failed += 1
                continue
            }
            if !json { print(testPath) }
            let edges = PipelineValidator(spec: spec, registry: builtInStages).edges
            for t in tf.tests {
                let start = Date()
                let problems = PipelineTestRunner(spec: spec, edges: edges, test: t, testFile: testPath).run()
                let ms = Int(Date().timeIntervalSince(start) * 1000)
                if problems.isEmpty { passed += 1 } else { failed += 1 }
                if json {
                    report.append(.object([("file", .string(testPath)), ("test", .string(t.name)), ("ok", .bool(problems.isEmpty)),
                                           ("problems", .list(problems.map(ConfigValue.string))), ("ms", .int(Int64(ms)))]))
                } else {
                    print("  \(problems.isEmpty ? "ok  " : "FAIL")  \(t.name) (\(ms) ms)")
                    for p in problems { print("        \(p)") }
                }
            }
        }
        if json { print(JSON.serialize(.list(report))) } else { print("\(passed) passed, \(failed) failed") }
        if failed > 0 { throw ExitCode(1) }
    }
}

/// Runs one test: builds each target stage in a harness with its configuration from the
/// pipeline, feeds the input, moves envelopes along the pipeline's own edges between targets,
/// drains, and compares what left the targets with the expectations.
struct PipelineTestRunner {
    let spec: PipelineSpec
    let edges: [Edge]
    let test: PipelineTest
    let testFile: String

    func run() -> [String] {
        var problems: [String] = []
        let dir = NSTemporaryDirectory() + "pipectl-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var harness: [String: StageHarness] = [:]
        for id in test.target {
            guard let s = spec.stages.first(where: { $0.id == id }), let d = builtInStages[s.kind] else {
                return ["\(testFile):\(test.pos.line): target '\(id)' is not a stage of \(spec.file)" +
                        (didYouMean(id, among: spec.stages.map(\.id)).map { " (did you mean '\($0)'?)" } ?? "")]
            }
            do {
                var lanes: [String: Int] = [:]
                for e in edges where e.to == id { lanes[e.port, default: 0] += 1 }
                // A stage that asks for a durable store gets a real SQLite one in the test's directory.
                let store: (any KeyValueStore)? = d.usesStore ? try SQLiteKeyValueStore(path: dir + "/\(id).kv.sqlite") : nil
                let h = try StageHarness(d, config: s.config, stageID: id, runDirectory: dir, store: store, laneCounts: lanes)
                if let w = test.wallNs { h.wallClockNs = w }
                h.limits = spec.limits
                harness[id] = h
            } catch { return ["stage '\(id)' did not start: \(error)"] }
        }
        let inner = edges.filter { test.target.contains($0.from) && test.target.contains($0.to) }
        var results: [String: [Envelope]] = [:]

        /// Moves everything the targets emitted: along inner edges, or into the results.
        func pump() throws {
            var moved = true
            while moved {
                moved = false
                for id in test.target {
                    guard let h = harness[id] else { continue }
                    for (output, _) in h.outputs {
                        let envs = h.take(output)
                        if envs.isEmpty { continue }
                        moved = true
                        let consumers = inner.filter { $0.from == id && $0.output == output }
                        if consumers.isEmpty { results["\(id).\(output)", default: []] += envs }
                        for c in consumers {
                            // The lane's index among those feeding that port, in declaration order (as the runner numbers them).
                            let lane = edges.filter { $0.to == c.to && $0.port == c.port }.firstIndex { $0.fromRef == c.fromRef } ?? 0
                            for e in envs { try harness[c.to]?.feed(e, port: c.port, laneIndex: lane, from: c.fromRef, loopBack: c.loopBack) }
                        }
                    }
                }
            }
        }

        do {
            guard let firstID = test.target.first, let first = harness[firstID] else { return ["no target"] }
            if builtInStages[spec.stages.first { $0.id == firstID }?.kind ?? ""]?.role == .source {
                if !test.input.isEmpty { problems.append("'\(firstID)' is a source: it takes no input") }
                _ = try first.produce(budget: 1024, maxCalls: 100_000)
            } else {
                for (n, v) in test.input.enumerated() {
                    do { try first.feed(try EnvelopeJSONL.decode(JSON.serialize(v)), port: test.port ?? first.descriptor.inputs.first?.name ?? "in") }
                    catch let e as EnvelopeJSONL.FormatError { problems.append("input[\(n)]: \(e.message)") }
                }
            }
            try pump()
            if let ms = test.advanceMs { for id in test.target { try harness[id]?.advance(byMs: ms) }; try pump() }
            for id in test.target {
                guard let h = harness[id] else { continue }
                try h.stage.drain(context: h)
                try pump()
            }
            for id in test.target {
                guard let h = harness[id] else { continue }
                // Dead letters are an output like any other: expect them as `dead_letter`.
                for d in h.deadLetters {
                    var e = d.envelope
                    e.attrs["dead_letter_reason"] = .string(d.reason)
                    e.attrs["dead_letter_stage"] = .string(id)
                    results["\(id).\(deadLetterOutput)", default: []].append(e)
                }
                h.stage.stop()
            }
        } catch {
            problems.append("stage halted: \(error)")
            return problems
        }

        var checked: Set<String> = []
        for (output, expectation, pos) in test.expect {
            let key = output.contains(".") ? output : "\(test.target.count == 1 ? test.target[0] : test.target[test.target.count - 1]).\(output)"
            checked.insert(key)
            let got = results[key] ?? []
            switch expectation {
            case .count(let n):
                if got.count != n { problems.append("\(testFile):\(pos.line): \(key): expected \(n) envelopes, got \(got.count)") }
            case .envelopes(let want):
                if got.count != want.count {
                    problems.append("\(testFile):\(pos.line): \(key): expected \(want.count) envelopes, got \(got.count)")
                }
                for (i, (w, g)) in zip(want, got).enumerated() {
                    for p in EnvelopeMatcher.mismatches(w, g) { problems.append("\(testFile):\(pos.line): \(key)[\(i)].\(p)") }
                }
            }
        }
        // A dead letter nobody expected is a failure: it is where tests usually find bugs.
        for (key, envs) in results where key.hasSuffix(".\(deadLetterOutput)") && !checked.contains(key) && !envs.isEmpty {
            let reasons = envs.prefix(3).map { $0.attrs["dead_letter_reason"]?.stringValue ?? "?" }.joined(separator: "; ")
            problems.append("unexpected dead letters on \(key): \(envs.count) (\(reasons))")
        }
        return problems
    }
}

/// Field-by-field comparison of an expected envelope (JSONL field names) with an actual one.
enum EnvelopeMatcher {
    static let fields = ["id", "parent", "actor", "intent", "authority", "lane", "rank", "clock", "hops", "attempt", "attrs",
                         "payload", "payload_text", "payload_contains", "payload_b64"]

    static func mismatches(_ want: ConfigValue, _ got: Envelope) -> [String] {
        guard case .map(let entries) = want else { return ["expected item is not a mapping"] }
        var out: [String] = []
        let line = (try? JSON.parse(String(decoding: EnvelopeJSONL.encode(got), as: UTF8.self))) ?? .null
        for e in entries {
            let k = e.key, w = e.value
            switch k {
            case "attrs":
                for a in w.mapEntries ?? [] {
                    let actual = got.attrs[a.key]
                    if case .map = a.value, let needle = a.value["contains"]?.stringValue {
                        if actual?.stringValue?.contains(needle) != true {
                            out.append("attrs.\(a.key): expected to contain \"\(needle)\", got \(actual.map { "\"\($0)\"" } ?? "nothing")")
                        }
                    } else if !same(a.value, actual) {
                        out.append("attrs.\(a.key): expected \(JSON.serialize(a.value)), got \(actual.map { JSON.serialize(json($0)) } ?? "nothing")")
                    }
                }
            case "payload":
                let actual = got.withPayloadBytes { try? JSON.parse(bytes: Array($0)) }
                if actual.map({ equal($0, w) }) != true {
                    out.append("payload: expected \(JSON.serialize(w)), got \(String(decoding: got.payload.prefix(200), as: UTF8.self))")
                }
            case "payload_text":
                let text = String(decoding: got.payload, as: UTF8.self)
                if text != w.stringValue { out.append("payload_text: expected \(JSON.serialize(w)), got \(JSON.serialize(.string(String(text.prefix(200)))))") }
            case "payload_contains":
                let text = String(decoding: got.payload, as: UTF8.self)
                if let n = w.stringValue, !text.contains(n) { out.append("payload_contains: \"\(n)\" not in \(JSON.serialize(.string(String(text.prefix(200)))))") }
            default:
                guard fields.contains(k) else { out.append("\(k): not an envelope field (expected one of \(fields.joined(separator: ", ")))"); continue }
                let actual = line[k] ?? .null
                if !equal(actual, w) { out.append("\(k): expected \(JSON.serialize(w)), got \(JSON.serialize(actual))") }
            }
        }
        return out
    }

    static func json(_ a: AttrValue) -> ConfigValue {
        switch a { case .string(let s): return .string(s); case .int(let i): return .int(i); case .double(let d): return .double(d); case .bool(let b): return .bool(b) }
    }
    static func same(_ w: ConfigValue, _ a: AttrValue?) -> Bool { a.map { equal(json($0), w) } ?? false }

    /// JSON equality with numbers compared by value (1 == 1.0) and maps regardless of key order.
    static func equal(_ a: ConfigValue, _ b: ConfigValue) -> Bool {
        switch (a, b) {
        case (.int, .double), (.double, .int), (.double, .double): return a.doubleValue == b.doubleValue
        case (.map(let x), .map(let y)):
            return x.count == y.count && x.allSatisfy { e in y.first { $0.key == e.key }.map { equal(e.value, $0.value) } ?? false }
        case (.list(let x), .list(let y)): return x.count == y.count && zip(x, y).allSatisfy { equal($0, $1) }
        default: return a == b
        }
    }
}
