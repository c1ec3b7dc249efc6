import ArgumentParser
import Foundation
import Glibc
import PipeConfig
import PipeKit
import PipeRegistry
import PipeRuntime
import PipeSeal
import PipeZMQ

@main
struct PipeHostCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "pipehost",
        abstract: "Runs declarative stream-processing pipelines whose stages are connected by ZeroMQ lanes.",
        subcommands: [Run.self, Keygen.self, Seal.self, Send.self, Worker.self, GrantCmd.self])

    /// Without a subcommand: a usage error (exit 64 with the usage), not a silent help page.
    func run() throws { throw ValidationError("missing subcommand") }
}

/// Prints `message` to stderr and exits with `code`.
func die(_ message: String, code: Int32 = 1) -> Never {
    FileHandle.standardError.write(Data((message + "\n").utf8))
    exit(code)
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a pipeline file to completion (or until stopped), then print a summary.")

    @Argument(help: "The pipeline YAML file.") var file: String
    @Option(name: .customLong("run-dir"), help: "Run directory (control socket, audit and dead-letter files). Default: see docs/operations.md.")
    var runDir: String?
    @Option(name: .customLong("until-idle"), help: "Stop sources after this many seconds without lane activity.") var untilIdle: Double?
    @Option(name: .customLong("max-envelopes"), help: "Each source stops after emitting exactly this many envelopes.") var maxEnvelopes: UInt64?
    @Option(name: .customLong("summary-json"), help: "Also write the final summary as JSON to this file.") var summaryJSON: String?
    @Flag(name: .customLong("quiet"), help: "Do not print the summary table.") var quiet = false
    @Flag(name: .customLong("inproc-data-frames"),
          help: "Encode envelopes on in-process lanes as DATA frames, as between processes, instead of handing batches over by reference (slower; for comparison and diagnosis).")
    var inprocDataFrames = false

    func validate() throws {
        if let u = untilIdle, !(u > 0) { throw ValidationError("--until-idle must be a positive number of seconds") }
        if let m = maxEnvelopes, m == 0 { throw ValidationError("--max-envelopes must be at least 1") }
    }

    func run() throws {
        let (spec, diags) = PipelineLoader.load(path: file, registry: builtInStages)
        if !diags.isEmpty || spec == nil {
            for d in diags { FileHandle.standardError.write(Data((d.description + "\n").utf8)) }
            die("\(file): \(diags.count) problem(s); not started (`pipectl validate \(file)` lists them too)")
        }
        guard let spec else { return }
        let v = PipelineValidator(spec: spec, registry: builtInStages)
        let plan: PipelinePlan
        do { plan = try PipelinePlan.make(spec: spec, edges: v.edges, registry: builtInStages) } catch { die("\(file): \(error)") }
        let dir = RunDirectory.forPipeline(spec.name, explicit: runDir)
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        var options = HostOptions(runDirectory: dir, untilIdleSeconds: untilIdle, maxEnvelopes: maxEnvelopes,
                                  workerExecutable: ProcessInfo.processInfo.environment["PIPEHOST_WORKER_EXE"] ?? exe)
        options.inprocByReference = !inprocDataFrames
        let summary: RunSummary
        do {
            let host = try PipelineHost(plan: plan, registry: builtInStages, options: options)
            summary = try host.run()
        } catch { die("pipehost: \(error)") }
        if !quiet { print(SummaryFormatter.text(summary, runDir: dir)) }
        if let path = summaryJSON {
            do { try (JSON.serialize(SummaryFormatter.json(summary)) + "\n").write(toFile: path, atomically: true, encoding: .utf8) }
            catch { die("cannot write \(path): \(error.localizedDescription)") }
        }
        if let f = summary.failure { die("pipehost: \(f)") }
    }
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write an Ed25519 signing key pair and a CURVE key pair (files with mode 0600).",
        discussion: "Files: signing.key (hex secret), signing.pub (hex public), curve.key (Z85 secret), curve.pub (Z85 public).")
    @Option(name: .shortAndLong, help: "Directory to write the key files into (created if missing).") var output: String
    @Flag(help: "Overwrite existing key files.") var force = false

    func run() throws {
        do { try FileManager.default.createDirectory(atPath: output, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) }
        catch { die("cannot create \(output): \(error.localizedDescription)") }
        let names = ["signing.key", "signing.pub", "curve.key", "curve.pub"]
        if !force, let existing = names.first(where: { FileManager.default.fileExists(atPath: output + "/" + $0) }) {
            die("\(output)/\(existing) exists; pass --force to overwrite", code: 1)
        }
        do {
            let sk = try SigningKey.generate()
            let curve = try ZMQCurve.keyPair()
            try KeyFiles.writeSecret(KeyFiles.hex(of: sk), to: output + "/signing.key")
            try KeyFiles.writeSecret(Hex.encode(sk.publicKey), to: output + "/signing.pub")
            try KeyFiles.writeSecret(curve.secretKey, to: output + "/curve.key")
            try KeyFiles.writeSecret(curve.publicKey, to: output + "/curve.pub")
            print("wrote \(names.map { output + "/" + $0 }.joined(separator: ", ")) (mode 0600); key id \(Hex.encode(sk.keyID))")
        } catch { die("keygen: \(error)") }
    }
}

struct Seal: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pack a file or a directory into a sealed container signed with an Ed25519 key (docs/sealed-container.md).")
    @Argument(help: "The file or directory to seal (regular files only; symlinks are refused).") var path: String
    @Option(help: "The signing key file (signing.key from `pipehost keygen`).") var key: String
    @Option(name: .shortAndLong, help: "The container file to write.") var output: String
    @Option(help: "The surface name (default: the output's file name).") var surface: String?
    @Option(help: "The surface profile.") var profile = "continuity"
    @Flag(help: "Overwrite an existing output file.") var force = false

    func run() throws {
        do {
            let k = try KeyFiles.loadSigningKey(key)
            let files = try SealedContainer.collect(path: path)
            let name = surface ?? (output as NSString).lastPathComponent
            let bytes = try SealedContainer.seal(files: files, surfaceName: name, profile: profile, key: k,
                                                 createdNs: UInt64(Date().timeIntervalSince1970 * 1e9))
            if !force && FileManager.default.fileExists(atPath: output) { die("\(output) exists; pass --force to overwrite") }
            guard FileManager.default.createFile(atPath: output, contents: Data(bytes)) else { die("cannot write \(output)") }
            print("sealed \(files.count) file(s), \(files.reduce(0) { $0 + $1.data.count }) bytes, into \(output) (\(bytes.count) bytes; surface \(name), profile \(profile), key id \(Hex.encode(k.keyID)))")
        } catch { die("pipehost seal: \(error)") }
    }
}

struct Send: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Seal a file or directory and deliver it over CURVE to a peer host's zmq-inbox (docs/intake.md, \"Sealed send\").",
        discussion: "Exit 0 when the peer stored it, 1 when it refused the container (the reason is printed), 2 when it could not be reached or refused this key.")
    @Argument(help: "The file or directory to seal and send.") var path: String
    @Option(help: "The peer's zmq-inbox endpoint, tcp://HOST:PORT.") var to: String
    @Option(help: "A `pipehost keygen` directory: signing.key seals, curve.key authenticates.") var key: String
    @Option(name: .customLong("server-key"), help: "The peer's CURVE public key: its curve.pub or the Z85 text.") var serverKey: String
    @Option(help: "The name to deliver under, which is also the container's surface name (default: PATH's name + .tza).") var name: String?
    @Option(help: "The surface profile.") var profile = "continuity"
    @Option(help: "Seconds to wait for the peer's answer.") var timeout: Double = 10

    func validate() throws {
        guard to.hasPrefix("tcp://") else { throw ValidationError("--to must be tcp://HOST:PORT") }
        if let n = name, n.isEmpty || n.contains("/") || n.hasPrefix(".") { throw ValidationError("--name must be a plain file name") }
        if !(timeout > 0) { throw ValidationError("--timeout must be a positive number of seconds") }
    }

    func run() throws {
        let sent: (String, Int)
        do {
            let signing = try KeyFiles.loadSigningKey(key + "/signing.key")
            let curve = try CurveKeys.loadSecret(key + "/curve.key")
            let server = try CurveKeys.loadPublic(serverKey, base: FileManager.default.currentDirectoryPath)
            let files = try SealedContainer.collect(path: path)
            let n = name ?? ((path as NSString).standardizingPath as NSString).lastPathComponent + ".tza"
            let bytes = try SealedContainer.seal(files: files, surfaceName: n, profile: profile, key: signing,
                                                 createdNs: UInt64(Date().timeIntervalSince1970 * 1e9))
            let ctx = try ZMQContext()
            defer { ctx.terminate() }
            let req = CurveRequest(endpoint: to, keys: curve, serverKey: server, timeoutSeconds: timeout, peer: "the peer",
                                   refusedHint: "the peer must list this curve.pub in its zmq-inbox senders")
            let answer = String(decoding: try req.send(parts: [Array(n.utf8), bytes], context: ctx).bytes, as: UTF8.self)
            if answer.hasPrefix("refused: ") { die("pipehost send: \(to) refused \(n): \(answer.dropFirst(9))", code: 1) }
            guard answer.hasPrefix("ok ") else { die("pipehost send: unexpected answer from \(to): \(answer.prefix(200))", code: 1) }
            sent = (String(answer.dropFirst(3)), bytes.count)
        } catch let e as RuntimeError { die("pipehost send: \(e)", code: 2) } catch { die("pipehost send: \(error)", code: 2) }
        print("sent \(path) sealed (\(sent.1) bytes) to \(to); stored as \(sent.0)")
    }
}

struct Worker: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run stages as a worker: a remote worker that connects in over tcp, or (internal) a child worker the host spawns.",
        discussion: """
            Remote: pipehost worker --connect tcp://HOST:PORT --key worker/curve.key --server-key host/curve.pub
            The worker registers, runs the stages the pipeline places on it (placement: { worker: NAME },
            NAME being the name its public key has in remote.workers), and exits 0 when they finish.
            Start it from a supervisor (deploy/pipehost-worker.service, deploy/k8s-worker.yaml).
            Child: the host runs `pipehost worker --connect ipc://... --stage ID` for placement: process.
            """)
    @Option(help: "The host's endpoint: tcp://HOST:PORT (remote.listen) or, for a child worker, ipc://...") var connect: String
    @Option(help: "(child workers) The stage id to ask for.") var stage: String?
    @Option(help: "This worker's CURVE secret key file (curve.key from `pipehost keygen`).") var key: String?
    @Option(name: .customLong("server-key"), help: "The host's CURVE public key: a curve.pub file or the Z85 key.") var serverKey: String?
    @Option(help: "The worker name to ask for (needed with --insecure; with CURVE the key names the worker).") var name: String?
    @Flag(help: "Plaintext tcp without authentication (only against a pipeline with remote.insecure: true).") var insecure = false
    @Option(name: .customLong("run-dir"), help: "Local directory for the stages' state (default /tmp/pipehost-worker-<uid>).") var runDir: String?
    @Option(name: .customLong("handshake-timeout"), help: "Seconds to wait for the host's answer before giving up (exit 2).") var handshakeTimeout: Double = 10
    @Option(help: "An authority grant file (`pipehost grant issue`), presented when registering.") var grant: String?
    @Flag(name: .customLong("keep-running"), help: "Stay up across runs: register again when the stages finish, and keep trying while the host cannot be reached (2 s, doubling to 30 s); only a refusal of this worker's key or grant exits (2). For supervisors that back off between restarts (Kubernetes).")
    var keepRunning = false

    func validate() throws {
        if connect.hasPrefix("tcp://") {
            if stage != nil { throw ValidationError("--stage is for child workers; a remote worker is told its stages by the host") }
            if grant != nil && insecure { throw ValidationError("--grant needs CURVE: the host checks it against the connection's key") }
            if insecure {
                if key != nil || serverKey != nil { throw ValidationError("--insecure takes no --key or --server-key") }
                guard let n = name, isValidName(n) else { throw ValidationError("--insecure needs --name NAME ([a-z0-9_-]+): without a key nothing else names the worker") }
            } else if key == nil || serverKey == nil {
                throw ValidationError("a tcp worker needs --key (its curve.key) and --server-key (the host's curve.pub), or --insecure --name NAME")
            }
            if let n = name, !isValidName(n) { throw ValidationError("--name must match [a-z0-9_-]+") }
            if !(handshakeTimeout > 0) { throw ValidationError("--handshake-timeout must be a positive number of seconds") }
        } else if connect.hasPrefix("ipc://") || connect.hasPrefix("inproc://") {
            if stage == nil { throw ValidationError("--stage is required with an ipc:// endpoint") }
            if keepRunning { throw ValidationError("--keep-running is for remote workers (tcp://); a child worker lives as long as its host") }
        } else {
            throw ValidationError("--connect must be tcp://HOST:PORT (a remote worker) or ipc://PATH (a child worker)")
        }
    }

    func run() throws {
        if connect.hasPrefix("tcp://") { runRemote() }
        // The host drains us in order, so ignore the terminal's Ctrl-C; the runner exits when the
        // host goes away (reparented, or silent for 15 s).
        signal(SIGINT, SIG_IGN)
        let ctx: ZMQContext
        do { ctx = try ZMQContext() } catch { die("worker: \(error)") }
        let runner = StageRunner(context: ctx, controlEndpoint: connect, stageID: stage ?? "", registry: builtInStages,
                                 location: "worker:\(getpid())", parentPid: getppid())
        let rc = runner.run()
        ctx.terminate()
        Glibc.exit(rc)
    }

    func runRemote() -> Never {
        var keys: CurveKeyPair?
        var server: String?
        if !insecure, let k = key, let sk = serverKey {
            do {
                keys = try CurveKeys.loadSecret(k)
                server = try CurveKeys.loadPublic(sk, base: FileManager.default.currentDirectoryPath)
            } catch { die("pipehost worker: \(error)", code: 2) }
        }
        var opts = RemoteWorker.Options(endpoint: connect, keys: keys, serverKey: server, name: name ?? "",
                                        runDirectory: runDir ?? "/tmp/pipehost-worker-\(getuid())", handshakeTimeoutSeconds: handshakeTimeout)
        opts.keepRunning = keepRunning
        if let g = grant {
            guard let bytes = FileManager.default.contents(atPath: g) else { die("pipehost worker: cannot read the grant \(g)", code: 2) }
            do { _ = try Grant.parse(Array(bytes)) } catch { die("pipehost worker: \(g): \(error)", code: 2) }
            opts.grant = Array(bytes)
        }
        Glibc.exit(RemoteWorker(options: opts, registry: builtInStages).run())
    }
}

struct GrantCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "grant", abstract: "Authority grants for remote workers (docs/operations.md, \"Grants\").",
        subcommands: [Issue.self])

    struct Issue: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Sign a grant: the worker with this CURVE key may run exactly these stages, under this name, until a time, at an epoch.",
            discussion: "A revocation is a grant of a higher epoch with --stages \"\" (no stages); give it to the host with `pipectl grant apply FILE`.")
        @Option(name: .customLong("owner-key"), help: "The owner's signing key (signing.key from `pipehost keygen`).") var ownerKey: String
        @Option(help: "The worker's CURVE public key: its curve.pub file or the Z85 text.") var worker: String
        @Option(help: "The worker name the grant admits (remote.workers in the pipeline).") var name: String
        @Option(help: "Comma-separated stage ids; empty revokes.") var stages: String
        @Option(help: "Expiry: RFC 3339 (2027-01-31T00:00:00Z) or a duration from now (90s, 30m, 12h, 30d).") var expires: String
        @Option(help: "The grant's epoch (a non-negative integer; higher replaces lower).") var epoch: UInt64
        @Option(name: .shortAndLong, help: "Write the grant here (default: stdout).") var output: String?

        func validate() throws {
            guard isValidName(name) else { throw ValidationError("--name must match [a-z0-9_-]+") }
            for s in stages.split(separator: ",") where !isValidName(String(s)) { throw ValidationError("--stages: '\(s)' is not a stage id") }
            guard Issue.expiry(expires, now: 0) != nil else { throw ValidationError("--expires must be RFC 3339 or a duration like 90s, 30m, 12h, 30d") }
        }

        static func expiry(_ s: String, now: Int64) -> Int64? {
            if let ns = try? RFC3339.parse(s) { return ns / 1_000_000_000 }
            let units: [Character: Int64] = ["s": 1, "m": 60, "h": 3600, "d": 86_400]
            guard let u = s.last.flatMap({ units[$0] }), let n = Int64(s.dropLast()), n > 0, n < 100 * 365 * 86_400 / u else { return nil }
            return now + n * u
        }

        func run() throws {
            do {
                let owner = try KeyFiles.loadSigningKey(ownerKey)
                let key = try CurveKeys.loadPublic(worker, base: FileManager.default.currentDirectoryPath)
                guard let exp = Issue.expiry(expires, now: Int64(Date().timeIntervalSince1970)) else { die("--expires: unreadable") }
                let g = Grant.issue(owner: owner, worker: key, name: name, stages: stages.split(separator: ",").map(String.init),
                                    expires: exp, epoch: epoch)
                if let o = output {
                    guard FileManager.default.createFile(atPath: o, contents: Data(g.text.utf8)) else { die("cannot write \(o)") }
                    FileHandle.standardError.write(Data("wrote \(o): \(g.isRevocation ? "revocation" : "stages \(g.stages.joined(separator: ","))") for worker '\(name)' (key \(key.prefix(12))...), epoch \(epoch), expires \(RFC3339.format(ns: exp * 1_000_000_000)), owner key id \(Hex.encode(owner.keyID))\n".utf8))
                } else {
                    print(g.text, terminator: "")
                }
            } catch { die("pipehost grant issue: \(error)") }
        }
    }
}
