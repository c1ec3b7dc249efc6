import ArgumentParser
import Foundation
import PipeConfig
import PipeKit
import PipeRegistry
import PipeRuntime

@main
struct PipeCtl: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pipectl",
        abstract: "Inspect pipeline files and running pipehost instances.",
        discussion: "Offline: validate, stages. Against a running host: lanes, status (found by the rule in docs/operations.md, or --run-dir/--control).",
        subcommands: [Validate.self, Stages.self, Lanes.self, Status.self])
}

func fail(_ message: String, code: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data((message + "\n").utf8))
    exit(code)
}

func printJSON(_ v: ConfigValue) { print(JSON.serialize(v)) }

/// How pipectl finds a running host.
struct HostOptions: ParsableArguments {
    @Option(name: .customLong("run-dir"), help: "The host's run directory (holds control.sock).") var runDir: String?
    @Option(name: .customLong("control"), help: "The control endpoint, e.g. ipc:///tmp/pipehost-0/hello/control.sock.") var control: String?

    func endpoint() -> String {
        if let c = control { return c }
        if let d = runDir { return RunDirectory.controlEndpoint(RunDirectory.absolute(d)) }
        if let e = ProcessInfo.processInfo.environment["PIPEHOST_RUN_DIR"], !e.isEmpty { return RunDirectory.controlEndpoint(RunDirectory.absolute(e)) }
        let live = RunDirectory.live()
        if live.count == 1 { return RunDirectory.controlEndpoint(live[0]) }
        if live.isEmpty {
            fail("pipectl: no running pipehost found under \(RunDirectory.base) (start one with `pipehost run FILE`, or pass --run-dir DIR / --control ENDPOINT)")
        }
        fail("pipectl: several pipehosts are running; choose one with --run-dir:\n" + live.map { "  --run-dir \($0)" }.joined(separator: "\n"))
    }

    func call(_ cmd: String) -> ConfigValue {
        do { return try ControlClient(endpoint: endpoint()).call(cmd) } catch { fail("pipectl: \(error)") }
    }
}

struct Validate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Check pipeline files; print every problem as file:line:column: message. Exit 0 valid, 1 invalid.")
    @Argument(help: "Pipeline YAML files.") var files: [String]
    @Flag(help: "Print the diagnostics as JSON.") var json = false

    func validate() throws { if files.isEmpty { throw ValidationError("give at least one pipeline file") } }

    func run() throws {
        var bad = 0
        var out: [ConfigValue] = []
        for file in files {
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

struct Lanes: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Every lane of a running host: from -> to, transport, bound, sent, received, depth, credits.")
    @OptionGroup var host: HostOptions
    @Flag(help: "Print as JSON.") var json = false

    func run() throws {
        let v = host.call("lanes")
        if json { printJSON(v); return }
        let rows = (v.listValue ?? []).map { l -> [String] in
            func s(_ k: String) -> String {
                switch l[k] { case .string(let x)?: return x; case .int(let i)?: return String(i); case .double(let d)?: return String(format: "%.1f", d); case .bool(let b)?: return b ? "yes" : "no"; default: return "-" }
            }
            return [s("id"), s("from"), s("to") + (l["loop_back"]?.boolValue == true ? " (loop)" : ""), s("transport"), s("bound"), s("when_full"),
                    s("sent"), s("received"), s("depth"), s("queued"), s("credits"), s("eos"), s("blocked_ms")]
        }
        print(SummaryFormatter.table(["lane", "from", "to", "transport", "bound", "when_full", "sent", "received", "depth", "queued", "credits", "eos", "blocked ms"], rows))
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "The running host's status and each stage's status report.")
    @OptionGroup var host: HostOptions
    @Flag(help: "Print as JSON.") var json = false

    func run() throws {
        let v = host.call("status")
        if json { printJSON(v); return }
        let h = v["host"] ?? .null
        print("pipeline \(h["pipeline"]?.stringValue ?? "?") (\(h["file"]?.stringValue ?? "")) pid \(h["pid"]?.intValue ?? 0): \(h["state"]?.stringValue ?? "?"), up \(String(format: "%.1f", h["uptime_s"]?.doubleValue ?? 0)) s, run dir \(h["run_dir"]?.stringValue ?? "")")
        let stages = v["stages"]?.listValue ?? []
        let rows = stages.map { s -> [String] in
            [s["id"]?.stringValue ?? "", s["kind"]?.stringValue ?? "", s["placement"]?.stringValue ?? "", s["pid"]?.intValue.map { String($0) } ?? "-",
             s["state"]?.stringValue ?? "", String(s["received"]?.intValue ?? 0), String(s["emitted"]?.intValue ?? 0),
             String(s["dead_lettered"]?.intValue ?? 0), String(s["errors"]?.intValue ?? 0), String(s["restarts"]?.intValue ?? 0)]
        }
        print(SummaryFormatter.table(["stage", "kind", "placement", "pid", "state", "in", "out", "dead", "errors", "restarts"], rows))
        // Each stage's own report, one figure per line (a twin stage lists its devices here).
        for s in stages {
            let entries = s["status"]?.mapEntries ?? []
            if entries.isEmpty { continue }
            print("\n\(s["id"]?.stringValue ?? "") (\(s["kind"]?.stringValue ?? ""))")
            let width = entries.map(\.key.count).max() ?? 0
            for e in entries {
                let value = e.value.stringValue ?? JSON.serialize(e.value)
                print("  " + e.key.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + value)
            }
        }
    }
}
