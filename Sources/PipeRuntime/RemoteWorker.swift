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

    /// Registers with the host. A refused key, a wrong server key and an absent host all end in a
    /// clear error: ZeroMQ drops what a failed CURVE handshake would carry, so silence past the
    /// timeout is the signal, sharpened by the socket monitor where it knows more.
    public func register(context zmq: ZMQContext) throws(RuntimeError) -> Roster {
        do {
            let s = try zmq.socket(.dealer)
            defer { s.close() }
            try TCPLinks.prepare(s)
            let monEndpoint = "inproc://worker-monitor-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
            try s.monitorHandshakes(monEndpoint)
            let mon = try zmq.socket(.pair)
            defer { mon.close() }
            try mon.connect(monEndpoint)
            if let k = options.keys, let sk = options.serverKey { try s.makeCurveClient(publicKey: k.publicKey, secretKey: k.secretKey, serverKey: sk) }
            try s.connect(options.endpoint)
            try s.send(Hello(pid: UInt32(getpid()), worker: "worker:" + options.name, grant: options.grant).encode(seq: 1))
            let deadline = monotonicNs() + UInt64(options.handshakeTimeoutSeconds * 1e9)
            var poller = ZMQPoller(); poller.add(s); poller.add(mon)
            var lastFailure: String?
            while monotonicNs() < deadline {
                _ = try poller.poll(timeoutMs: 100)
                while let ev = ZMQMonitorEvent.receive(from: mon) {
                    if ev.isHandshakeFailure {
                        lastFailure = ev.reason
                        // The host said no: retrying with the same key cannot help.
                        if ev.event == 0x4000 { throw RuntimeError.io("the host at \(options.endpoint) refused this worker's key (\(ev.reason)); add its curve.pub to remote.workers") }
                    }
                }
                guard let msg = try s.receiveMessage(dontWait: true) else { continue }
                let roster: Result<Roster?, RuntimeError> = msg.withBytes { raw in
                    guard let f = try? FrameView(raw) else { return .failure(.protocolError("unreadable answer from the host")) }
                    switch f.header.type {
                    case .assign:
                        if let body = try? f.utf8Body(), let v = try? JSON.parse(body), let why = v["refused"]?.stringValue {
                            return .failure(.io("the host at \(options.endpoint) refused this worker: \(why)"))
                        }
                        guard let body = try? f.utf8Body(), let v = try? JSON.parse(body), let w = v["worker"]?.stringValue else {
                            return .failure(.protocolError("unreadable roster from the host"))
                        }
                        return .success(Roster(worker: w, stages: (v["stages"]?.listValue ?? []).compactMap(\.stringValue),
                                               pipeline: v["pipeline"]?.stringValue ?? ""))
                    case .command:
                        return .failure(.io("the host at \(options.endpoint) refused this worker (see its log and audit log: worker-refused)"))
                    default: return .success(nil)
                    }
                }
                switch roster {
                case .success(let r?): return r
                case .success(nil): continue
                case .failure(let e): throw e
                }
            }
            var m = "no answer from \(options.endpoint) within \(options.handshakeTimeoutSeconds) s"
            if let f = lastFailure {
                m += ": \(f); " + (options.keys != nil ? "the host dropped the CURVE handshake: is --server-key the host's curve.pub, and does the host run CURVE (not insecure)?"
                                                       : "the host dropped a plaintext handshake: it probably expects CURVE (give --key and --server-key)")
            } else if options.keys != nil { m += ": the host is not running or not reachable, or --server-key is not the host's key (a wrong server key makes ZeroMQ drop everything silently)" }
            else { m += ": the host is not running or not reachable, or it expects CURVE (plaintext workers need `insecure: true`)" }
            throw RuntimeError.io(m)
        } catch let e as RuntimeError { throw e } catch {
            throw RuntimeError.io("cannot reach \(options.endpoint): \(error)")
        }
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
                results.withLock { $0.append(rc) }
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

    /// Registers and runs until the stages end cleanly (0), or registration fails (2).
    public func run() -> Int32 {
        let zmq: ZMQContext
        do { zmq = try ZMQContext(ioThreads: 1) } catch { log.error("cannot create a ZeroMQ context: \(error)"); return 2 }
        defer { zmq.terminate() }
        while true {
            let roster: Roster
            do { roster = try register(context: zmq) } catch { log.error("\(error)"); return 2 }
            log.info("registered with \(options.endpoint) as worker '\(roster.worker)' of pipeline '\(roster.pipeline)'; stages: \(roster.stages.isEmpty ? "none" : roster.stages.joined(separator: ", "))")
            if roster.stages.isEmpty { log.warning("no stage is placed on worker '\(roster.worker)'; nothing to do"); return 0 }
            let codes = runStages(roster, context: zmq)
            if codes.allSatisfy({ $0 == 0 }) { log.info("stages finished"); return 0 }
            log.warning("a stage ended without a clean finish (the host went away or aborted); registering again")
            usleep(500_000)
        }
    }
}
