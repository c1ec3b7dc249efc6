import Foundation
import PipeKit
import PipeSeal

/// How one device is judged: its profile, limits, tolerances and (optionally) its key.
struct DevicePolicy: Sendable {
    var profile: TwinProfile
    var maxDriftNs: Int64
    var maxAgeNs: Int64
    /// Whether `max_age_ms` was set (else it follows the drift limit x 10).
    var ageExplicit: Bool
    /// Sorted by sensor name, so reasons list sensors in a stable order.
    var tolerances: [(sensor: String, tolerance: Double)]
    var publicKey: [UInt8]?
    var publicKeyFile: String?
}

/// The latest state of one kind (physical or twin) filed under a device.
enum StateSlot {
    case none
    case held(HeldState)
    /// The latest state of this kind could not be read: the slot fails closed until a good one comes.
    case rejected(reason: String, envelope: EnvelopeID)
}

struct HeldState {
    var reading: StateReading
    var envelope: EnvelopeID
    /// Set when the state claims another device than the one it is filed under.
    var identityProblem: String?
    /// Set when a key is configured and the signature is missing or does not verify.
    var signatureProblem: String?
}

final class DeviceRecord {
    let name: String
    let policy: DevicePolicy
    var physical: StateSlot = .none
    var twin: StateSlot = .none
    var checks = 0, allowed = 0, blocked = 0
    var last = ""
    init(name: String, policy: DevicePolicy) { self.name = name; self.policy = policy }
}

/// One judgement of an intent.
struct TwinJudgement {
    var failures: [String] = []
    var failedChecks: [String] = []
    var warnings: [String] = []
    var driftMs: Double?
    var physicalState: EnvelopeID?
    var twinState: EnvelopeID?
    var blocked: Bool { !failures.isEmpty }

    mutating func fail(_ check: String, _ reason: String) {
        failures.append(reason)
        if failedChecks.last != check { failedChecks.append(check) }
    }
}

/// `twin`: no action without proven synchronization (CONCEPTS.md, "The twin comparator").
public final class TwinStage: Stage {
    static let deviceKeys = ["profile", "max_drift_ms", "max_age_ms", "tolerances", "public_key", "public_key_file"]

    public static let descriptor = StageDescriptor(
        kind: "twin",
        summary: "Twin comparator: keeps each device's latest physical and twin state and lets an intent through only when both agree (presence, identity and signature, drift and staleness, status, toleranced values).",
        role: .transform,
        inputs: [InputPort("in", doc: "states (`twin_kind` = `physical` or `twin`) and intents (`twin_kind` = `intent`), each with a `device` attribute")],
        outputs: { _ in ["allowed", "blocked"] }, outputsDoc: "allowed, blocked",
        fields: [
            ConfigField("profile", .enumeration(TwinProfile.names), default: .string("port"),
                        doc: "Industry profile: max drift and safety-criticality (port 200 ms, manufacturing 100, energy 500, steel 300, semiconductor 50: safety-critical; building 5000: not)."),
            ConfigField("max_drift_ms", .int(min: 0), optional: true, doc: "Overrides the profile's largest allowed gap between the physical and the twin timestamp."),
            ConfigField("max_age_ms", .int(min: 1), optional: true, doc: "How old (or how far in the future) a state may be against the clock; default: max drift x 10."),
            ConfigField("tolerances", .map(.double(min: 0)), optional: true, doc: "Sensor -> largest allowed difference between physical and twin value, for every device; sensors without one are not compared."),
            ConfigField("devices", .map(.any), optional: true,
                        doc: "Device -> overrides (`profile`, `max_drift_ms`, `max_age_ms`, `tolerances`, and `public_key` (hex) or `public_key_file` to require signed states). When given, it is the closed set of devices: others are refused."),
            ConfigField("clock", .enumeration(["stage", "intent"]), default: .string("stage"),
                        doc: "What staleness is measured against: the stage's wall clock, or the intent's `ingest_ns` (for replaying recorded streams)."),
            ConfigField("max_devices", .int(min: 1), default: .int(100_000), doc: "Most devices tracked when `devices` is not given; states for more are refused (bounded memory)."),
            ConfigField("status_devices", .int(min: 0, max: 10_000), default: .int(64), doc: "How many devices `pipectl status` lists one by one (by name)."),
        ],
        check: { c in checkDevices(c) },
        make: { try TwinStage(config: $0) })

    let defaultPolicy: DevicePolicy
    let closedSet: Bool
    let clockFromIntent: Bool
    let statusDevices: Int
    let maxDevices: Int
    var devices: [String: DeviceRecord] = [:]
    var checks = 0, allowed = 0, blocked = 0
    var allowedOut = OutputHandle(index: 0, name: "allowed")
    var blockedOut = OutputHandle(index: 1, name: "blocked")

    init(config c: ConfigReader) throws {
        let stagePolicy = try Self.policy(profileName: c.string("profile") ?? "port", drift: c.int("max_drift_ms"), age: c.int("max_age_ms"),
                                          tolerances: Self.tolerances(c.value("tolerances")), base: nil)
        defaultPolicy = stagePolicy
        clockFromIntent = c.string("clock") == "intent"
        statusDevices = Int(c.int("status_devices") ?? 64)
        maxDevices = Int(c.int("max_devices") ?? 100_000)
        if case .map(let entries)? = c.value("devices") {
            closedSet = true
            for e in entries {
                let d = e.value
                var p = try Self.policy(profileName: d["profile"]?.stringValue, drift: d["max_drift_ms"]?.intValue, age: d["max_age_ms"]?.intValue,
                                        tolerances: Self.tolerances(d["tolerances"]), base: stagePolicy)
                if let hex = d["public_key"]?.stringValue { p.publicKey = Hex.decode(hex) }
                p.publicKeyFile = d["public_key_file"]?.stringValue
                devices[e.key] = DeviceRecord(name: e.key, policy: p)
            }
        } else {
            closedSet = false
        }
    }

    static func tolerances(_ v: ConfigValue?) -> [(sensor: String, tolerance: Double)] {
        (v?.mapEntries ?? []).compactMap { e in e.value.doubleValue.map { (e.key, $0) } }
    }

    /// A policy from a profile and overrides; a device inherits the stage's unless it names its own.
    static func policy(profileName: String?, drift: Int64?, age: Int64?, tolerances: [(sensor: String, tolerance: Double)],
                       base: DevicePolicy?) throws -> DevicePolicy {
        let profile: TwinProfile
        if let name = profileName {
            guard let p = TwinProfile.named(name) else { throw StageError.halt("unknown twin profile '\(name)'") }
            profile = p
        } else if let base { profile = base.profile } else { profile = TwinProfile.all[0] }
        let driftNs: Int64
        if let drift { driftNs = drift * 1_000_000 }
        else if profileName == nil, let base { driftNs = base.maxDriftNs }
        else { driftNs = profile.maxDriftMs * 1_000_000 }
        let ageNs: Int64
        if let age { ageNs = age * 1_000_000 }
        else if let base, base.ageExplicit { ageNs = base.maxAgeNs }
        else { ageNs = max(driftNs * 10, 1_000_000) }
        var merged: [String: Double] = [:]
        for t in base?.tolerances ?? [] { merged[t.sensor] = t.tolerance }
        for t in tolerances { merged[t.sensor] = t.tolerance }
        return DevicePolicy(profile: profile, maxDriftNs: driftNs, maxAgeNs: ageNs, ageExplicit: age != nil || (base?.ageExplicit ?? false),
                            tolerances: merged.keys.sorted().map { ($0, merged[$0] ?? 0) }, publicKey: nil, publicKeyFile: nil)
    }

    static func checkDevices(_ c: ConfigReader) -> [ConfigIssue] {
        guard case .map(let entries)? = c.value("devices") else { return [] }
        var issues: [ConfigIssue] = []
        func issue(_ m: String) { issues.append(ConfigIssue(key: "devices", message: m)) }
        for e in entries {
            let dev = "device '\(e.key)'"
            guard case .map(let fields) = e.value else { issue("\(dev) must be a map of overrides (or {})"); continue }
            for f in fields where !deviceKeys.contains(f.key) {
                issue("\(dev): unknown key '\(f.key)'" + (didYouMean(f.key, among: deviceKeys).map { ", did you mean '\($0)'?" } ?? "") +
                      " (expected \(deviceKeys.joined(separator: ", ")))")
            }
            let checks: [(String, ConfigType)] = [("profile", .enumeration(TwinProfile.names)), ("max_drift_ms", .int(min: 0)),
                                                  ("max_age_ms", .int(min: 1)), ("tolerances", .map(.double(min: 0))),
                                                  ("public_key", .string), ("public_key_file", .string)]
            for (key, type) in checks {
                if let v = e.value[key], let err = type.check(v) { issue("\(dev): \(key) \(err)") }
            }
            if let hex = e.value["public_key"]?.stringValue, Hex.decode(hex)?.count != 32 {
                issue("\(dev): public_key must be 64 hex digits (an Ed25519 public key, e.g. signing.pub from `pipehost keygen`)")
            }
            if e.value["public_key"] != nil, e.value["public_key_file"] != nil { issue("\(dev): give public_key or public_key_file, not both") }
        }
        return issues
    }

    public var tickInterval: UInt64? { 1_000_000_000 }

    public func start(context: any StageContext) throws {
        allowedOut = try context.output("allowed")
        blockedOut = try context.output("blocked")
        for (name, d) in devices {
            guard let file = d.policy.publicKeyFile else { continue }
            let path = context.resolvePath(file)
            guard let text = try? String(contentsOfFile: path, encoding: .utf8),
                  let key = Hex.decode(text.trimmingCharacters(in: .whitespacesAndNewlines)), key.count == 32 else {
                throw StageError.halt("device '\(name)': cannot read an Ed25519 public key (64 hex digits) from \(path)")
            }
            var p = d.policy; p.publicKey = key
            devices[name] = DeviceRecord(name: name, policy: p)
        }
        report(context)
    }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        let e = envelope
        guard let kind = e.attrs["twin_kind"] else { throw StageError.deadLetter("no twin_kind attribute (expected physical, twin or intent)") }
        guard case .string(let k) = kind, k == "physical" || k == "twin" || k == "intent" else {
            throw StageError.deadLetter("twin_kind is \(kind), expected physical, twin or intent")
        }
        guard case .string(let deviceName)? = e.attrs["device"], !deviceName.isEmpty else {
            throw StageError.deadLetter("\(k) envelope has no device attribute (a non-empty string)")
        }
        if k == "intent" {
            decide(e, deviceName: deviceName, context: context)
            return
        }
        guard let device = device(deviceName) else {
            throw StageError.deadLetter(closedSet ? "\(k) state for unknown device '\(deviceName)' (not in this stage's devices)"
                                                  : "\(k) state for '\(deviceName)' refused: already tracking max_devices (\(maxDevices)) devices")
        }
        let slot: StateSlot
        var failure: String?
        let parsed = e.withPayloadBytes { b in Result { () throws(StateError) -> StateReading in try StateParser.parse(b) } }
        switch parsed {
        case .success(let reading):
            var held = HeldState(reading: reading, envelope: e.id)
            if reading.deviceID != deviceName {
                held.identityProblem = "\(k) state claims device '\(reading.deviceID)' but is filed under '\(deviceName)'"
            }
            if let key = device.policy.publicKey {
                let check = e.verifySignature(publicKey: key)
                if check != .valid { held.signatureProblem = "\(k) state signature: \(check)" }
            }
            slot = .held(held)
        case .failure(let error):
            failure = "\(k) state for '\(deviceName)' refused: \(error.message)"
            slot = .rejected(reason: error.message, envelope: e.id)
        }
        if k == "physical" { device.physical = slot } else { device.twin = slot }
        if let failure { throw StageError.deadLetter(failure) }
    }

    func device(_ name: String) -> DeviceRecord? {
        if let d = devices[name] { return d }
        if closedSet || devices.count >= maxDevices { return nil }
        let d = DeviceRecord(name: name, policy: defaultPolicy)
        devices[name] = d
        return d
    }

    // MARK: the five checks

    func judge(_ device: DeviceRecord, nowNs: Int64) -> TwinJudgement {
        var j = TwinJudgement()
        let policy = device.policy
        // 1. Both states exist (a refused latest state counts as none: fail closed).
        let physical = present(device.physical, "physical", &j, isPhysical: true)
        let twin = present(device.twin, "twin", &j, isPhysical: false)
        // 2. Identity, and signatures when a key is configured.
        for h in [physical, twin] where h?.identityProblem != nil || h?.signatureProblem != nil {
            if let p = h?.identityProblem { j.fail("identity", p) }
            if let p = h?.signatureProblem { j.fail("identity", p) }
        }
        // 3. Drift between the two, and age of each against the clock.
        if let p = physical, let t = twin {
            let drift = abs(p.reading.timestampNs - t.reading.timestampNs)
            j.driftMs = Double(drift) / 1e6
            if drift > policy.maxDriftNs {
                j.fail("temporal", "drift \(ms(drift)) ms > \(ms(policy.maxDriftNs)) ms (\(policy.profile.name))")
            }
        }
        if let p = physical { checkAge(p, "physical", nowNs: nowNs, policy: policy, &j) }
        if let t = twin { checkAge(t, "twin", nowNs: nowNs, policy: policy, &j) }
        guard let p = physical?.reading, let t = twin?.reading else { return j }
        // 4. Equal status.
        if p.status != t.status { j.fail("status", "status mismatch: physical=\(p.status), twin=\(t.status)") }
        // 5. Every toleranced value within tolerance; a value missing on one side is a deviation.
        for (sensor, tolerance) in policy.tolerances {
            let pv = p.value(sensor), tv = t.value(sensor)
            guard let pv, let tv else {
                let side = pv == nil && tv == nil ? "both sides" : (pv == nil ? "the physical side" : "the twin side")
                j.fail("values", "\(sensor) missing on \(side) (tolerance \(num(tolerance)))")
                continue
            }
            guard let a = pv.value, let b = tv.value else {
                let what = pv.value == nil ? "physical \(sensor) is \(pv.problem ?? "not a number")" : "twin \(sensor) is \(tv.problem ?? "not a number")"
                if policy.profile.safetyCritical { j.fail("values", "\(sensor) cannot be evaluated: \(what)") }
                else { j.warnings.append("\(sensor) cannot be evaluated: \(what)") }
                continue
            }
            let delta = abs(a - b)
            if !(delta <= tolerance) {
                j.fail("values", "\(sensor) deviates by \(num(delta)) > tolerance \(num(tolerance)) (physical \(num(a)), twin \(num(b)))")
            }
        }
        return j
    }

    private func present(_ slot: StateSlot, _ name: String, _ j: inout TwinJudgement, isPhysical: Bool) -> HeldState? {
        var id: EnvelopeID?
        var held: HeldState?
        switch slot {
        case .none: j.fail("presence", "no \(name) state")
        case .rejected(let reason, let rid): j.fail("presence", "latest \(name) state was refused (\(reason))"); id = rid
        case .held(let h): id = h.envelope; held = h
        }
        if isPhysical { j.physicalState = id } else { j.twinState = id }
        return held
    }

    private func checkAge(_ h: HeldState, _ name: String, nowNs: Int64, policy: DevicePolicy, _ j: inout TwinJudgement) {
        let age = nowNs - h.reading.timestampNs
        if age > policy.maxAgeNs {
            j.fail("temporal", "\(name) state stale: \(ms(age)) ms old > \(ms(policy.maxAgeNs)) ms")
        } else if -age > policy.maxAgeNs {
            j.fail("temporal", "\(name) state timestamp \(ms(-age)) ms in the future > \(ms(policy.maxAgeNs)) ms")
        }
    }

    func decide(_ intent: Envelope, deviceName: String, context: any StageContext) {
        let now = clockFromIntent ? Int64(clamping: intent.ingestNs) : Int64(clamping: context.wallClockNs)
        var j: TwinJudgement
        let policy: DevicePolicy
        if let device = device(deviceName) {
            j = judge(device, nowNs: now)
            policy = device.policy
            device.checks += 1
            if j.blocked { device.blocked += 1 } else { device.allowed += 1 }
        } else {
            j = TwinJudgement()
            j.fail("presence", closedSet ? "unknown device '\(deviceName)' (not in this stage's devices)"
                                         : "device '\(deviceName)' not tracked: already tracking max_devices (\(maxDevices)) devices")
            policy = defaultPolicy
        }
        checks += 1
        if j.blocked { blocked += 1 } else { allowed += 1 }
        let reason = j.blocked ? "blocked: " + j.failures.joined(separator: "; ")
                               : (j.driftMs.map { "allowed: in sync, drift \(num($0)) ms" } ?? "allowed: in sync")
        if let device = device(deviceName) { device.last = reason }
        let failed = j.blocked ? j.failedChecks.joined(separator: ",") : ""
        var out = intent
        out.attrs.reserveCapacity(out.attrs.count + 6)
        out.attrs["twin_decision"] = .string(j.blocked ? "blocked" : "allowed")
        out.attrs["twin_reason"] = .string(reason)
        out.attrs["twin_profile"] = .string(policy.profile.name)
        if let d = j.driftMs { out.attrs["twin_drift_ms"] = .double(d) }
        if j.blocked { out.attrs["twin_checks_failed"] = .string(failed) }
        if !j.warnings.isEmpty { out.attrs["twin_warnings"] = .string(j.warnings.joined(separator: "; ")) }

        var details: [String: AttrValue] = [:]
        details.reserveCapacity(7)
        details["device"] = .string(deviceName)
        details["profile"] = .string(policy.profile.name)
        if let d = j.driftMs { details["drift_ms"] = .double(d) }
        if j.blocked { details["checks_failed"] = .string(failed) }
        if !j.warnings.isEmpty { details["warnings"] = .string(j.warnings.joined(separator: "; ")) }
        if let s = j.physicalState { details["physical_state"] = .string(s.description) }
        if let s = j.twinState { details["twin_state"] = .string(s.description) }
        var record = AuditRecord.about(intent, decision: j.blocked ? "block" : "allow", reason: reason, details: details)
        // The states the decision rests on are its inputs (eraan: linked identity and parents).
        if let s = j.physicalState { record.parents.append(s) }
        if let s = j.twinState { record.parents.append(s) }
        context.audit(record)
        context.emit(out, to: j.blocked ? blockedOut : allowedOut)
    }

    // MARK: status

    public func tick(context: any StageContext) throws { report(context) }
    public func drain(context: any StageContext) throws { report(context) }

    func report(_ context: any StageContext) {
        context.report("checks", .int(Int64(checks)))
        context.report("allowed", .int(Int64(allowed)))
        context.report("blocked", .int(Int64(blocked)))
        context.report("block_rate_pct", .double(checks == 0 ? 0 : (Double(blocked) * 1000 / Double(checks)).rounded() / 10))
        context.report("devices", .int(Int64(devices.count)))
        for name in devices.keys.sorted().prefix(statusDevices) {
            guard let d = devices[name] else { continue }
            context.report("device.\(name)", .string("\(d.checks) checks, \(d.allowed) allowed, \(d.blocked) blocked; last: \(d.last.isEmpty ? "-" : d.last)"))
        }
    }
}

/// Milliseconds from nanoseconds, without trailing zeros (503, 50.5, 0.001).
func ms(_ ns: Int64) -> String { num(Double(ns) / 1e6) }

/// A number for messages: integers without ".0", others rounded to 6 significant decimals.
func num(_ d: Double) -> String {
    if d.isFinite, d == d.rounded(), abs(d) < 1e15 { return String(Int64(d)) }
    var s = String(format: "%.6f", d)
    while s.hasSuffix("0") { s.removeLast() }
    if s.hasSuffix(".") { s.removeLast() }
    return s
}
