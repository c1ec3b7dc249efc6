import Foundation
import Glibc
import PipeRuntime
import PipeZMQ

/// Remote workers (issue 6): generator -> passthrough -> null-sink with the passthrough on a
/// `pipehost worker` process that connects in over tcp, with CURVE and in plaintext
/// (`insecure: true`), next to all three stages in-process, runs interleaved in the same run.
enum RemoteBench {
    static func chain(count: Int, remote: String?) -> String {
        """
        pipeline: bench-remote
        \(remote ?? "")
        stages:
          - { id: gen, kind: generator, config: { count: \(count), payload_size: 100, seed: 1 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: \(remote == nil ? "in-process" : "{ worker: edge }") }
          - { id: sink, kind: null-sink, inputs: [pass] }
        """
    }

    /// generator -> pass -> pass2 -> null-sink with both passes on worker `edge`: the lane
    /// between them has no end in the host, so the host relays it.
    static func relayedChain(count: Int, remote: String) -> String {
        """
        pipeline: bench-remote
        \(remote)
        stages:
          - { id: gen, kind: generator, config: { count: \(count), payload_size: 100, seed: 1 } }
          - { id: pass, kind: passthrough, inputs: [gen], placement: { worker: edge } }
          - { id: pass2, kind: passthrough, inputs: [pass], placement: { worker: edge } }
          - { id: sink, kind: null-sink, inputs: [pass2] }
        """
    }

    static func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }

    /// CPU seconds (user + system) used so far by this process, or by its reaped children.
    static func cpuSeconds(_ who: Int32) -> Double {
        var u = rusage()
        getrusage(who, &u)
        func s(_ t: timeval) -> Double { Double(t.tv_sec) + Double(t.tv_usec) / 1e6 }
        return s(u.ru_utime) + s(u.ru_stime)
    }

    /// Runs the pipeline with a worker process started just before the host (it waits for the
    /// host): the rate at the sink, and the CPU time host and worker spent per envelope (the
    /// host runs in this process; the worker is a reaped child), which unlike the rate does not
    /// depend on how well the stages overlap on a shared machine.
    static func runWithWorker(_ yaml: String, name: String, endpoint: String, workerArgs: [String], count: Int) throws -> (rate: Double, cpuUs: Double) {
        let exeDir = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]).deletingLastPathComponent().path
        let w = Process()
        w.executableURL = URL(fileURLWithPath: exeDir + "/pipehost")
        w.arguments = ["worker", "--connect", endpoint, "--run-dir", NSTemporaryDirectory() + "bench-remote-worker-\(getpid())", "--handshake-timeout", "30"] + workerArgs
        w.standardOutput = FileHandle.nullDevice; w.standardError = FileHandle.nullDevice
        let self0 = cpuSeconds(RUSAGE_SELF.rawValue), children0 = cpuSeconds(RUSAGE_CHILDREN.rawValue)
        try w.run()
        let rate: Double
        do { rate = try runPipeline(yaml, name: name).rate } catch {
            if w.isRunning { kill(w.processIdentifier, SIGKILL) }
            w.waitUntilExit()
            throw error
        }
        let host = cpuSeconds(RUSAGE_SELF.rawValue) - self0
        // The worker exits by itself once the host finished; give it a moment, then stop it.
        let deadline = Date().addingTimeInterval(10)
        while w.isRunning && Date() < deadline { usleep(10_000) }
        if w.isRunning { kill(w.processIdentifier, SIGKILL) }
        w.waitUntilExit()
        let worker = cpuSeconds(RUSAGE_CHILDREN.rawValue) - children0
        return (rate, (host + worker) / Double(count) * 1e6)
    }

    static func report(quick: Bool) throws {
        let n = quick ? 300_000 : 1_000_000
        print("remote bench: \(n) envelopes of 100 bytes per run, \(ProcessInfo.processInfo.activeProcessorCount) cores, libzmq \(ZMQContext.version) (curve: \(ZMQContext.has("curve")))")
        let dir = NSTemporaryDirectory() + "bench-remote-keys-\(getpid())"
        mkdir(dir, 0o700)
        let host = try ZMQCurve.keyPair(), edge = try ZMQCurve.keyPair()
        for (file, text) in [("host.key", host.secretKey), ("edge.key", edge.secretKey), ("host.pub", host.publicKey)] {
            let path = dir + "/" + file
            unlink(path)
            let fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0o600)
            _ = Array((text + "\n").utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            close(fd)
        }
        var inproc: [Double] = [], plain: [Double] = [], curve: [Double] = [], ratios: [Double] = [], relayed: [Double] = []
        var plainCPU: [Double] = [], curveCPU: [Double] = []
        for _ in 0..<(quick ? 3 : 7) {
            let port = try reserveTCPPort(host: "127.0.0.1")
            let ep = "tcp://127.0.0.1:\(port)"
            inproc.append(try runPipeline(chain(count: n, remote: nil), name: "rm-inproc").rate)
            let plainYAML = chain(count: n, remote: "remote: { listen: \"\(ep)\", insecure: true, workers: { edge: { key: \"\(edge.publicKey)\" } } }")
            let p = try runWithWorker(plainYAML, name: "rm-plain", endpoint: ep, workerArgs: ["--insecure", "--name", "edge"], count: n)
            let port2 = try reserveTCPPort(host: "127.0.0.1")
            let ep2 = "tcp://127.0.0.1:\(port2)"
            let curveYAML = chain(count: n, remote: "remote: { listen: \"\(ep2)\", key: \"\(dir)/host.key\", workers: { edge: { key: \"\(edge.publicKey)\" } } }")
            let c = try runWithWorker(curveYAML, name: "rm-curve", endpoint: ep2, workerArgs: ["--key", dir + "/edge.key", "--server-key", dir + "/host.pub"], count: n)
            plain.append(p.rate); curve.append(c.rate); ratios.append(c.rate / p.rate)
            plainCPU.append(p.cpuUs); curveCPU.append(c.cpuUs)
            let port3 = try reserveTCPPort(host: "127.0.0.1")
            let ep3 = "tcp://127.0.0.1:\(port3)"
            let relayYAML = relayedChain(count: n, remote: "remote: { listen: \"\(ep3)\", key: \"\(dir)/host.key\", workers: { edge: { key: \"\(edge.publicKey)\" } } }")
            relayed.append(try runWithWorker(relayYAML, name: "rm-relay", endpoint: ep3, workerArgs: ["--key", dir + "/edge.key", "--server-key", dir + "/host.pub"], count: n).rate)
        }
        print("pipeline generator -> passthrough -> null-sink, in-process:       \(fmt(median(inproc)))")
        print("same, passthrough on a remote worker, plaintext tcp (loopback):   \(fmt(median(plain)))")
        print("same, passthrough on a remote worker, CURVE tcp (loopback):       \(fmt(median(curve)))  (pair ratios \(ratios.map { String(format: "%.2f", $0) }.joined(separator: " ")))")
        print("4 stages, both passthroughs on the worker, CURVE (the lane between them relayed by the host): \(fmt(median(relayed)))")
        print("")
        print(String(format: "ratio CURVE / plaintext tcp:  %.2f x  (cost %.0f%%, median of %d pairs; target: cost <= 30%%)", median(ratios), (1 - median(ratios)) * 100, ratios.count))
        print(String(format: "ratio CURVE / in-process:     %.2f x", median(curve) / median(inproc)))
        let pc = median(plainCPU), cc = median(curveCPU)
        print(String(format: "CPU per envelope, host + worker (medians): plaintext %.2f us, CURVE %.2f us: CURVE adds %.2f us (%.0f%% more CPU; plaintext/CURVE %.2f, the rate ratio a CPU-bound run would show)",
                     pc, cc, cc - pc, (cc / pc - 1) * 100, pc / cc))
    }
}
