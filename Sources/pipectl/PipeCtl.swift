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
        discussion: "Offline: validate, test, stages, schema, graph FILE, unseal. Against a running host: top, lanes, status, workers, tap, graph (found by the rule in docs/operations.md, or --run-dir/--control).",
        subcommands: [Validate.self, TestCmd.self, Stages.self, Schema.self, Graph.self, Lanes.self, Status.self, Workers.self, GrantCmd.self, Top.self, Tap.self, Unseal.self, Audit.self, Trace.self, JournalCmd.self, ReceiptsCmd.self, EventsCmd.self])

    /// Without a subcommand: a usage error (exit 64 with the usage), not a silent help page.
    func run() throws { throw ValidationError("missing subcommand") }
}

func fail(_ message: String, code: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data((message + "\n").utf8))
    exit(code)
}

func printJSON(_ v: ConfigValue) { print(JSON.serialize(v)) }

/// How pipectl finds a running host.
struct HostOptions: ParsableArguments {
    @Option(name: .customLong("run-dir"), help: "The host's run directory (holds control.sock).") var runDir: String?
    @Option(name: .customLong("control"), help: "The control endpoint, e.g. ipc:///tmp/pipehost-0/hello/control.sock, or a host's remote.control tcp://HOST:PORT.") var control: String?
    @Option(name: .customLong("key"), help: "With a tcp:// --control: this operator's CURVE secret key (curve.key), listed in the host's remote.operators.") var key: String?
    @Option(name: .customLong("server-key"), help: "With a tcp:// --control: the host's CURVE public key (its curve.pub or the Z85 text).") var serverKey: String?

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

    /// A client for the chosen endpoint; over tcp with this operator's CURVE keys.
    func client() -> ControlClient {
        let e = endpoint()
        do {
            if e.hasPrefix("tcp://") {
                guard let k = key, let sk = serverKey else {
                    fail("pipectl: a tcp:// --control needs --key (this operator's curve.key) and --server-key (the host's curve.pub)")
                }
                return try ControlClient(endpoint: e, keys: try CurveKeys.loadSecret(k),
                                         serverKey: try CurveKeys.loadPublic(sk, base: FileManager.default.currentDirectoryPath))
            }
            return try ControlClient(endpoint: e)
        } catch { fail("pipectl: \(error)") }
    }

    func call(_ cmd: String, args: ConfigValue = .map([])) -> ConfigValue {
        do { return try client().call(cmd, args: args) } catch { fail("pipectl: \(error)") }
    }
}

