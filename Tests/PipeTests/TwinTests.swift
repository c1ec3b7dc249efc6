import Testing
import Foundation
import PipeKit
import PipeKitTesting
import PipeSeal
@testable import TwinStages

/// The seed's crane case: 2026-02-27T14:32:01.003Z in Unix nanoseconds (checked with Python's datetime).
private let craneNs: UInt64 = 1_772_202_721_003_000_000

private func state(_ kind: String, device: String = "crane-01", claims: String? = nil, ts: String,
                   values: String = #"{"position_x":12.5,"load_kg":2500.0}"#, status: String = "operational") -> Envelope {
    let payload = #"{"device_id":"\#(claims ?? device)","timestamp":\#(ts),"values":\#(values),"status":"\#(status)"}"#
    return Envelope(actor: device + "." + kind, intent: "twin.state", attrs: ["twin_kind": .string(kind), "device": .string(device)],
                    payload: Array(payload.utf8))
}

private func intent(_ device: String = "crane-01", _ verb: String = "factory.crane.move_left") -> Envelope {
    Envelope(actor: "operator", intent: verb, attrs: ["twin_kind": .string("intent"), "device": .string(device)])
}

private func twin(_ config: [(String, ConfigValue)] = [], wall: UInt64 = craneNs + 100_000_000) throws -> StageHarness {
    let h = try StageHarness(TwinStage.descriptor, config: .object(config))
    h.wallClockNs = wall
    return h
}

/// Feeds one intent and returns (decision, reason) from whichever output it reached.
private func judge(_ h: StageHarness, _ e: Envelope = intent()) throws -> (String, String) {
    try h.feed(e)
    let allowed = h.take("allowed"), blocked = h.take("blocked")
    #expect(allowed.count + blocked.count == 1)
    let out = try #require((allowed + blocked).first)
    #expect(out.id == e.id)
    let decision = out.attrs["twin_decision"]?.stringValue ?? "?"
    #expect(decision == (blocked.isEmpty ? "allowed" : "blocked"))
    return (decision, out.attrs["twin_reason"]?.stringValue ?? "")
}

private let tolerances: (String, ConfigValue) = ("tolerances", .object([("position_x", .double(0.5)), ("load_kg", .double(100))]))

@Suite("Twin comparator")
struct TwinTests {
    @Test func seedCraneCase_blocksNamingDriftAndStatus() throws {
        let h = try twin([("profile", .string("port")), tolerances])
        let p = state("physical", ts: #""2026-02-27T14:32:01.003+00:00""#, status: "fault")
        let t = state("twin", ts: #""2026-02-27T14:32:00.500+00:00""#, status: "operational")
        try h.feed(p); try h.feed(t)
        let e = intent()
        let (d, reason) = try judge(h, e)
        #expect(d == "blocked")
        #expect(reason.contains("drift 503 ms > 200 ms (port)"))
        #expect(reason.contains("status mismatch: physical=fault, twin=operational"))
        // Every decision is audited with the four layers; the states it rests on are its parents.
        let a = try #require(h.audits.last)
        #expect(h.audits.count == 1)
        #expect(a.decision == "block" && a.envelope == e.id && a.actor == "operator" && a.intent == "factory.crane.move_left")
        #expect(a.parents == [p.id, t.id])
        #expect(a.details["checks_failed"] == .string("temporal,status"))
        #expect(a.details["drift_ms"] == .double(503))
        #expect(a.details["device"] == .string("crane-01"))
    }

    @Test func smallDrift_equalStatus_inTolerance_isAllowed() throws {
        let h = try twin([tolerances])
        try h.feed(state("physical", ts: #""2026-02-27T14:32:01.003Z""#, values: #"{"position_x":12.5,"load_kg":2500}"#))
        try h.feed(state("twin", ts: #""2026-02-27T15:32:00.953+01:00""#, values: #"{"position_x":12.9,"load_kg":2450}"#))
        let (d, reason) = try judge(h)
        #expect(d == "allowed", "\(reason)")
        #expect(reason.contains("drift 50 ms"))
        #expect(h.audits.map(\.decision) == ["allow"])
    }

    @Test func toleranceBreach_namesTheSensorThatBrokeIt_notTheLargestDelta() throws {
        let h = try twin([tolerances])
        try h.feed(state("physical", ts: "\(craneNs)", values: #"{"position_x":12.5,"load_kg":2500,"hook_height_mm":1000}"#))
        try h.feed(state("twin", ts: "\(craneNs - 20_000_000)", values: #"{"position_x":12.5,"load_kg":3200,"hook_height_mm":9000}"#))
        let (d, reason) = try judge(h)
        #expect(d == "blocked")
        #expect(reason.contains("load_kg deviates by 700 > tolerance 100 (physical 2500, twin 3200)"))
        #expect(!reason.contains("hook_height_mm"))
        #expect(!reason.contains("position_x"))
    }

    @Test func missingValue_isADeviation_notZero() throws {
        let h = try twin([tolerances])
        try h.feed(state("physical", ts: "\(craneNs)", values: #"{"position_x":0.0,"load_kg":2500}"#))
        try h.feed(state("twin", ts: "\(craneNs)", values: #"{"load_kg":2500}"#))
        let (d, reason) = try judge(h)
        #expect(d == "blocked")
        #expect(reason.contains("position_x missing on the twin side"))
    }

    @Test func escapedStrings_decodeLikeTheirPlainForm() throws {
        let h = try twin()
        try h.feed(state("physical", ts: "\(craneNs)", status: #"\u006fperational"#))
        try h.feed(state("twin", ts: "\(craneNs)"))
        #expect(try judge(h).0 == "allowed")
    }

    @Test func identityMismatch_blocks() throws {
        let h = try twin()
        try h.feed(state("physical", ts: "\(craneNs)"))
        try h.feed(state("twin", device: "crane-01", claims: "crane-02", ts: "\(craneNs)"))
        let (d, reason) = try judge(h)
        #expect(d == "blocked")
        #expect(reason.contains("twin state claims device 'crane-02' but is filed under 'crane-01'"))
    }

    @Test func signatures_areCheckedWhenADeviceKeyIsConfigured() throws {
        let key = try SigningKey.generate(), other = try SigningKey.generate()
        let h = try twin([("devices", .object([("crane-01", .object([("public_key", .string(Hex.encode(key.publicKey)))]))]))])
        var p = state("physical", ts: "\(craneNs)"), t = state("twin", ts: "\(craneNs)")
        key.sign(&p); key.sign(&t)
        try h.feed(p); try h.feed(t)
        #expect(try judge(h).0 == "allowed")
        // A tampered payload under a valid-looking signature.
        var forged = state("twin", ts: "\(craneNs)", status: "operational")
        key.sign(&forged)
        forged.payload = Array(#"{"device_id":"crane-01","timestamp":\#(craneNs),"values":{},"status":"operational"}"#.utf8)
        try h.feed(forged)
        var (d, reason) = try judge(h)
        #expect(d == "blocked" && reason.contains("twin state signature: signature does not verify"))
        var wrong = state("twin", ts: "\(craneNs)"); other.sign(&wrong)
        try h.feed(wrong)
        (d, reason) = try judge(h)
        #expect(d == "blocked" && reason.contains("twin state signature: signed by key \(Hex.encode(other.keyID))"))
        try h.feed(state("twin", ts: "\(craneNs)"))
        (d, reason) = try judge(h)
        #expect(d == "blocked" && reason.contains("twin state signature: unsigned"))
    }

    @Test func staleState_blocks_andFutureStateToo() throws {
        // port: drift 200 ms, so max age 2000 ms by default.
        let h = try twin(wall: craneNs + 2_500_000_000)
        try h.feed(state("physical", ts: "\(craneNs)"))
        try h.feed(state("twin", ts: "\(craneNs + 100_000_000)"))
        var (d, reason) = try judge(h)
        #expect(d == "blocked")
        #expect(reason.contains("physical state stale: 2500 ms old > 2000 ms"))
        #expect(reason.contains("twin state stale: 2400 ms old > 2000 ms"))
        h.wallClockNs = craneNs - 3_000_000_000
        (d, reason) = try judge(h)
        #expect(d == "blocked" && reason.contains("physical state timestamp 3000 ms in the future"))
        h.wallClockNs = craneNs + 150_000_000
        #expect(try judge(h).0 == "allowed")
    }

    @Test func missingTwin_blocks_and_unknownDevice_blocks() throws {
        let h = try twin()
        try h.feed(state("physical", ts: "\(craneNs)"))
        var (d, reason) = try judge(h)
        #expect(d == "blocked" && reason == "blocked: no twin state")
        (d, reason) = try judge(h, intent("crane-99"))
        #expect(d == "blocked" && reason == "blocked: no physical state; no twin state")

        let closed = try twin([("devices", .object([("crane-01", .object([]))]))])
        try closed.feed(state("physical", device: "crane-07", ts: "\(craneNs)"))
        #expect(closed.deadLetters.map(\.reason) == ["physical state for unknown device 'crane-07' (not in this stage's devices)"])
        (d, reason) = try judge(closed, intent("crane-07"))
        #expect(d == "blocked" && reason.contains("unknown device 'crane-07'"))
        #expect(closed.audits.map(\.decision) == ["dead-letter", "block"])
    }

    @Test func profiles_areSelectableAndOverridablePerDevice() throws {
        let h = try twin([("profile", .string("port")), tolerances,
                          ("devices", .object([
                              ("crane-01", .object([])),
                              ("hvac-01", .object([("profile", .string("building")), ("tolerances", .object([("load_kg", .double(1000))]))])),
                              ("fab-01", .object([("profile", .string("semiconductor"))])),
                              ("crane-02", .object([("max_drift_ms", .int(600))])),
                          ]))])
        for dev in ["crane-01", "hvac-01", "fab-01", "crane-02"] {
            try h.feed(state("physical", device: dev, ts: "\(craneNs)", values: #"{"position_x":1,"load_kg":2500}"#))
            try h.feed(state("twin", device: dev, ts: "\(craneNs - 503_000_000)", values: #"{"position_x":1,"load_kg":3000}"#))
        }
        let crane = try judge(h, intent("crane-01")).1
        #expect(crane.contains("drift 503 ms > 200 ms (port)") && crane.contains("load_kg deviates by 500 > tolerance 100"))
        // building: 5000 ms drift, its own load tolerance overrides the stage's; position_x inherited.
        #expect(try judge(h, intent("hvac-01")).0 == "allowed")
        #expect(try judge(h, intent("fab-01")).1.contains("drift 503 ms > 50 ms (semiconductor)"))
        let c2 = try judge(h, intent("crane-02")).1
        #expect(!c2.contains("drift") && c2.contains("load_kg"))
    }

    @Test func unevaluableValues_blockOnSafetyCriticalProfiles_warnOnBuilding() throws {
        for (profile, expected) in [("port", "blocked"), ("building", "allowed")] {
            let h = try twin([("profile", .string(profile)), tolerances])
            try h.feed(state("physical", ts: "\(craneNs)", values: #"{"position_x":NaN,"load_kg":2500}"#))
            try h.feed(state("twin", ts: "\(craneNs)", values: #"{"position_x":12.5,"load_kg":-Infinity}"#))
            try h.feed(intent())
            let out = try #require((h.take("allowed") + h.take("blocked")).first)
            #expect(out.attrs["twin_decision"] == .string(expected))
            let text = (out.attrs["twin_reason"]?.stringValue ?? "") + (out.attrs["twin_warnings"]?.stringValue ?? "")
            #expect(text.contains("position_x cannot be evaluated: physical position_x is NaN"))
            #expect(text.contains("load_kg cannot be evaluated: twin load_kg is -Infinity"))
            #expect(h.deadLetters.isEmpty)
        }
        // A number out of Double's range is an infinity, not a crash.
        let h = try twin([tolerances])
        try h.feed(state("physical", ts: "\(craneNs)", values: #"{"position_x":1e999,"load_kg":2500}"#))
        try h.feed(state("twin", ts: "\(craneNs)"))
        #expect(try judge(h).1.contains("position_x cannot be evaluated: physical position_x is 1e999 (out of range)"))
    }

    @Test func badStates_areDeadLetteredWithReasons_andTheSlotFailsClosed() throws {
        let cases: [(String, String)] = [
            (#"{"device_id":"crane-01","timestamp":"yesterday","values":{},"status":"ok"}"#, "timestamp 'yesterday': bad year"),
            (#"{"device_id":"crane-01","timestamp":"2026-02-27T14:32:01.003","values":{},"status":"ok"}"#, "has no UTC offset"),
            (#"{"device_id":"crane-01","timestamp":"2026-02-30T14:32:01Z","values":{},"status":"ok"}"#, "day 30 out of range"),
            (#"{"device_id":"crane-01","timestamp":1.5e18,"values":{},"status":"ok"}"#, "not a non-negative integer of Unix nanoseconds"),
            (#"{"device_id":"crane-01","timestamp":-5,"values":{},"status":"ok"}"#, "not a non-negative integer"),
            (#"{"device_id":"crane-01","values":{},"status":"ok"}"#, "state has no timestamp"),
            (#"{"device_id":"crane-01","timestamp":1,"values":[1],"status":"ok"}"#, "values must be an object"),
            (#"{"device_id":"crane-01","timestamp":1,"values":{"a":1,"a":2},"status":"ok"}"#, "values has sensor 'a' twice"),
            (#"{"device_id":"crane-01","timestamp":1,"values":{},"status":"ok","status":"fault"}"#, "duplicate key 'status'"),
            (#"{"device_id":"crane-01","timestamp":1,"values":{"a":01},"status":"ok"}"#, "sensor 'a': '01' is not a number"),
            (#"not json"#, "state payload is not a JSON object"),
            (#"{"device_id":"crane-01","timestamp":1,"values":{},"status":"ok"} trailing"#, "unexpected data after the state object"),
            (#"{"device_id":7,"timestamp":1,"values":{},"status":"ok"}"#, "device_id must be a string"),
            (#"{"device_id":"crane-01","timestamp":1,"values":{},"status":"\uZZZZ"}"#, "bad \\u escape (status)"),
        ]
        for (payload, reason) in cases {
            let h = try twin()
            try h.feed(state("physical", ts: "\(craneNs)"))
            try h.feed(state("twin", ts: "\(craneNs)"))
            #expect(try judge(h).0 == "allowed")
            var bad = state("twin", ts: "0"); bad.payload = Array(payload.utf8)
            try h.feed(bad)
            let dl = try #require(h.deadLetters.last, "\(payload)")
            #expect(dl.reason.hasPrefix("twin state for 'crane-01' refused: ") && dl.reason.contains(reason), "\(dl.reason)")
            // The latest twin state is unusable: intents block until a good one comes.
            let (d, r) = try judge(h)
            #expect(d == "blocked" && r.contains("latest twin state was refused"), "\(r)")
        }
    }

    @Test func mixedOffsetAndOffsetlessTimestamps_areInputErrors() throws {
        let h = try twin()
        try h.feed(state("physical", ts: #""2026-02-27T14:32:01.003+00:00""#))
        try h.feed(state("twin", ts: #""2026-02-27T14:32:00.950""#))
        #expect(h.deadLetters.count == 1)
        #expect(h.deadLetters.first?.reason.contains("'2026-02-27T14:32:00.950': has no UTC offset") == true)
        #expect(try judge(h).0 == "blocked")
    }

    @Test func malformedEnvelopes_areDeadLettered() throws {
        let h = try twin()
        try h.feed(Envelope(actor: "x", intent: "y"))
        try h.feed(Envelope(attrs: ["twin_kind": .string("sensor"), "device": .string("crane-01")]))
        try h.feed(Envelope(attrs: ["twin_kind": .string("intent")]))
        #expect(h.deadLetters.map(\.reason) == [
            "no twin_kind attribute (expected physical, twin or intent)",
            "twin_kind is sensor, expected physical, twin or intent",
            "intent envelope has no device attribute (a non-empty string)",
        ])
        #expect(h.take("allowed").isEmpty && h.take("blocked").isEmpty)
    }

    @Test func clockFromIntent_judgesRecordedStreams_asOfTheIntent() throws {
        let h = try twin([("clock", .string("intent"))], wall: craneNs + 86_400_000_000_000)
        try h.feed(state("physical", ts: "\(craneNs)"))
        try h.feed(state("twin", ts: "\(craneNs)"))
        var e = intent(); e.ingestNs = craneNs + 10_000_000
        #expect(try judge(h, e).0 == "allowed")
        e = intent(); e.ingestNs = craneNs + 10_000_000_000
        #expect(try judge(h, e).1.contains("stale"))
    }

    @Test func status_reportsTotalsAndDevices() throws {
        let h = try twin()
        try h.feed(state("physical", ts: "\(craneNs)"))
        try h.feed(state("twin", ts: "\(craneNs)"))
        _ = try judge(h)
        _ = try judge(h, intent("crane-02"))
        try h.advance(byMs: 1000)
        #expect(h.statusReport["checks"] == .int(2))
        #expect(h.statusReport["allowed"] == .int(1))
        #expect(h.statusReport["blocked"] == .int(1))
        #expect(h.statusReport["block_rate_pct"] == .double(50))
        #expect(h.statusReport["devices"] == .int(2))
        #expect(h.statusReport["device.crane-01"] == .string("1 checks, 1 allowed, 0 blocked; last: allowed: in sync, drift 0 ms"))
    }

    @Test func config_devicesAreValidated() {
        let bad: ConfigValue = .object([("devices", .object([
            ("a", .object([("profil", .string("port"))])),
            ("b", .object([("profile", .string("harbour"))])),
            ("c", .object([("public_key", .string("abcd"))])),
            ("d", .string("port")),
        ]))])
        let r = ConfigReader(bad, fields: TwinStage.descriptor.fields)
        let messages = TwinStage.descriptor.check(r).map(\.message)
        #expect(messages.contains { $0.contains("device 'a': unknown key 'profil', did you mean 'profile'?") })
        #expect(messages.contains { $0.contains("device 'b': profile must be one of port") })
        #expect(messages.contains { $0.contains("device 'c': public_key must be 64 hex digits") })
        #expect(messages.contains { $0.contains("device 'd' must be a map") })
    }

    @Test func rfc3339_parsesOffsetsFractionsAndCalendar() throws {
        func parse(_ s: String) -> Int64? { Array(s.utf8).withUnsafeBytes { try? RFC3339.parse($0) } }
        #expect(parse("1970-01-01T00:00:00Z") == 0)
        #expect(parse("2026-02-27T14:32:01.003Z") == Int64(craneNs))
        #expect(parse("2026-02-27T16:32:01.003+02:00") == Int64(craneNs))
        #expect(parse("2026-02-27t09:02:01.003-05:30") == Int64(craneNs))
        #expect(parse("2024-02-29T00:00:00.123456789123Z") == 1_709_164_800_123_456_789)
        #expect(parse("2023-02-29T00:00:00Z") == nil)
        #expect(parse("2026-13-01T00:00:00Z") == nil)
        #expect(parse("2026-02-27T14:32:01.Z") == nil)
        #expect(parse("2026-02-27T14:32:01+0200") == nil)
        #expect(parse("1969-12-31T23:59:59Z") == nil)
        #expect(RFC3339.format(ns: Int64(craneNs)) == "2026-02-27T14:32:01.003Z")
    }

    @Test func simulator_isDeterministic_andFeedsTheTwinStage() throws {
        let dir = Paths.tempDir("twin-sim")
        let key = try SigningKey.generate()
        try KeyFiles.writeSecret(KeyFiles.hex(of: key), to: dir + "/signing.key")
        func run() throws -> (out: [Envelope], allowed: [Envelope], blocked: [Envelope]) {
            let sim = try StageHarness(TwinSimulatorStage.descriptor, config: .object([("count", .int(400)), ("devices", .int(2)), ("seed", .int(7)),
                                                                                  ("sign_key", .string("signing.key"))]), runDirectory: dir)
            sim.wallClockNs = craneNs
            #expect(try sim.produce() == .exhausted)
            let out = sim.take()
            let h = try twin([tolerances, ("devices", .object([("crane-01", .object([("public_key", .string(Hex.encode(key.publicKey)))])),
                                                                ("crane-02", .object([("public_key", .string(Hex.encode(key.publicKey)))]))]))],
                             wall: craneNs + 5_000_000)
            for e in out { try h.feed(e) }
            #expect(h.deadLetters.isEmpty)
            return (out, h.take("allowed"), h.take("blocked"))
        }
        let a = try run(), b = try run()
        #expect(a.out.count == 1200 && a.out.map(\.id) == b.out.map(\.id) && a.out.map(\.payload) == b.out.map(\.payload))
        #expect(a.allowed.count + a.blocked.count == 400)
        #expect(a.blocked.map(\.id) == b.blocked.map(\.id))
        let reasons = a.blocked.compactMap { $0.attrs["twin_reason"]?.stringValue }
        #expect(reasons.contains { $0.contains("status mismatch: physical=fault, twin=operational") })
        #expect(reasons.contains { $0.contains("drift 503 ms > 200 ms") })
        #expect(reasons.contains { $0.contains("load_kg deviates by 700 > tolerance 100") })
        #expect(!reasons.contains { $0.contains("wind_ms") || $0.contains("signature") })
        // 5% + 5% + 5% of 400 steps, give or take the seed's luck.
        #expect(a.blocked.count > 30 && a.blocked.count < 100, "\(a.blocked.count)")
    }
}
