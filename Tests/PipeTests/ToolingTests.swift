import Testing
import Foundation
import PipeKit

/// Offline pipectl tools: schema and graph.
@Suite("pipectl schema and graph")
struct ToolingTests {
    /// The schema is checked by an independent validator (python3-jsonschema): it is a valid
    /// draft 2020-12 schema, every example pipeline conforms, and typical mistakes are caught.
    @Test func schema_acceptsEveryExample_andCatchesMistakes() throws {
        let schema = try runProcess(Paths.pipectl, ["schema"])
        #expect(schema.status == 0)
        let dir = Paths.tempDir("schema")
        try schema.stdout.write(toFile: dir + "/schema.json", atomically: true, encoding: .utf8)
        let bad = """
        stages:
          - { id: g, kind: generator, config: { count: "many", bogus: 1 } }
          - { id: t, kind: twin, inputs: [g], config: { profile: harbour } }
          - { id: s, kind: file-sink, inputs: [t.allowed] }
        lanes:
          - { from: g, to: t, bound: 0, when_full: explode }
        """
        try bad.write(toFile: dir + "/bad.yaml", atomically: true, encoding: .utf8)
        let script = """
        import glob, json, sys, yaml, jsonschema
        schema = json.load(open(sys.argv[1]))
        jsonschema.Draft202012Validator.check_schema(schema)
        v = jsonschema.Draft202012Validator(schema)
        for f in sorted(f for f in glob.glob(sys.argv[2] + '/*.yaml') if not f.endswith('.test.yaml')):
            errs = [e.message for e in v.iter_errors(yaml.safe_load(open(f)))]
            print('OK' if not errs else 'BAD', f.split('/')[-1], errs)
        for e in v.iter_errors(yaml.safe_load(open(sys.argv[3]))):
            print('ERR', e.message)
        """
        let r = try runProcess("/usr/bin/python3", ["-c", script, dir + "/schema.json", Paths.root + "/pipelines", dir + "/bad.yaml"])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = r.stdout.split(separator: "\n").map(String.init)
        let examples = try FileManager.default.contentsOfDirectory(atPath: Paths.root + "/pipelines").filter { $0.hasSuffix(".yaml") && !$0.hasSuffix(".test.yaml") }
        #expect(lines.filter { $0.hasPrefix("OK ") }.count == examples.count, "\(lines)")
        #expect(!lines.contains { $0.hasPrefix("BAD ") }, "\(lines)")
        let errors = lines.filter { $0.hasPrefix("ERR ") }
        #expect(errors.contains { $0.contains("'many' is not of type 'integer'") })
        #expect(errors.contains { $0.contains("'bogus' was unexpected") })
        #expect(errors.contains { $0.contains("'harbour' is not one of") })
        #expect(errors.contains { $0.contains("0 is less than the minimum of 1") })
        #expect(errors.contains { $0.contains("'explode' is not one of") })
    }

    @Test func graph_drawsAFileInThreeFormats() throws {
        let file = Paths.root + "/pipelines/loop.yaml"
        let text = try runProcess(Paths.pipectl, ["graph", file])
        #expect(text.status == 0)
        #expect(text.stdout.contains("hop -> relay  [again -> in, bound 4, max_hops 3, loop-back]"))
        #expect(text.stdout.contains("gen -> relay  [out -> in, bound 4]"))
        let dot = try runProcess(Paths.pipectl, ["graph", file, "--format", "dot"]).stdout
        #expect(dot.hasPrefix("digraph pipeline {") && dot.contains("\"hop\" -> \"relay\"") && dot.contains("style=dashed"))
        let mermaid = try runProcess(Paths.pipectl, ["graph", file, "--format", "mermaid"]).stdout
        #expect(mermaid.hasPrefix("flowchart LR") && mermaid.contains("n_hop -.->"))
        let json = try JSON.parse(try runProcess(Paths.pipectl, ["graph", file, "--json"]).stdout)
        #expect(json["nodes"]?.listValue?.count == 4 && json["edges"]?.listValue?.count == 4)
        let bad = try runProcess(Paths.pipectl, ["graph", file, "--format", "png"])
        #expect(bad.status != 0 && bad.stderr.contains("png"))
    }
    /// Every example pipeline has tests next to it, and they pass.
    @Test func everyExamplePipeline_hasPassingTests() throws {
        let dir = Paths.root + "/pipelines"
        let pipelines = try FileManager.default.contentsOfDirectory(atPath: dir)
            .filter { $0.hasSuffix(".yaml") && !$0.hasSuffix(".test.yaml") }.sorted()
        for p in pipelines {
            #expect(FileManager.default.fileExists(atPath: dir + "/" + p.dropLast(5) + ".test.yaml"), "\(p) has no tests")
        }
        let r = try runProcess(Paths.pipectl, ["test"] + pipelines.map { dir + "/" + $0 }, timeout: 120)
        #expect(r.status == 0, "\(r.stdout)\n\(r.stderr)")
        #expect(r.stdout.contains(" 0 failed"))
        #expect(!r.stdout.contains("FAIL"))
    }

    /// A failing expectation names the file, the line and the field; exit status 1.
    @Test func pipelineTest_failuresNameFileLineAndField() throws {
        let dir = Paths.tempDir("ptest")
        try """
        stages:
          - { id: g, kind: generator, config: { count: 2, payload: '{"n":{n}}' } }
          - { id: p, kind: passthrough, inputs: [g] }
          - { id: s, kind: null-sink, inputs: [p] }
          - { id: t, kind: twin, inputs: [g] }
          - { id: u, kind: null-sink, inputs: [t.allowed, t.blocked] }
        """.write(toFile: dir + "/mini.yaml", atomically: true, encoding: .utf8)
        try """
        tests:
          - name: right
            target: [g, p]
            expect:
              p.out:
                - { payload: { n: 1 } }
                - { payload: { n: 2 } }
          - name: wrong
            target: p
            input:
              - { actor: a, attrs: { k: v }, payload: { n: 1 } }
            expect:
              out:
                - { actor: b, attrs: { k: w }, payload: { n: 2 } }
          - name: a sink emits nothing
            target: s
            input:
              - { payload: { n: 1 } }
            expect:
              out: { count: 0 }
          - name: a dead letter nobody expected fails the test
            target: t
            input:
              - { payload: { n: 1 } }
            expect:
              allowed: { count: 0 }
        """.write(toFile: dir + "/mini.test.yaml", atomically: true, encoding: .utf8)
        let r = try runProcess(Paths.pipectl, ["test", dir + "/mini.yaml"])
        #expect(r.status == 1)
        #expect(r.stdout.contains("ok    right"))
        #expect(r.stdout.contains("FAIL  wrong"))
        #expect(r.stdout.contains("mini.test.yaml:13: p.out[0].actor: expected \"b\", got \"a\""))
        #expect(r.stdout.contains("mini.test.yaml:13: p.out[0].attrs.k: expected \"w\", got \"v\""))
        #expect(r.stdout.contains("mini.test.yaml:13: p.out[0].payload: expected {\"n\":2}, got {\"n\":1}"))
        #expect(r.stdout.contains("ok    a sink emits nothing"))
        #expect(r.stdout.contains("unexpected dead letters on t.dead_letter: 1 (no twin_kind attribute"))
        #expect(r.stdout.contains("2 passed, 2 failed"))
    }
}
