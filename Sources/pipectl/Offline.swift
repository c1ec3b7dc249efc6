import ArgumentParser
import Foundation
import PipeConfig
import PipeKit
import PipeRegistry
import PipeRuntime

struct Validate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check pipeline files; print every problem as file:line:column: message. Exit 0 valid, 1 invalid.")
    @Argument(help: "Pipeline YAML files.") var files: [String]
    @Flag(help: "Print the diagnostics as JSON.") var json = false

    func validate() throws { if files.isEmpty { throw ValidationError("give at least one pipeline file") } }

    func run() throws {
        var bad = 0
        var out: [ConfigValue] = []
        for file in files {
            var isDir: ObjCBool = false
            if FileManager.default.fileExists(atPath: file, isDirectory: &isDir), isDir.boolValue {
                let d = Diagnostic(file: file, pos: .start, message: "is a directory; give pipeline files (e.g. \(file.hasSuffix("/") ? file : file + "/")*.yaml)")
                if json { out.append(.object([("file", .string(file)), ("valid", .bool(false)), ("diagnostics", .list([.object([("line", .int(1)), ("column", .int(1)), ("message", .string(d.message))])]))])) }
                else { print(d.description) }
                bad += 1
                continue
            }
            // NAME.test.yaml beside NAME.yaml holds `pipectl test` cases: checked as such.
            if file.hasSuffix(".test.yaml") {
                let (t, diags) = PipelineTestLoader.load(path: file)
                if json {
                    out.append(.object([("file", .string(file)), ("kind", .string("test")), ("valid", .bool(diags.isEmpty)),
                                        ("diagnostics", .list(diags.map { .object([("line", .int(Int64($0.pos.line))), ("column", .int(Int64($0.pos.column))), ("message", .string($0.message))]) }))]))
                } else if diags.isEmpty, let t {
                    print("\(file): valid test file (\(t.tests.count) test\(t.tests.count == 1 ? "" : "s") of \(t.pipeline); `pipectl test` runs them)")
                } else {
                    for d in diags { print(d.description) }
                }
                if !diags.isEmpty { bad += 1 }
                continue
            }
            let (spec, diags) = PipelineLoader.load(path: file, registry: builtInStages)
            if json {
                out.append(.object([("file", .string(file)), ("valid", .bool(diags.isEmpty)),
                                    ("diagnostics", .list(diags.map { .object([("line", .int(Int64($0.pos.line))), ("column", .int(Int64($0.pos.column))), ("message", .string($0.message))]) }))]))
            } else if diags.isEmpty, let spec {
                let edges = PipelineValidator(spec: spec, registry: builtInStages).edges
                print("\(file): valid (\(spec.stages.count) stages, \(edges.count) lanes)")
            } else {
                for d in diags { print(d.description) }
            }
            if !diags.isEmpty { bad += 1 }
        }
        if json { printJSON(.list(out)) }
        if bad > 0 {
            if !json { FileHandle.standardError.write(Data("\(bad) of \(files.count) file(s) invalid\n".utf8)) }
            throw ExitCode(1)
        }
    }
}

struct Stages: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List every registered stage kind: summary, inputs, outputs and config fields.")
    @Flag(help: "Print as JSON.") var json = false
    @Flag(help: "Print the Markdown stage reference (the generated part of docs/pipeline-reference.md).") var markdown = false
    @Argument(help: "Only these kinds.") var kinds: [String] = []

    func run() throws {
        for k in kinds where builtInStages[k] == nil {
            fail("pipectl: unknown stage kind '\(k)'" + (didYouMean(k, among: builtInStages.kinds).map { " (did you mean '\($0)'?)" } ?? ""))
        }
        let list = builtInStages.descriptors.filter { kinds.isEmpty || kinds.contains($0.kind) }
        if json { printJSON(.list(list.map(StageDocs.json))); return }
        if markdown { print(StageDocs.markdown(StageRegistry(list)), terminator: ""); return }
        for d in list { print(StageDocs.text(d)) }
    }
}


struct Schema: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print a JSON Schema of the pipeline format, every stage's config included (for editors).",
        discussion: "Generated from the stage registry, like `pipectl stages` and docs/pipeline-reference.md. e.g. `pipectl schema > pipeline.schema.json`, then point your editor's YAML support at it.")
    func run() throws { print(JSON.serialize(PipelineSchema.json(registry: builtInStages))) }
}

struct Graph: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Draw a pipeline: from a FILE, or the running host's (with live lane states and depths).",
        discussion: "Formats: text (one line per lane), dot (Graphviz: `pipectl graph FILE --format dot | dot -Tsvg`), mermaid (Markdown).")
    enum Format: String, ExpressibleByArgument, CaseIterable { case text, dot, mermaid }
    @Argument(help: "A pipeline file; without it, the running host.") var file: String?
    @Option(help: "text, dot or mermaid.") var format: Format = .text
    @Flag(help: "Print nodes and edges as JSON.") var json = false
    @Flag(name: .customLong("dead-letters"), help: "Include the dead-letter lanes.") var deadLetters = false
    @OptionGroup var host: HostOptions

    func run() throws {
        let g: PipelineGraph
        if let file {
            let (spec, diags) = PipelineLoader.load(path: file, registry: builtInStages)
            guard let spec, diags.isEmpty else {
                for d in diags { FileHandle.standardError.write(Data((d.description + "\n").utf8)) }
                fail("pipectl graph: \(file) is invalid (see `pipectl validate \(file)`)")
            }
            g = PipelineGraph(spec: spec, edges: PipelineValidator(spec: spec, registry: builtInStages).edges)
        } else {
            g = PipelineGraph(status: host.call("status"), lanes: host.call("lanes"), deadLetters: deadLetters)
        }
        if json { printJSON(g.json); return }
        switch format {
        case .text: print(g.text, terminator: "")
        case .dot: print(g.dot, terminator: "")
        case .mermaid: print(g.mermaid, terminator: "")
        }
    }
}

/// Nodes and edges of a pipeline, drawn three ways.
struct PipelineGraph {
    struct Node { var id: String; var label: String }
    struct Edge { var from: String; var to: String; var label: String; var loop: Bool; var state: String? }
    var nodes: [Node] = []
    var edges: [Edge] = []

    init(spec: PipelineSpec, edges specEdges: [PipeConfig.Edge]) {
        for s in spec.stages {
            var label = "\(s.id)\n\(s.kind)"
            if s.replicas > 1 { label += " x\(s.replicas)" }
            if let p = s.placement ?? (spec.defaultPlacement == .inProcess ? nil : spec.defaultPlacement) { label += "\n\(p)" }
            nodes.append(Node(id: s.id, label: label))
        }
        for e in specEdges {
            let st = PipelineValidator.settings(for: e, in: spec)
            var label = "\(e.output) -> \(e.port), bound \(st.bound)"
            if st.whenFull != .block { label += ", \(st.whenFull.rawValue)" }
            if let h = e.maxHops { label += ", max_hops \(h)" }
            edges.append(Edge(from: e.from, to: e.to, label: label, loop: e.loopBack, state: nil))
        }
    }

    init(status: ConfigValue, lanes: ConfigValue, deadLetters: Bool) {
        for s in status["stages"]?.listValue ?? [] {
            guard let id = s["id"]?.stringValue, deadLetters || !id.hasPrefix("_") else { continue }
            nodes.append(Node(id: id, label: "\(id)\n\(s["kind"]?.stringValue ?? "")\n\(s["placement"]?.stringValue ?? "") \(s["state"]?.stringValue ?? "")"))
        }
        for l in lanes.listValue ?? [] {
            guard let from = l["from"]?.stringValue, let to = l["to"]?.stringValue else { continue }
            let fs = String(from.split(separator: ".").dropLast().joined(separator: ".")), ts = String(to.split(separator: ".").dropLast().joined(separator: "."))
            if !deadLetters && ts.hasPrefix("_") { continue }
            let state = l["state"]?.stringValue ?? "normal"
            let label = "\(from.split(separator: ".").last ?? "") -> \(to.split(separator: ".").last ?? ""), \(state), depth \(l["depth"]?.intValue ?? 0)/\(l["bound"]?.intValue ?? 0)"
            edges.append(Edge(from: fs, to: ts, label: label, loop: l["loop_back"]?.boolValue ?? false, state: state))
        }
    }

    var json: ConfigValue {
        .object([("nodes", .list(nodes.map { .object([("id", .string($0.id)), ("label", .string($0.label))]) })),
                 ("edges", .list(edges.map { .object([("from", .string($0.from)), ("to", .string($0.to)), ("label", .string($0.label)),
                                                      ("loop_back", .bool($0.loop)), ("state", $0.state.map(ConfigValue.string) ?? .null)]) }))])
    }

    var text: String {
        var s = ""
        for e in edges { s += "\(e.from) -> \(e.to)  [\(e.label)\(e.loop ? ", loop-back" : "")]\n" }
        let connected = Set(edges.flatMap { [$0.from, $0.to] })
        for n in nodes where !connected.contains(n.id) { s += "\(n.id)  (no lanes)\n" }
        return s
    }

    static func color(_ state: String?) -> String {
        switch state { case "overloaded": return "red"; case "pressure-rising": return "orange"; case "recovering": return "blue"; default: return "black" }
    }
    static func quoted(_ s: String) -> String {
        "\"" + s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n") + "\""
    }

    var dot: String {
        var s = "digraph pipeline {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n"
        for n in nodes { s += "  \(Self.quoted(n.id)) [label=\(Self.quoted(n.label))];\n" }
        for e in edges {
            s += "  \(Self.quoted(e.from)) -> \(Self.quoted(e.to)) [label=\(Self.quoted(e.label)), color=\(Self.color(e.state))\(e.loop ? ", style=dashed, constraint=false" : "")];\n"
        }
        return s + "}\n"
    }

    var mermaid: String {
        func id(_ s: String) -> String { "n_" + s.map { $0.isLetter || $0.isNumber ? String($0) : "_" }.joined() }
        func text(_ s: String) -> String { s.replacingOccurrences(of: "\"", with: "'").replacingOccurrences(of: "\n", with: "<br/>") }
        var s = "flowchart LR\n"
        for n in nodes { s += "  \(id(n.id))[\"\(text(n.label))\"]\n" }
        for e in edges { s += "  \(id(e.from)) \(e.loop ? "-.->" : "-->")|\"\(text(e.label))\"| \(id(e.to))\n" }
        return s
    }
}

struct JournalCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "journal",
        abstract: "Show what a durable source's journal holds: its pipeline and stage, its position, and what it would send again on a restart.",
        discussion: "FILE is <run dir>/state/<stage>.journal.sqlite (docs/delivery.md). The file is only read.")
    @Argument(help: "The journal file.") var file: String
    @Flag(help: "Print JSON.") var json = false

    func run() throws {
        let info: JournalInfo
        do { info = try JournalInfo.read(path: file) } catch { fail("\(error)") }
        if json {
            printJSON(.object([("file", .string(file)), ("pipeline", .string(info.pipeline)), ("stage", .string(info.stage)), ("kind", .string(info.kind)),
                               ("position", .string(info.positionText)), ("pending", .int(Int64(info.pending))),
                               ("attempts", info.attempts.map { .list([.int(Int64($0.lowerBound)), .int(Int64($0.upperBound))]) } ?? .null)]))
            return
        }
        print("journal \(file)")
        print("  pipeline \(info.pipeline), stage \(info.stage) (\(info.kind))")
        print("  position: \(info.positionText)")
        if info.pending == 0 {
            print("  unacknowledged: none (a run with this run directory goes on from the position; a finished source emits nothing more)")
        } else {
            let a = info.attempts.map { $0.lowerBound == $0.upperBound ? "attempt \($0.lowerBound)" : "attempts \($0.lowerBound)-\($0.upperBound)" } ?? "undecodable"
            print("  unacknowledged: \(info.pending) (\(a)); a run with this run directory sends them again first")
        }
    }
}
