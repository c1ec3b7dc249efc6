import Foundation
import Glibc
import PipeConfig
import PipeKit
import PipeRegistry
import PipeRuntime
import PipeZMQ
import Synchronization

/// What stats, the metrics endpoint and an attached tap cost: the same in-process pipeline with
/// observability on (STATS every 100 ms, metrics scraped every 250 ms, a tap reader on the first
/// lane) and as far off as it goes (STATS every 10 s, no metrics, no tap), alternating runs.
enum ObservabilityBench {
    final class Flag: Sendable { let v = Atomic<Bool>(false) }

    static func yaml(_ n: Int, metrics: Bool) -> String {
        """
        pipeline: obs-bench
        \(metrics ? "metrics: { listen: 127.0.0.1:0 }" : "")
        stages:
          - { id: gen, kind: generator, config: { count: \(n), payload_size: 100, seed: 1 } }
          - { id: pass, kind: passthrough, inputs: [gen] }
          - { id: sink, kind: null-sink, inputs: [pass] }
        """
    }

    static func run(_ n: Int, on: Bool) throws -> (rate: Double, tapped: Int, scrapes: Int) {
        try run(n, stats: on, metrics: on, tap: on)
    }

    static func run(_ n: Int, stats: Bool, metrics: Bool, tap: Bool) throws -> (rate: Double, tapped: Int, scrapes: Int) {
        let (spec, diags) = PipelineLoader.load(text: yaml(n, metrics: metrics), file: "obs.yaml", registry: builtInStages)
        guard let spec, diags.isEmpty else { throw RuntimeError.plan(diags.map(\.description).joined(separator: "\n")) }
        let plan = try PipelinePlan.make(spec: spec, edges: PipelineValidator(spec: spec, registry: builtInStages).edges, registry: builtInStages)
        let dir = NSTemporaryDirectory() + "bench-obs-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        var options = HostOptions(runDirectory: dir)
        options.statsIntervalMs = stats ? 100 : 10_000
        let host = try PipelineHost(plan: plan, registry: builtInStages, options: options)
        let stop = Flag()
        let tapped = Atomic<Int>(0), scrapes = Atomic<Int>(0)
        var helpers: [Thread] = []
        if tap {
            let t = Thread {
                guard let ctx = try? ZMQContext(), let sub = try? ctx.socket(.sub) else { return }
                defer { sub.close(); ctx.terminate() }
                try? sub.setReceiveTimeout(ms: 100); try? sub.setLinger(ms: 0)
                while !FileManager.default.fileExists(atPath: dir + "/sock/gen.tap") && !stop.v.load(ordering: .relaxed) { usleep(1000) }
                try? sub.connect("ipc://\(dir)/sock/gen.tap")
                try? sub.subscribe([0, 0, 0, 1])
                while !stop.v.load(ordering: .relaxed) {
                    if let p = try? sub.receiveParts(), p.count == 2 { tapped.add(1, ordering: .relaxed) }
                }
            }
            helpers.append(t)
        }
        if metrics {
            let s = Thread {
                while !stop.v.load(ordering: .relaxed) {
                    if let addr = try? String(contentsOfFile: dir + "/metrics.addr", encoding: .utf8), scrape(addr.trimmingCharacters(in: .whitespacesAndNewlines)) {
                        scrapes.add(1, ordering: .relaxed)
                    }
                    usleep(250_000)
                }
            }
            helpers.append(s)
        }
        for h in helpers { h.start() }
        let summary = try host.run()
        stop.v.store(true, ordering: .relaxed)
        usleep(300_000)
        let received = summary.lanes.first { $0.to == "sink.in" }?.received ?? 0
        return (Double(received) / summary.elapsedSeconds, tapped.load(ordering: .relaxed), scrapes.load(ordering: .relaxed))
    }

    /// One HTTP GET of /metrics; true on a 200 with a body.
    static func scrape(_ addr: String) -> Bool {
        guard let colon = addr.lastIndex(of: ":"), let port = UInt16(addr[addr.index(after: colon)...]) else { return false }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET); sa.sin_port = port.bigEndian
        inet_pton(AF_INET, String(addr[..<colon]), &sa.sin_addr)
        let ok = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        guard ok == 0 else { return false }
        let req = Array("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".utf8)
        _ = req.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) }
        var buf = [UInt8](repeating: 0, count: 65536), total = [UInt8]()
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            total += buf[0..<n]
        }
        return total.starts(with: Array("HTTP/1.1 200".utf8)) && total.count > 1000
    }

    static func breakdown() throws {
        let n = 2_000_000
        for (name, s, m, tp) in [("stats", true, false, false), ("metrics", false, true, false), ("tap", false, false, true)] {
            var ratios: [Double] = []
            for _ in 0..<7 {
                let a = try run(n, stats: false, metrics: false, tap: false).rate
                ratios.append(try run(n, stats: s, metrics: m, tap: tp).rate / a)
            }
            print(name, ratios.sorted().map { String(format: "%.3f", $0) }.joined(separator: " "), String(format: "median %.3f", ratios.sorted()[3]))
        }
    }

    static func report(quick: Bool) throws {
        let n = quick ? 500_000 : 2_000_000
        let pairs = quick ? 5 : 21
        var off: [Double] = [], on: [Double] = [], ratios: [Double] = []
        var tapped = 0, scrapes = 0
        // Paired, alternating runs: this machine drifts by more than the effect between runs, so
        // each "on" run is compared with the "off" run just before it, and the median taken.
        for _ in 0..<pairs {
            let a = try run(n, on: false).rate
            let r = try run(n, on: true)
            off.append(a); on.append(r.rate); ratios.append(r.rate / a)
            tapped += r.tapped; scrapes += r.scrapes
        }
        func median(_ x: [Double]) -> Double { x.sorted()[x.count / 2] }
        print(String(format: "pipeline gen -> pass -> null-sink, in-process, %d envelopes, %d alternating pairs:", n, pairs))
        print(String(format: "  observability off (STATS every 10 s, no metrics, no tap): median %.2f M/s", median(off) / 1e6))
        print(String(format: "  on (STATS every 100 ms, /metrics scraped every 250 ms, tap reader on gen.out): median %.2f M/s  (%d tapped, %d scrapes)",
                     median(on) / 1e6, tapped, scrapes))
        print("  pair ratios on/off: " + ratios.sorted().map { String(format: "%.3f", $0) }.joined(separator: " "))
        print(String(format: "ratio on / off (median of pairs):  %.3f  (cost %.1f%%, target <= 5%%)", median(ratios), (1 - median(ratios)) * 100))
    }
}
