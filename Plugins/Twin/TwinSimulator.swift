import Foundation
import PipeKit
import PipeSeal

/// `twin-sim`: the crane scenario as a deterministic stream. For every operator intent it emits a
/// fresh physical state, the twin's view of it, and the intent, for devices taking turns. With
/// the seed fixed, the same states, faults, lags and divergences come out on every run; only the
/// timestamps follow the wall clock (so that the twin stage's staleness check sees live data).
public final class TwinSimulatorStage: SourceStage {
    public static let descriptor = StageDescriptor(
        kind: "twin-sim",
        summary: "Simulates cranes for the twin comparator: physical sensor states, a twin that lags, misses faults or diverges, and operator intents; deterministic with a seed.",
        role: .source,
        fields: [
            ConfigField("count", .int(min: 0), default: .int(1000), doc: "Operator intents to emit (each after a physical and a twin state); 0 means endless."),
            ConfigField("rate", .double(min: 0), default: .double(0), doc: "Intents per second; 0 means as fast as the lanes allow."),
            ConfigField("devices", .int(min: 1, max: 10_000), default: .int(1), doc: "How many cranes take turns (`crane-01`, `crane-02`, ...)."),
            ConfigField("seed", .int(), default: .int(1), doc: "Seed of the scenario and of the envelope ids."),
            ConfigField("twin_lag_ms", .int(min: 0, max: 60_000), default: .int(50), doc: "How far the twin's timestamp normally trails the physical one (a jitter of up to 30 ms is added)."),
            ConfigField("fault_rate", .double(min: 0, max: 1), default: .double(0.05), doc: "Share of steps where the crane reports `fault` and the twin still says `operational`."),
            ConfigField("lag_spike_rate", .double(min: 0, max: 1), default: .double(0.05), doc: "Share of steps where the twin trails by `lag_spike_ms`."),
            ConfigField("lag_spike_ms", .int(min: 0, max: 3_600_000), default: .int(503), doc: "The twin's lag during a lag spike (the seed's crane case: 503 ms)."),
            ConfigField("divergence_rate", .double(min: 0, max: 1), default: .double(0.05), doc: "Share of steps where the twin's `load_kg` is off by `divergence_kg`."),
            ConfigField("divergence_kg", .double(min: 0), default: .double(700), doc: "How far the twin's `load_kg` is off during a divergence."),
            ConfigField("timestamps", .enumeration(["rfc3339", "unix_ns"]), default: .string("rfc3339"), doc: "How state timestamps are written."),
            ConfigField("sign_key", .string, optional: true, doc: "Ed25519 secret key file (`pipehost keygen`'s signing.key) that signs every state, as a device with a key would."),
        ],
        check: { c in
            let total = (c.double("fault_rate") ?? 0) + (c.double("lag_spike_rate") ?? 0) + (c.double("divergence_rate") ?? 0)
            return total > 1 ? [ConfigIssue(key: "fault_rate", message: "fault_rate + lag_spike_rate + divergence_rate must not exceed 1, got \(total)")] : []
        },
        make: { TwinSimulatorStage(config: $0) })

    var pacer: SourcePacer
    let deviceCount: Int
    let lagNs: Int64, spikeNs: Int64
    let faultRate: Double, spikeRate: Double, divergenceRate: Double, divergenceKg: Double
    let unixTimestamps: Bool
    let keyPath: String?
    var key: SigningKey?
    var rng: SplitMix64
    var stopped = false
    var out = OutputHandle(index: 0, name: "out")
    let names: [String]

    init(config c: ConfigReader) {
        pacer = SourcePacer(count: UInt64(c.int("count") ?? 1000), rate: c.double("rate") ?? 0)
        deviceCount = Int(c.int("devices") ?? 1)
        rng = SplitMix64(state: UInt64(bitPattern: c.int("seed") ?? 1))
        lagNs = (c.int("twin_lag_ms") ?? 50) * 1_000_000
        spikeNs = (c.int("lag_spike_ms") ?? 503) * 1_000_000
        faultRate = c.double("fault_rate") ?? 0.05
        spikeRate = c.double("lag_spike_rate") ?? 0.05
        divergenceRate = c.double("divergence_rate") ?? 0.05
        divergenceKg = c.double("divergence_kg") ?? 700
        unixTimestamps = c.string("timestamps") == "unix_ns"
        keyPath = c.string("sign_key")
        let width = max(2, String(deviceCount).count)
        names = (1...deviceCount).map { n in "crane-" + String(repeating: "0", count: max(0, width - String(n).count)) + String(n) }
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out")
        if let keyPath {
            do { key = try KeyFiles.loadSigningKey(context.resolvePath(keyPath)) }
            catch { throw StageError.halt("sign_key: \(error)") }
        }
    }

    public func requestStop() { stopped = true }

    public func produce(budget: Int, context: any StageContext) throws -> SourceProgress {
        if stopped || pacer.finished { return .exhausted }
        let (allowed, waitNs) = pacer.allowance(now: context.now, budget: max(1, budget / 3))
        if allowed == 0 { return .idle(afterNs: waitNs) }
        for _ in 0..<allowed { step(context) }
        return pacer.finished ? .exhausted : .active
    }

    func uniform() -> Double { Double(rng.next() >> 11) / Double(1 << 53) }

    func step(_ context: any StageContext) {
        let n = pacer.done
        pacer.sent()
        let device = names[Int(n % UInt64(deviceCount))]
        let wall = context.wallClockNs
        let physicalNs = Int64(clamping: wall)
        var twinNs = physicalNs - lagNs - Int64(rng.next() % 30_000_001)
        var physicalStatus = "operational"
        var twinLoad = 0.0
        let u = uniform()
        if u < faultRate { physicalStatus = "fault" }
        else if u < faultRate + spikeRate { twinNs = physicalNs - spikeNs }
        else if u < faultRate + spikeRate + divergenceRate { twinLoad = divergenceKg }
        // Fixed-point values (hundredths of a metre, tenths of a kg and of a m/s), so the payloads
        // are the same bytes on every run and cost no float formatting.
        let x = 1250 + Int64(n % 7), load = 25_000 + Int64(n % 37) * 100, wind = Int64(rng.next() % 150)
        let physical = state(device, ns: physicalNs, x: x, load: load, wind: wind, status: physicalStatus)
        // The twin rounds position and has an older wind reading: untoleranced sensors may differ.
        let twin = state(device, ns: twinNs, x: (x + 5) / 10 * 10, load: load + Int64((twinLoad * 10).rounded()), wind: wind + 25, status: "operational")
        emitState(physical, kind: "physical", device: device, actor: device + ".plc", ingest: wall, context)
        emitState(twin, kind: "twin", device: device, actor: device + ".twin", ingest: wall, context)
        let moves = ["factory.crane.move_left", "factory.crane.move_right", "factory.crane.hoist", "factory.crane.lower"]
        let intent = Envelope(id: .random(using: &rng), actor: "operator.anna", intent: moves[Int(n % 4)], authority: "crane:operate",
                              ingestNs: wall, attrs: ["twin_kind": .string("intent"), "device": .string(device)],
                              payload: Array(#"{"step":\#(n + 1)}"#.utf8))
        context.emit(intent, to: out)
    }

    /// `{"device_id":..,"timestamp":..,"values":{"position_x":x/100,"position_y":8.3,"load_kg":load/10,"wind_ms":wind/10},"status":..}`
    func state(_ device: String, ns: Int64, x: Int64, load: Int64, wind: Int64, status: String) -> [UInt8] {
        var o: [UInt8] = []
        o.reserveCapacity(160)
        func lit(_ s: StaticString) { o.append(contentsOf: UnsafeBufferPointer(start: s.utf8Start, count: s.utf8CodeUnitCount)) }
        func fixed(_ v: Int64, _ decimals: Int) {
            var div: Int64 = 1
            for _ in 0..<decimals { div *= 10 }
            if v < 0 { o.append(0x2D) }
            let a = abs(v)
            o.append(contentsOf: String(a / div).utf8)
            if decimals > 0 {
                o.append(0x2E)
                var frac = a % div, d = div / 10
                for _ in 0..<decimals { o.append(UInt8(0x30 + frac / d)); frac %= d; d = max(1, d / 10) }
            }
        }
        lit(#"{"device_id":""#); o.append(contentsOf: device.utf8)
        lit(#"","timestamp":"#)
        if unixTimestamps { o.append(contentsOf: String(ns).utf8) } else { o.append(0x22); RFC3339.append(ns: ns, into: &o); o.append(0x22) }
        lit(#","values":{"position_x":"#); fixed(x, 2)
        lit(#","position_y":8.3,"load_kg":"#); fixed(load, 1)
        lit(#","wind_ms":"#); fixed(wind, 1)
        lit(#"},"status":""#); o.append(contentsOf: status.utf8); lit(#""}"#)
        return o
    }

    func emitState(_ payload: [UInt8], kind: String, device: String, actor: String, ingest: UInt64, _ context: any StageContext) {
        var e = Envelope(id: .random(using: &rng), actor: actor, intent: "twin.state." + kind, ingestNs: ingest,
                         attrs: ["twin_kind": .string(kind), "device": .string(device)], payload: payload)
        key?.sign(&e)
        context.emit(e, to: out)
    }
}
