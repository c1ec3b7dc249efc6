import Foundation
import Glibc
import Logging
import PipeKit
import PipeZMQ
import Synchronization

/// `pipehost worker --connect tcp://...`: a remote worker. It connects to the host (it never
/// binds), registers with a HELLO named `worker:NAME`, takes the roster of stages placed on it,
/// and runs each in a runner thread whose connections are all CURVE clients of the host.
/// When its stages end cleanly it exits 0 (a supervisor starts it again for the next run);
/// when they lose the host, it registers again.
public final class RemoteWorker {
    public struct Options: Sendable {
        public var endpoint: String
        /// This worker's key pair (nil: plaintext, `insecure`).
        public var keys: CurveKeyPair?
        /// The host's public key (nil: plaintext).
        public var serverKey: String?
        /// The name to ask for (required in plaintext; with CURVE the key names the worker).
        public var name: String
        public var runDirectory: String
        public var handshakeTimeoutSeconds: Double
        /// An authority grant (the file's bytes) presented at registration, or empty.
        public var grant: [UInt8] = []
        /// Stay up across runs: register again after the stages finish, and keep trying while
        /// the host cannot be reached, instead of exiting (a supervisor that backs off between
        /// restarts, like Kubernetes, would otherwise miss the next run).
        public var keepRunning = false
        public init(endpoint: String, keys: CurveKeyPair?, serverKey: String?, name: String, runDirectory: String, handshakeTimeoutSeconds: Double) {
            self.endpoint = endpoint; self.keys = keys; self.serverKey = serverKey; self.name = name
            self.runDirectory = runDirectory; self.handshakeTimeoutSeconds = handshakeTimeoutSeconds
        }
    }

    let options: Options
    let registry: StageRegistry
    var log = Logger(label: "pipehost.worker")

    public init(options: Options, registry: StageRegistry) { self.options = options; self.registry = registry }

    /// What registration answered: the worker's name and its stages.
    public struct Roster: Sendable { public var worker: String; public var stages: [String]; public var pipeline: String }

    /// Registers with the host (the HELLO, answered by a roster or a refusal); see ``CurveRequest``.
    public func register(context zmq: ZMQContext) throws(RuntimeError) -> Roster {
        let hello = Hello(pid: UInt32(getpid()), worker: "worker:" + options.name, grant: options.grant).encode(seq: 1)
        let req = CurveRequest(endpoint: options.endpoint, keys: options.keys, serverKey: options.serverKey,
                               timeoutSeconds: options.handshakeTimeoutSeconds, peer: "the host", refusedHint: "add its curve.pub to remote.workers")
        let reply = try req.send(parts: [hello], context: zmq)
        let roster: Result<Roster, RuntimeError> = reply.withBytes { raw in
            guard let f = try? FrameView(raw) else { return .failure(.protocolError("unreadable answer from the host")) }
            switch f.header.type {
            case .assign:
                guard let body = try? f.utf8Body(), let v = try? JSON.parse(body) else { return .failure(.protocolError("unreadable roster from the host")) }
                if let why = v["refused"]?.stringValue { return .failure(.io("the host at \(options.endpoint) refused this worker: \(why)")) }
                guard let w = v["worker"]?.stringValue else { return .failure(.protocolError("unreadable roster from the host")) }
                return .success(Roster(worker: w, stages: (v["stages"]?.listValue ?? []).compactMap(\.stringValue), pipeline: v["pipeline"]?.stringValue ?? ""))
            case .command:
                return .failure(.io("the host at \(options.endpoint) refused this worker (see its log and audit log: worker-refused)"))
            default:
                return .failure(.protocolError("unexpected \(f.header.type) from the host"))
            }
        }
        return try roster.get()
    }

    /// Runs the roster's stages, each in a runner thread; returns their exit statuses.
    public func runStages(_ roster: Roster, context zmq: ZMQContext) -> [Int32] {
        mkdir(options.runDirectory, 0o700)
        let results = Mutex<[Int32]>([])
        var threads: [Thread] = []
        let done = DispatchGroup()
        for stage in roster.stages {
            let runner = StageRunner(context: zmq, controlEndpoint: options.endpoint, stageID: stage, registry: registry,
                                     location: "remote:\(roster.worker):\(getpid())")
            runner.clientKeys = options.keys
            runner.serverKey = options.serverKey
            runner.localRunDirectory = options.runDirectory
            done.enter()
            let t = Thread {
                let rc = runner.run()
                // A runner the host aborted ended cleanly but did not finish its stage.
                results.withLock { $0.append(runner.abortedByHost && rc == 0 ? Self.aborted : rc) }
                done.leave()
            }
            t.name = "stage-\(stage)"
            t.stackSize = 8 << 20
            threads.append(t)
            t.start()
        }
        done.wait()
        return results.withLock { $0 }
    }

    /// Registers and runs until the stages end cleanly (0), or registration fails (2). With
    /// `keepRunning`, only a refusal of this worker (its key or grant) ends it (2): an absent
    /// host is tried again (2 s, doubling to 30 s), and a finished run is followed by the next.
    public func run() -> Int32 {
        let zmq: ZMQContext
        do { zmq = try ZMQContext(ioThreads: 1) } catch { log.error("cannot create a ZeroMQ context: \(error)"); return 2 }
        defer { zmq.terminate() }
        var retry: Double = 2
        while true {
            let roster: Roster
            do { roster = try register(context: zmq) } catch {
                guard options.keepRunning, !Self.isRefusal(error) else { log.error("\(error)"); return 2 }
                log.warning("\(error); trying again in \(Int(retry)) s")
                usleep(UInt32(retry * 1e6)); retry = min(30, retry * 2)
                continue
            }
            log.info("registered with \(options.endpoint) as worker '\(roster.worker)' of pipeline '\(roster.pipeline)'; stages: \(roster.stages.isEmpty ? "none" : roster.stages.joined(separator: ", "))")
            if roster.stages.isEmpty {
                log.warning("no stage is placed on worker '\(roster.worker)'; nothing to do")
                guard options.keepRunning else { return 0 }
                sleep(5); continue
            }
            let codes = runStages(roster, context: zmq)
            if codes.contains(Self.aborted) && codes.allSatisfy({ $0 == 0 || $0 == Self.aborted }) {
                log.warning("the host aborted the stages (its run failed or ended, or another worker with this key took them over)")
                guard options.keepRunning else { return 0 }
                // Not at once: two workers with one key would otherwise take the stages from each other for ever.
                log.info("registering again in \(Int(retry)) s")
                usleep(UInt32(retry * 1e6)); retry = min(30, retry * 2)
                continue
            }
            if codes.allSatisfy({ $0 == 0 }) {
                retry = 2
                log.info("stages finished")
                guard options.keepRunning else { return 0 }
                // The finished run's host is shutting down: give it time to go before asking again.
                log.info("waiting for the next run")
                sleep(2); continue
            }
            log.warning("a stage ended without a clean finish (the host went away or aborted); registering again")
            usleep(500_000)
        }
    }

    /// `runStages`' code for a runner the host aborted.
    static let aborted: Int32 = -1

    /// Whether registration failed because the host refused this worker (its key, its grant, its
    /// name): trying again cannot help. An absent or silent host is not a refusal.
    static func isRefusal(_ e: RuntimeError) -> Bool {
        guard case .io(let m) = e else { return false }
        return m.contains(" refused this key ") || m.contains(" refused this worker")
    }
}

/// One request over a CURVE (or plaintext) DEALER and its one-message answer, for clients that
/// connect to a CURVE server: worker registration and `pipehost send`. A refused key, a wrong
/// server key and an absent peer all end in a clear error: ZeroMQ drops what a failed CURVE
/// handshake would carry, so silence past the timeout is the signal, sharpened by the socket's
/// handshake events where they know more.
public struct CurveRequest: Sendable {
    public var endpoint: String
    public var keys: CurveKeyPair?
    public var serverKey: String?
    public var timeoutSeconds: Double
    /// How the peer is named in errors ("the host", "the peer"), and what to do about a refused key.
    public var peer: String
    public var refusedHint: String
    public init(endpoint: String, keys: CurveKeyPair?, serverKey: String?, timeoutSeconds: Double, peer: String, refusedHint: String) {
        self.endpoint = endpoint; self.keys = keys; self.serverKey = serverKey; self.timeoutSeconds = timeoutSeconds
        self.peer = peer; self.refusedHint = refusedHint
    }

    /// Sends `parts` and returns the last part of the answer.
    public func send(parts: [[UInt8]], context zmq: ZMQContext) throws(RuntimeError) -> ZMQMessage {
        do {
            let s = try zmq.socket(.dealer)
            defer { s.close() }
            try TCPLinks.prepare(s)
            let monEndpoint = "inproc://curve-request-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            try s.monitorHandshakes(monEndpoint)
            let mon = try zmq.socket(.pair)
            defer { s.stopMonitor(); mon.close() }
            try mon.connect(monEndpoint)
            if let k = keys, let sk = serverKey { try s.makeCurveClient(publicKey: k.publicKey, secretKey: k.secretKey, serverKey: sk) }
            try s.connect(endpoint)
            try s.send(parts: parts)
            let deadline = monotonicNs() + UInt64(timeoutSeconds * 1e9)
            var poller = ZMQPoller(); poller.add(s); poller.add(mon)
            var lastFailure: String?
            while monotonicNs() < deadline {
                _ = try poller.poll(timeoutMs: 100)
                while let ev = ZMQMonitorEvent.receive(from: mon) {
                    guard ev.isHandshakeFailure else { continue }
                    lastFailure = ev.reason
                    // The peer said no: retrying with the same key cannot help.
                    if ev.event == 0x4000 { throw RuntimeError.io("\(peer) at \(endpoint) refused this key (\(ev.reason)); \(refusedHint)") }
                }
                guard var msg = try s.receiveMessage(dontWait: true) else { continue }
                while msg.hasMore, let next = try s.receiveMessage() { msg = next }
                return msg
            }
            var m = "no answer from \(endpoint) within \(timeoutSeconds) s"
            if let f = lastFailure {
                m += ": \(f); " + (keys != nil ? "\(peer) dropped the CURVE handshake: is --server-key its curve.pub, and does it run CURVE (not insecure)?"
                                                : "\(peer) dropped a plaintext handshake: it probably expects CURVE (give --key and --server-key)")
            } else if keys != nil { m += ": \(peer) is not running or not reachable, or --server-key is not its key (a wrong server key makes ZeroMQ drop everything silently)" }
            else { m += ": \(peer) is not running or not reachable, or it expects CURVE (plaintext needs `insecure: true`)" }
            throw RuntimeError.io(m)
        } catch let e as RuntimeError { throw e } catch {
            throw RuntimeError.io("cannot reach \(endpoint): \(error)")
        }
    }
}
