import Testing
import Foundation
@testable import PipeConfig
import PipeKit
import PipeRegistry

@Suite("Pipeline YAML")
struct ConfigTests {
    func messages(_ text: String) -> [String] {
        PipelineLoader.load(text: text, file: "p.yaml", registry: builtInStages).1.map(\.description)
    }

    @Test func brokenFixture_reportsEveryProblemWithItsPosition() throws {
        let (_, diags) = PipelineLoader.load(path: Paths.fixture("broken.yaml"), registry: builtInStages)
        let f = Paths.fixture("broken.yaml")
        let got = diags.map(\.description)
        let expected = [
            "\(f):5:11: unknown stage kind 'generater' (did you mean 'generator'?); `pipectl stages` lists the kinds",
            "\(f):9:14: stage 'src' is a source (generator) and takes no inputs",
            "\(f):10:15: stage 'src': config field 'count' expected integer, got string",
            "\(f):10:30: stage 'src': unknown config key 'colour'; known keys: count, rate, payload_size, payload, seed, actor, intent, authority, attrs, durable",
            "\(f):13:14: stage 'pass' references unknown stage 'nosuch'",
            "\(f):13:22: stage 'src' has no output 'nope'; its outputs: out, dead_letter",
            "\(f):14:9: duplicate stage id 'pass' (first defined at line 11)",
            "\(f):16:22: stage 'pass' (passthrough) has no input port 'side'; its ports: in",
            "\(f):19:14: cycle a -> b -> a has no loop-back edge; declare one of its inputs as { from: ..., loop_back: { max_hops: N } }",
            "\(f):23:5: stage 'sink': missing required config field 'path' (string): Output file; relative paths are resolved against the run directory.",
        ]
        #expect(got == expected)
    }

    /// An unknown kind still has its input references checked; abbreviations get a suggestion;
    /// a lane override that matches nothing says why, and its own bad settings are still named.
    @Test func unknownKindsAbbreviationsAndOverridesThatMatchNothing_areAllReported() {
        let m = messages("""
            pipeline: v
            stages:
              - id: gen
                kind: generator
              - id: pass
                kind: passthru
                inputs: [nosuch]
              - id: s1
                kind: stdout
                inputs: [gen]
              - id: s2
                kind: null
                inputs: [gen]
              - id: p3
                kind: passthrough
                input: [gen]
            lanes:
              - { from: gen, to: p3, bound: 10, high: 20 }
              - { from: gen, to: pas }
            """)
        #expect(m == [
            "p.yaml:6:11: unknown stage kind 'passthru' (did you mean 'passthrough'?); `pipectl stages` lists the kinds",
            "p.yaml:7:14: stage 'pass' references unknown stage 'nosuch'",
            "p.yaml:9:11: unknown stage kind 'stdout' (did you mean 'stdout-sink'?); `pipectl stages` lists the kinds",
            "p.yaml:12:11: unknown stage kind 'null' (did you mean 'null-sink'?); `pipectl stages` lists the kinds",
            "p.yaml:14:9: stage 'p3' (passthrough) has no inputs; give it `inputs: [stage]`",
            "p.yaml:16:5: unknown stage key 'input' (did you mean 'inputs'?)",
            "p.yaml:18:5: lane override from 'gen' to 'p3' matches no lane ('p3' reads no lane)",
            "p.yaml:18:5: lane override from 'gen' to 'p3': high watermark 20 is above the bound 10",
            "p.yaml:19:5: lane override from 'gen' to 'pas' matches no lane (no stage 'pas'; did you mean 'pass'?)",
        ], "\(m)")
        #expect(didYouMean("xy", among: ["xylophone"]) == nil)          // too short to abbreviate
        #expect(didYouMean("sink", among: ["file-sink", "null-sink"]) == "file-sink")   // a part: the shorter first, then order
        #expect(didYouMean("generat", among: ["generator", "gate"]) == "generator")
    }

    /// A key given twice stops YAML composition; each repeat is named where it is and the rest of
    /// the file is still checked.
    @Test func duplicateKeys_areEachNamedWhereTheyAre_andTheRestIsStillChecked() {
        let m = messages("""
            pipeline: d
            stages:
              - id: gen
                kind: generator
                config: { count: 5, count: 6 }
              - id: pass
                kind: passthrough
                inputs: [gen]
                placement: in-process
                inputs: [gen]
              - id: sink
                kind: null-sink
                inputs: [{ from: pass, port: nope }]
            """)
        #expect(m == [
            "p.yaml:5:25: duplicate key 'count' (first at line 5, column 15)",
            "p.yaml:10:5: duplicate key 'inputs' (first at line 8, column 5)",
            "p.yaml:13:14: stage 'sink' (null-sink) has no input port 'nope'; its ports: in",
        ], "\(m)")
        // Two keys repeated in one mapping, each named at its own repeat; a key of a nested flow
        // mapping is not a repeat; a CRLF file the same.
        let two = """
            pipeline: d
            stages:
              - id: gen
                kind: generator
                config: { count: 5, attrs: { count: 1 }, count: 6 }
                id: gen2
                kind: generator
            """
        let expected = [
            "p.yaml:5:46: duplicate key 'count' (first at line 5, column 15)",
            "p.yaml:6:5: duplicate key 'id' (first at line 3, column 5)",
            "p.yaml:7:5: duplicate key 'kind' (first at line 4, column 5)",
        ]
        #expect(messages(two) == expected, "\(messages(two))")
        #expect(messages(two.replacingOccurrences(of: "\n", with: "\r\n")) == expected)
        #expect(PipelineLoader.placeholder(length: 1, index: 2) == nil && PipelineLoader.placeholder(length: 2, index: 3) == "++")
    }

    @Test func anExternalExecutorOverTcp_needsCurveOrSaysInsecure() {
        func exec(_ extra: String) -> [String] {
            messages("""
                pipeline: x
                stages:
                  - { id: gen, kind: generator }
                  - { id: exec, kind: executor, inputs: [gen], config: { executor: external, endpoint: "tcp://10.0.0.1:7900"\(extra) } }
                """)
        }
        #expect(exec("").contains { $0.contains("a tcp endpoint needs CURVE (`curve_key` and `server_key`), or `insecure: true` for plaintext") }, "\(exec(""))")
        #expect(exec(", insecure: true").isEmpty)
        #expect(exec(", curve_key: keys/host/curve.key, server_key: keys/svc/curve.pub").isEmpty)
    }

    @Test func syntaxError_namesLineAndColumn() {
        let (_, diags) = PipelineLoader.load(path: Paths.fixture("syntax.yaml"), registry: builtInStages)
        #expect(diags.count == 1)
        #expect(diags.first?.pos == SourcePos(line: 4, column: 1))
        #expect(diags.first?.message.hasPrefix("YAML syntax error:") == true)
    }

    @Test func missingFile_isOneClearDiagnostic() {
        let (_, diags) = PipelineLoader.load(path: "/nonexistent/x.yaml", registry: builtInStages)
        #expect(diags.map(\.description) == ["/nonexistent/x.yaml:1:1: cannot read file (missing or not readable)"])
    }

    @Test func loopBack_withHopLimitMakesACycleLegal() {
        let ok = """
        stages:
          - { id: g, kind: generator }
          - id: p
            kind: passthrough
            inputs: [g, { from: h.again, loop_back: { max_hops: 2 } }]
          - { id: h, kind: hop, inputs: [p] }
          - { id: s, kind: null-sink, inputs: [h] }
        """
        #expect(messages(ok) == [])
        let noLimit = ok.replacingOccurrences(of: "loop_back: { max_hops: 2 }", with: "loop_back: {}")
        #expect(messages(noLimit).contains { $0.contains("loop_back must be { max_hops: N }") })
        let undeclared = ok.replacingOccurrences(of: "{ from: h.again, loop_back: { max_hops: 2 } }", with: "h.again")
        #expect(messages(undeclared).contains { $0.contains("cycle p -> h -> p has no loop-back edge") })
    }

    @Test func loopBack_intoAPortThatRefusesItIsAnError() {
        let text = """
        stages:
          - { id: g, kind: generator }
          - { id: h, kind: hop, inputs: [g] }
          - id: s
            kind: null-sink
            inputs: [h, { from: h.again, loop_back: { max_hops: 2 } }]
        """
        #expect(messages(text).contains { $0.contains("input port 's.in' does not accept a loop-back edge") })
    }

    @Test func placement_isOneTypeWithThreeForms() {
        let base = "stages:\n  - { id: g, kind: generator, placement: PLACE }\n  - { id: s, kind: null-sink, inputs: [g] }\n"
        #expect(messages(base.replacingOccurrences(of: "PLACE", with: "in-process")) == [])
        #expect(messages(base.replacingOccurrences(of: "PLACE", with: "process")) == [])
        let remote = "remote: { listen: \"tcp://127.0.0.1:7800\", insecure: true, workers: { w1: { key: k.pub } } }\n"
        #expect(messages(remote + base.replacingOccurrences(of: "PLACE", with: "{ worker: w1 }")) == [])
        // Without the section that lists it, a worker placement is an error.
        #expect(messages(base.replacingOccurrences(of: "PLACE", with: "{ worker: w1 }")).first?.contains("needs a `remote:` section") == true)
        #expect(messages(base.replacingOccurrences(of: "PLACE", with: "elsewhere")).first?.contains("placement must be") == true)
    }

    @Test func unknownKeys_atEveryLevelAreErrors() {
        let text = """
        stagez: []
        defaults: { lane: { bound: 0, colour: 1 } }
        stages:
          - { id: g, kind: generator, colour: 1 }
          - { id: S, kind: null-sink, inputs: [g] }
        lanes:
          - { from: g, to: nowhere }
        """
        let m = messages(text)
        #expect(m.contains { $0.hasPrefix("p.yaml:1:1: unknown top-level key 'stagez' (did you mean 'stages'?)") })
        #expect(m.contains { $0.contains("bound must be an integer from 1 to 1000000") })
        #expect(m.contains { $0.contains("unknown lane key 'colour'") })
        #expect(m.contains { $0.contains("unknown stage key 'colour'") })
        #expect(m.contains { $0.contains("stage id 'S' must match [a-z0-9_-]+") })
        #expect(m.contains { $0.contains("lane override from 'g' to 'nowhere' matches no lane") })
    }

    @Test func laneSettings_watermarksBytesAndMetrics() throws {
        let ok = """
        defaults: { lane: { bound: 100, low: 10, high: 60 } }
        metrics: { listen: 127.0.0.1:9464 }
        stages:
          - { id: g, kind: generator }
          - { id: s, kind: null-sink, inputs: [g] }
        lanes:
          - { from: g, to: s, bound: 80, bytes: 65536, release: 30 }
        """
        let (spec, diags) = PipelineLoader.load(text: ok, file: "p.yaml", registry: builtInStages)
        #expect(diags.isEmpty, "\(diags)")
        let s = try #require(spec)
        #expect(s.metrics == MetricsSpec(listen: "127.0.0.1:9464", host: "127.0.0.1", port: 9464))
        let edge = try #require(PipelineValidator(spec: s, registry: builtInStages).edges.first { $0.to == "s" })
        let lane = PipelineValidator.settings(for: edge, in: s)
        #expect(lane.bound == 80 && lane.bytes == 65536)
        #expect(lane.marks.low == 10 && lane.marks.high == 60 && lane.marks.release == 30)
        // Derived marks: 50% and 80% of the bound, release midway.
        let d = LaneSettings(bound: 1000).marks
        #expect(d.low == 500 && d.high == 800 && d.release == 650)

        let bad = """
        metrics: { listen: nowhere }
        defaults: { lane: { bound: 10, high: 20 } }
        stages:
          - { id: g, kind: generator }
          - { id: s, kind: null-sink, inputs: [g] }
        lanes:
          - { from: g, to: s, low: 8, high: 5, bytez: 1 }
        """
        let m = messages(bad)
        #expect(m.contains { $0.contains("metrics.listen must be HOST:PORT") })
        #expect(m.contains { $0.contains("defaults.lane: high watermark 20 is above the bound 10") })
        #expect(m.contains { $0.contains("unknown lane key 'bytez' (did you mean 'bytes'?)") })
        #expect(m.contains { $0.contains("lane g.out -> s.in: low watermark 8 must be below the high watermark 5") })
    }

    @Test func watermarks_haveRealHysteresis() {
        // CONCEPTS.md: with low 2 and high 6, depths 6, 5, 6, 5 stay overloaded.
        var w = Watermarks(low: 2, high: 6)
        #expect(w.release == 4)
        var states: [PressureState] = []
        for d in [0, 2, 6, 5, 6, 5, 3, 5, 6, 3, 1, 0, 3] { w.observe(d); states.append(w.state) }
        #expect(states == [.normal, .pressureRising, .overloaded, .overloaded, .overloaded, .overloaded, .recovering,
                           .recovering, .overloaded, .recovering, .normal, .normal, .pressureRising])
        var x = Watermarks(low: 2, high: 6)
        #expect(x.observe(7) == .normal && x.observe(7) == nil && x.observe(0) == .overloaded)
    }

    @Test func everyExamplePipeline_isValid() throws {
        let dir = Paths.root + "/pipelines"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".yaml") && !$0.hasSuffix(".test.yaml") }
        #expect(files.count >= 2)
        for f in files {
            let (_, diags) = PipelineLoader.load(path: dir + "/" + f, registry: builtInStages)
            #expect(diags.isEmpty, "\(f): \(diags)")
        }
    }
}
