// Tools/bench: throughput and latency of lanes and pipelines, with ratios against raw libzmq
// measured in the same run. Build and run: `Tools/bench.sh` (release build).
import Foundation
import PipeConfig
import PipeKit
import PipeRegistry
import PipeRuntime
import PipeZMQ

let args = CommandLine.arguments
let quick = args.contains("--quick")
let N = quick ? 300_000 : 2_000_000

func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// Raw libzmq PUSH/PULL over inproc: one sender thread, one receiver thread, 100-byte messages.
func rawInproc(messages: Int) throws -> Double {
    let ctx = try ZMQContext()
    let ep = "inproc://bench-raw-\(UInt32.random(in: 0...UInt32.max))"
    let pull = try ctx.socket(.pull)
    try pull.bind(ep)
    let push = try ctx.socket(.push)
    try push.connect(ep)
    let payload = [UInt8](repeating: 0x61, count: 100)
    let sender = Thread {
        for _ in 0..<messages { _ = try? push.send(payload) }
    }
    let t0 = now()
    sender.start()
    var got = 0
    while got < messages { if (try? pull.receiveMessage()) != nil { got += 1 } }
    let dt = now() - t0
    push.close(); pull.close(); ctx.terminate()
    return Double(messages) / dt
}

/// Single-thread codec cost: DATA frames of 256 envelopes encoded and decoded.
func codec(envelopes: Int) -> (encode: Double, decode: Double) {
    let batch = (0..<256).map { i in
        Envelope(id: EnvelopeID(hi: 1, lo: UInt64(i)), actor: "generator", intent: "demo.tick", ingestNs: 1,
                 payload: [UInt8](repeating: 0x61, count: 100))
    }
    let rounds = envelopes / 256
    var frame: [UInt8] = []
    let t0 = now()
    for r in 0..<rounds { frame = batch.withUnsafeBufferPointer { DataFrameBuilder.build(lane: 1, seq: UInt64(r), envelopes: $0) } }
    let enc = Double(rounds * 256) / (now() - t0)
    var n = 0
    let t1 = now()
    for _ in 0..<rounds {
        frame.withUnsafeBytes { raw in
            guard let f = try? FrameView(raw) else { return }
            try? f.forEachEnvelope(limits: .standard) { r, _ in if case .success(let e) = r { n &+= Int(e.hops) + 1 } }
        }
    }
    let dec = Double(rounds * 256) / (now() - t1)
    precondition(n == rounds * 256)
    return (enc, dec)
}

struct PipelineResult { var rate: Double; var summary: RunSummary; var runDirectory: String }

func runPipeline(_ yaml: String, name: String, byReference: Bool = true) throws -> PipelineResult {
    let (spec, diags) = PipelineLoader.load(text: yaml, file: "\(name).yaml", registry: builtInStages)
    guard let spec, diags.isEmpty else { throw RuntimeError.plan(diags.map(\.description).joined(separator: "\n")) }
    let edges = PipelineValidator(spec: spec, registry: builtInStages).edges
    let plan = try PipelinePlan.make(spec: spec, edges: edges, registry: builtInStages)
    let dir = NSTemporaryDirectory() + "bench-\(name)-\(getpid())"
    try? FileManager.default.removeItem(atPath: dir)
    let exeDir = URL(fileURLWithPath: (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? args[0]).deletingLastPathComponent().path
    var options = HostOptions(runDirectory: dir, workerExecutable: exeDir + "/pipehost")
    options.inprocByReference = byReference
    let host = try PipelineHost(plan: plan, registry: builtInStages, options: options)
    let s = try host.run()
    if let f = s.failure { throw RuntimeError.plan(f) }
    let sink = s.lanes.first { $0.to == "sink.in" }?.received ?? 0
    return PipelineResult(rate: Double(sink) / s.elapsedSeconds, summary: s, runDirectory: dir)
}

func threeStage(count: Int, placement: String, rate: Double = 0) -> String {
    """
    pipeline: bench
    stages:
      - { id: gen, kind: generator, config: { count: \(count), payload_size: 100, seed: 1, rate: \(rate) } }
      - { id: pass, kind: passthrough, inputs: [gen], placement: \(placement) }
      - { id: sink, kind: null-sink, inputs: [pass] }
    """
}

/// A peer baseline (../shared/peer-bench) run now in the peer virtualenv: the ops/s on the line
/// containing `caseMarker`, or the documented `fallback` when the peer is not installed here.
func peerRate(script name: String, caseMarker: String, fallback: Double) -> (rate: Double, measured: Bool) {
    let env = ProcessInfo.processInfo.environment
    let python = env["PEER_PYTHON"] ?? FileManager.default.currentDirectoryPath + "/.build/peers-venv/bin/python"
    let script = env["PEER_BENCH_DIR"].map { $0 + "/" + name } ?? FileManager.default.currentDirectoryPath + "/../shared/peer-bench/" + name
    guard FileManager.default.isExecutableFile(atPath: python), FileManager.default.fileExists(atPath: script) else { return (fallback, false) }
    let p = Process()
    p.executableURL = URL(fileURLWithPath: python)
    p.arguments = [script]
    var e = env; e["PEER_BENCH_SECONDS"] = e["PEER_BENCH_SECONDS"] ?? "3"; p.environment = e
    let pipe = Pipe(); p.standardOutput = pipe; p.standardError = FileHandle.nullDevice
    guard (try? p.run()) != nil else { return (fallback, false) }
    let out = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    p.waitUntilExit()
    // e.g. "A capbus emit+run_cap: 7,166 ops/s (...)"
    for line in out.split(separator: "\n") where line.contains(caseMarker) {
        let words = line.split(separator: " ").map(String.init)
        if let i = words.firstIndex(where: { $0.hasPrefix("ops/s") }), i > 0,
           let rate = Double(words[i - 1].replacingOccurrences(of: ",", with: "")), rate > 0 { return (rate, true) }
    }
    return (fallback, false)
}

func fmt(_ r: Double) -> String { String(format: "%.2f M/s", r / 1e6) }

do {
    if args.contains("--observability-breakdown") {
        try ObservabilityBench.breakdown()
        exit(0)
    }
    if args.contains("--observability") {
        try ObservabilityBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--intake-sniff-profile") {
        print(String(format: "sniff, mime off: %.0f/s", try IntakeBench.sniff(mime: "off", seconds: 5)))
        exit(0)
    }
    if args.contains("--intake-e2e") {
        for _ in 0..<2 { let r = try IntakeBench.endToEnd(rounds: 400); print(String(format: "intake end to end: %.0f files/s (%d files)", r.rate, r.files)) }
        exit(0)
    }
    if args.contains("--intake") {
        try IntakeBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--cap") {
        try CapBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--remote") {
        try RemoteBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--delivery") {
        try DeliveryBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--audit") {
        try AuditBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--twin-embedded") {
        // The embedded half alone, for profiling (`perf record .build/release/bench --twin-embedded`).
        let e = try TwinBench.embedded(seconds: quick ? 1 : 3)
        print(String(format: "twin embedded: %.0f ops/s, block rate %.1f%%", e.rate, e.blockRate * 100))
        exit(0)
    }
    if args.contains("--twin") {
        try TwinBench.report(quick: quick)
        exit(0)
    }
    if args.contains("--codec-only") {
        let c = codec(envelopes: 256 * 200)
        print("codec: encode \(fmt(c.encode)), decode \(fmt(c.decode))")
        exit(0)
    }
    print("bench: \(N) envelopes of 100 bytes per run, \(ProcessInfo.processInfo.activeProcessorCount) cores, libzmq \(ZMQContext.version)")
    var raws: [Double] = []
    for _ in 0..<3 { raws.append(try rawInproc(messages: N)) }
    let raw = raws.sorted()[1]
    print("raw libzmq PUSH/PULL inproc, 1 msg per send (median of 3):  \(fmt(raw))")

    let c = codec(envelopes: N)
    print("codec, one thread, 100-byte payloads in frames of 256:        encode \(fmt(c.encode)), decode \(fmt(c.decode))")

    var inprocs: [PipelineResult] = []
    for _ in 0..<3 { inprocs.append(try runPipeline(threeStage(count: N, placement: "in-process"), name: "inproc")) }
    let inproc = inprocs.sorted { $0.rate < $1.rate }[1]
    let l1 = inproc.summary.lanes.filter { $0.from == "gen.out" || $0.from == "pass.out" }
    print("pipeline generator -> passthrough -> null-sink, in-process:  \(fmt(inproc.rate))  (batches by reference, HANDOFF frames; lanes: " +
          l1.map { "\($0.from)->\($0.to) \($0.transport) sent \($0.sent) received \($0.received)" }.joined(separator: "; ") + ")")
    // For comparison (not a target): the same with every batch encoded into a DATA frame and
    // decoded again, as lanes between processes carry them (`pipehost run --inproc-data-frames`).
    var encoded: [Double] = []
    for _ in 0..<3 { encoded.append(try runPipeline(threeStage(count: N, placement: "in-process"), name: "inproc-data", byReference: false).rate) }
    print("same, in-process with encoded DATA frames (--inproc-data-frames): \(fmt(encoded.sorted()[1]))")

    var procs: [PipelineResult] = []
    for _ in 0..<3 { procs.append(try runPipeline(threeStage(count: N, placement: "process"), name: "process")) }
    let proc = procs.sorted { $0.rate < $1.rate }[1]
    let l2 = proc.summary.lanes.filter { $0.from == "gen.out" || $0.from == "pass.out" }
    print("same, passthrough in a worker process (ipc lanes):          \(fmt(proc.rate))  (lanes: " +
          l2.map { "\($0.from)->\($0.to) \($0.transport) received \($0.received)" }.joined(separator: "; ") + ")")

    let lowRate = (inproc.rate * 0.10).rounded()
    let lowCount = Int(min(lowRate * 3, 600_000))
    let low = try runPipeline(threeStage(count: lowCount, placement: "in-process", rate: lowRate), name: "latency")
    let st = low.summary.stages.first { $0.id == "sink" }?.status ?? []
    func stat(_ k: String) -> Double { st.first { $0.0 == k }?.1.doubleValue ?? -1 }
    print("latency at \(Int(lowRate))/s (10% of in-process max), ingest -> sink: p50 \(stat("latency_p50_us")) us, p99 \(stat("latency_p99_us")) us, max \(stat("latency_max_us")) us")

    print("")
    print(String(format: "ratio in-process / raw inproc:  %.2f x  (target >= 1.0)", inproc.rate / raw))
    print(String(format: "ratio process / in-process:     %.2f x  (target >= 0.3)", proc.rate / inproc.rate))
    print(String(format: "p99 latency at 10%% load:        %.0f us (target < 1000)", stat("latency_p99_us")))
} catch {
    FileHandle.standardError.write(Data("bench: \(error)\n".utf8))
    exit(1)
}
