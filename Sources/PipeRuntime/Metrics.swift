import Foundation
import Glibc
import PipeConfig
import PipeKit
import Synchronization

/// Prometheus text exposition (format 0.0.4) of a host's stages and lanes. Rendered by the host
/// thread from its own state; served by `MetricsServer` from the latest rendering.
enum MetricsText {
    static func escape(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"").replacingOccurrences(of: "\n", with: "\\n")
    }
    static func labels(_ pairs: [(String, String)]) -> String {
        "{" + pairs.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") + "}"
    }
    static func number(_ d: Double) -> String {
        if d.isNaN { return "NaN" }
        if d.isInfinite { return d > 0 ? "+Inf" : "-Inf" }
        if d == d.rounded(), abs(d) < 1e15 { return String(Int64(d)) }
        return String(d)
    }

    struct Writer {
        var out = ""
        var declared: Set<String> = []
        mutating func family(_ name: String, _ type: String, _ help: String) {
            guard declared.insert(name).inserted else { return }
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        mutating func sample(_ name: String, _ labels: [(String, String)], _ value: Double) {
            out += name + (labels.isEmpty ? "" : MetricsText.labels(labels)) + " " + MetricsText.number(value) + "\n"
        }
        mutating func histogram(_ name: String, _ labels: [(String, String)], _ h: DurationHistogram) {
            var cumulative: UInt64 = 0
            for i in 0..<DurationHistogram.bucketCount {
                cumulative &+= i < h.counts.count ? h.counts[i] : 0
                let le = DurationHistogram.upperBound(i)
                sample(name + "_bucket", labels + [("le", le.isInfinite ? "+Inf" : String(le))], Double(cumulative))
            }
            sample(name + "_sum", labels, Double(h.sumNs) / 1e9)
            sample(name + "_count", labels, Double(cumulative))
        }
    }
}

extension PipelineHost {
    /// The exposition of everything the host knows now.
    func renderMetrics() -> String {
        var w = MetricsText.Writer()
        let p = ("pipeline", plan.spec.name)
        w.family("pipehost_up", "gauge", "1 while the host runs.")
        w.sample("pipehost_up", [p], 1)
        w.family("pipehost_uptime_seconds", "gauge", "Seconds since the host started its stages.")
        w.sample("pipehost_uptime_seconds", [p], Double(monotonicNs() - startNs) / 1e9)
        w.family("pipehost_audit_records_total", "counter", "Audit records written to the run's audit log.")
        w.sample("pipehost_audit_records_total", [p], Double(auditCount))
        if let rm = remote {
            // Remote workers: whether each has every stage placed on it reporting, and what was refused.
            let now = monotonicNs()
            w.family("pipehost_worker_up", "gauge", "1 while every stage placed on the remote worker reports, else 0.")
            for name in rm.workers.keys.sorted() {
                let placed = plan.stages.filter { $0.placement.workerName == name }.map(\.id)
                let up = !placed.isEmpty && placed.allSatisfy { rm.routes[$0] != nil && !remoteDown($0, now: now) }
                w.sample("pipehost_worker_up", [p, ("worker", name)], up ? 1 : 0)
            }
            w.family("pipehost_remote_refused_total", "counter", "Connections, registrations and frames the remote endpoint refused.")
            w.sample("pipehost_remote_refused_total", [p], Double(rm.refused))
            w.family("pipehost_remote_handshake_failures_total", "counter", "Failed CURVE handshakes on the registration endpoint.")
            w.sample("pipehost_remote_handshake_failures_total", [p], Double(rm.handshakeFailures))
        }
        let families: [(String, String, String, (StageState) -> Double)] = [
            ("pipehost_stage_received_total", "counter", "Envelopes a stage took from its input lanes.", { Double($0.stats?.received ?? 0) }),
            ("pipehost_stage_emitted_total", "counter", "Envelopes a stage emitted (dead letters excluded).", { Double($0.stats?.emitted ?? 0) }),
            ("pipehost_stage_dead_lettered_total", "counter", "Envelopes a stage sent to dead_letter.", { Double($0.stats?.deadLettered ?? 0) }),
            ("pipehost_stage_errors_total", "counter", "Stage errors (failed envelopes, malformed frames).", { Double($0.stats?.errors ?? 0) }),
            ("pipehost_stage_restarts_total", "counter", "Restarts of the stage's worker process.", { Double($0.restarts) }),
            ("pipehost_stage_busy_seconds_total", "counter", "Seconds spent in stage code (process, produce, tick, drain).", { Double($0.stats?.busyNs ?? 0) / 1e9 }),
        ]
        // Every sample of a family follows its HELP and TYPE lines, as the format requires.
        for (name, type, help, value) in families {
            w.family(name, type, help)
            for id in order {
                guard let st = stages[id] else { continue }
                w.sample(name, [p, ("stage", id), ("kind", st.plan.kind), ("placement", st.plan.placement.description)], value(st))
            }
        }
        w.family("pipehost_stage_processing_seconds", "histogram", "Time in stage code per envelope (mean per input batch or produce call).")
        for id in order {
            guard let st = stages[id] else { continue }
            w.histogram("pipehost_stage_processing_seconds", [p, ("stage", id), ("kind", st.plan.kind)], st.stats?.processing ?? DurationHistogram())
        }
        let views = lanes()
        let laneFamilies: [(String, String, String, (LaneView) -> Double)] = [
            ("pipehost_lane_depth", "gauge", "Envelopes in flight on the lane plus those queued at its producer.", { Double($0.depth) }),
            ("pipehost_lane_bound", "gauge", "The lane's bound in envelopes.", { Double($0.bound) }),
            ("pipehost_lane_sent_total", "counter", "Envelopes the producer handed to the lane.", { Double($0.sent) }),
            ("pipehost_lane_received_total", "counter", "Envelopes the consumer took from the lane.", { Double($0.received) }),
            ("pipehost_lane_dropped_total", "counter", "Envelopes dropped by drop_newest or drop_oldest.", { Double($0.dropped) }),
            ("pipehost_lane_spilled_total", "counter", "Envelopes written to the lane's spill queue.", { Double($0.spilled) }),
            ("pipehost_lane_spill_depth", "gauge", "Envelopes in the lane's spill queue now.", { Double($0.spillDepth) }),
            ("pipehost_lane_blocked_seconds_total", "counter", "Seconds the producer had envelopes for the lane but no credit.", { Double($0.blockedNs) / 1e9 }),
        ]
        func laneLabels(_ v: LaneView) -> [(String, String)] { [p, ("lane", String(v.id)), ("from", v.from), ("to", v.to)] }
        for (name, type, help, value) in laneFamilies {
            w.family(name, type, help)
            for v in views { w.sample(name, laneLabels(v), value(v)) }
        }
        w.family("pipehost_lane_state", "gauge", "1 for the lane's watermark state (normal, pressure-rising, overloaded, recovering), 0 for the others.")
        for v in views {
            for s in PressureState.allCases { w.sample("pipehost_lane_state", laneLabels(v) + [("state", s.rawValue)], s == v.state ? 1 : 0) }
        }
        w.family("pipehost_lane_latency_seconds", "histogram", "Time from a DATA frame being sent to its consumer taking it, per envelope.")
        for v in views { w.histogram("pipehost_lane_latency_seconds", laneLabels(v), v.latency) }
        return w.out
    }

    /// Starts the endpoint when the pipeline asks for one; returns a description for the log.
    func startMetrics() throws(RuntimeError) {
        guard let m = plan.spec.metrics else { return }
        let server = try MetricsServer(host: m.host, port: m.port)
        metricsServer = server
        metricsServer?.publish(renderMetrics())
        server.start()
        try? "\(m.host):\(server.port)\n".write(toFile: options.runDirectory + "/metrics.addr", atomically: true, encoding: .utf8)
        log.info("metrics: http://\(m.host.contains(":") ? "[\(m.host)]" : m.host):\(server.port)/metrics")
    }

    /// Re-renders (called from the host loop) at most once a second, and only while someone
    /// scrapes: a scrape is answered from the latest rendering, at most a second old.
    func refreshMetrics(_ now: UInt64) {
        guard let s = metricsServer, now - lastMetricsRender >= 1_000_000_000, s.scrapedSince(lastMetricsRender) else { return }
        lastMetricsRender = now
        s.publish(renderMetrics())
    }
}

/// A minimal HTTP/1.1 endpoint for Prometheus: `GET /metrics` returns the latest rendering; one
/// connection at a time, each closed after its response, with short read timeouts so a stuck
/// client cannot hold it.
final class MetricsServer: @unchecked Sendable {
    // @unchecked: `fd` is set once in init and closed once in stop(); `page` is behind a Mutex.
    let fd: Int32
    let port: Int
    private let page = Mutex<[UInt8]>([])
    private let stopping = Atomic<Bool>(false)
    /// Monotonic time of the latest request (0: none yet).
    private let lastRequest = Atomic<UInt64>(0)
    private var thread: Thread?

    init(host: String, port: Int) throws(RuntimeError) {
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host, String(port), &hints, &res)
        guard rc == 0, let ai = res else { throw .io("metrics.listen \(host):\(port): \(String(cString: gai_strerror(rc)))") }
        defer { freeaddrinfo(res) }
        let s = socket(ai.pointee.ai_family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard s >= 0 else { throw .io("metrics: socket: \(String(cString: strerror(errno)))") }
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(s, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, listen(s, 16) == 0 else {
            let e = String(cString: strerror(errno)); close(s)
            throw .io("metrics: cannot listen on \(host):\(port): \(e)")
        }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        _ = withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &len) } }
        let bound: UInt16 = ss.ss_family == sa_family_t(AF_INET6)
            ? withUnsafePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr_in6.self, capacity: 1) { $0.pointee.sin6_port } }
            : withUnsafePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { $0.pointee.sin_port } }
        fd = s
        self.port = Int(UInt16(bigEndian: bound))
    }

    func publish(_ text: String) { page.withLock { $0 = Array(text.utf8) } }

    /// Whether a request came in after `t` (monotonic ns), or none was ever served.
    func scrapedSince(_ t: UInt64) -> Bool {
        let r = lastRequest.load(ordering: .relaxed)
        return r == 0 || r > t
    }

    func start() {
        let t = Thread { [self] in serve() }
        t.name = "metrics"
        thread = t
        t.start()
    }

    func stop() {
        stopping.store(true, ordering: .relaxed)
        shutdown(fd, Int32(SHUT_RDWR))
    }

    private func serve() {
        defer { close(fd) }
        while !stopping.load(ordering: .relaxed) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let c = accept(fd, nil, nil)
            if c < 0 { continue }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            lastRequest.store(monotonicNs(), ordering: .relaxed)
            handle(c)
            close(c)
        }
    }

    private func handle(_ c: Int32) {
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var req = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while req.count < 16384 {
            let n = buf.withUnsafeMutableBytes { recv(c, $0.baseAddress, $0.count, 0) }
            if n <= 0 { break }
            req += buf[0..<n]
            if req.count >= 4, req.suffix(4) == [13, 10, 13, 10] { break }
            if let r = String(bytes: req, encoding: .utf8), r.contains("\r\n\r\n") || r.contains("\n\n") { break }
        }
        let line = String(decoding: req.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self).split(separator: " ")
        let method = line.first.map(String.init) ?? "", path = line.count > 1 ? String(line[1]) : ""
        let status: String, type: String, body: [UInt8]
        if method != "GET" && method != "HEAD" {
            (status, type, body) = ("405 Method Not Allowed", "text/plain", Array("only GET\n".utf8))
        } else if path == "/metrics" || path.hasPrefix("/metrics?") {
            (status, type, body) = ("200 OK", "text/plain; version=0.0.4; charset=utf-8", page.withLock { $0 })
        } else if path == "/" {
            (status, type, body) = ("200 OK", "text/plain", Array("pipehost metrics: GET /metrics\n".utf8))
        } else {
            (status, type, body) = ("404 Not Found", "text/plain", Array("not found; try /metrics\n".utf8))
        }
        var out = Array("HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(body.count)\r\nConnection: close\r\n\r\n".utf8)
        if method != "HEAD" { out += body }
        var sent = 0
        while sent < out.count {
            let n = out[sent...].withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }
            sent += n
        }
    }
}
