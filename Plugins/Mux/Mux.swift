import Foundation
import PipeKit

/// `mux`: the distributor. Routes each cap to a named lane (the `lane` hint attribute, else the
/// intent's exact route, else the longest route prefix on `.` segments, else `default_lane`);
/// its lanes are its outputs. Per lane, enforced: `lane_collision_policy` with `hold_ms`,
/// `priority`, a `burst_limit` token bucket, `preemptible`; per envelope, the
/// `coffee_lane_policy` decided from its attributes (CONCEPTS.md, "mux distributor").
public final class MuxStage: Stage {
    public static let collisionPolicies = ["graceful_yield", "assert_root", "override_all", "queue", "reject"]
    static let laneKeys = ["priority", "lane_collision_policy", "hold_ms", "burst_limit", "refill_per_s", "over_burst", "preemptible"]

    public static let descriptor = StageDescriptor(
        kind: "mux",
        summary: "Mux distributor: routes caps to lanes (its outputs) by lane hint or intent (exact, longest `.` prefix, default), enforcing per lane the collision policy with hold_ms, priority, burst limit and preemptibility, and per cap the coffee-lane policy (hard_avoid never passes; offline_fallback to `offline`; polite_avoid served last).",
        role: .transform,
        inputs: [InputPort("in", doc: "caps (ranked by causal-time)")],
        outputs: { c in laneNames(c) + ["triage_reject"] },
        outputsDoc: "one per entry of `lanes`, and triage_reject",
        fields: [
            ConfigField("lanes", .map(.any),
                        doc: "Lane name -> { priority (int, higher first; default 0), lane_collision_policy (graceful_yield|assert_root|override_all|queue|reject; default queue), hold_ms (default 1000), burst_limit (tokens; 0 = unlimited), refill_per_s (default 0), over_burst (wait|triage; default wait), preemptible (default true) }."),
            ConfigField("routes", .map(.string), optional: true, doc: "Intent (exact, or a prefix of whole `.` segments) -> lane name."),
            ConfigField("default_lane", .string, optional: true, doc: "The lane for intents no route matches; without it they go to triage_reject."),
            ConfigField("root_authorities", .list(.string), optional: true, doc: "Authorities that take a lane at once under assert_root."),
            ConfigField("known_actors", .list(.string), optional: true, doc: "When given, an actor not in it gets coffee policy polite_avoid."),
            ConfigField("diff_threshold_s", .double(min: 0), default: .double(3600), doc: "sealed_at age below this (and >= 60 s) means fork_on_hop_off."),
        ],
        check: { c in checkConfig(c) },
        make: { try MuxStage(config: $0) })

    static func laneNames(_ c: ConfigReader) -> [String] { (c.value("lanes")?.mapEntries ?? []).map(\.key) }

    static func checkConfig(_ c: ConfigReader) -> [ConfigIssue] {
        var issues: [ConfigIssue] = []
        let lanes = c.value("lanes")?.mapEntries ?? []
        if lanes.isEmpty { issues.append(ConfigIssue(key: "lanes", message: "needs at least one lane")) }
        for l in lanes {
            if !isValidLaneName(l.key) || l.key == "triage_reject" || l.key == deadLetterOutput {
                issues.append(ConfigIssue(key: "lanes", message: "lane name '\(l.key)' must match [a-z0-9_-]+ and not be triage_reject or dead_letter"))
            }
            guard let m = l.value.mapEntries else { issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)' must be a mapping")); continue }
            for e in m where !laneKeys.contains(e.key) {
                issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)': unknown key '\(e.key)' (expected \(laneKeys.joined(separator: ", ")))"))
            }
            if let p = l.value["lane_collision_policy"], !(p.stringValue.map(collisionPolicies.contains) ?? false) {
                issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)': lane_collision_policy must be one of \(collisionPolicies.joined(separator: ", "))"))
            }
            if let o = l.value["over_burst"], o.stringValue != "wait" && o.stringValue != "triage" {
                issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)': over_burst must be wait or triage"))
            }
            for (k, lo, hi) in [("priority", Int64(-1_000_000), Int64(1_000_000)), ("hold_ms", 0, 86_400_000), ("burst_limit", 0, 1_000_000_000)] {
                if let v = l.value[k], !((v.intValue).map { $0 >= lo && $0 <= hi } ?? false) {
                    issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)': \(k) must be an integer from \(lo) to \(hi)"))
                }
            }
            if let v = l.value["refill_per_s"], !((v.doubleValue).map { $0 >= 0 && $0 <= 1e9 } ?? false) {
                issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)': refill_per_s must be a number from 0 to 1000000000"))
            }
            if let v = l.value["preemptible"], v.boolValue == nil { issues.append(ConfigIssue(key: "lanes", message: "lane '\(l.key)': preemptible must be true or false")) }
        }
        let names = Set(lanes.map(\.key))
        for r in c.value("routes")?.mapEntries ?? [] where !names.contains(r.value.stringValue ?? "") {
            issues.append(ConfigIssue(key: "routes", message: "route '\(r.key)' names lane '\(r.value.stringValue ?? "")', which is not in `lanes`"))
        }
        if let d = c.string("default_lane"), !names.contains(d) {
            issues.append(ConfigIssue(key: "default_lane", message: "'\(d)' is not in `lanes`"))
        }
        return issues
    }

    static func isValidLaneName(_ s: String) -> Bool {
        !s.isEmpty && s.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 || $0 == 45 }
    }

    struct Lane {
        var name: String
        var output = OutputHandle(index: 0, name: "")
        var priority: Int64
        var policy: String
        var holdNs: UInt64
        var burst: Double
        var refillPerNs: Double
        var overBurstTriage: Bool
        var preemptible: Bool
        var tokens: Double
        var lastRefill: UInt64 = 0
        var holder: String?
        var holdUntil: UInt64 = 0
        var queue: [Waiting] = []
        var released = 0, rejected = 0, preempted = 0
    }
    struct Waiting { var e: Envelope; var coffee: String; var ignoreHold: Bool; var takesLane = false }

    var lanes: [Lane] = []
    var laneIndex: [String: Int] = [:]
    let routes: [String: String]
    let defaultLane: String?
    let roots: Set<String>
    let known: Set<String>?
    let diffThresholdS: Double
    var reject = OutputHandle(index: 0, name: "triage_reject")
    var seq: Int64 = 0
    var held = 0
    var coffeeCounts: [String: Int] = [:]

    init(config c: ConfigReader) throws {
        for l in c.value("lanes")?.mapEntries ?? [] {
            let v = l.value
            let burst = Double(v["burst_limit"]?.intValue ?? 0)
            laneIndex[l.key] = lanes.count
            lanes.append(Lane(name: l.key, priority: v["priority"]?.intValue ?? 0, policy: v["lane_collision_policy"]?.stringValue ?? "queue",
                              holdNs: UInt64(max(0, v["hold_ms"]?.intValue ?? 1000)) * 1_000_000, burst: burst,
                              refillPerNs: (v["refill_per_s"]?.doubleValue ?? 0) / 1e9, overBurstTriage: v["over_burst"]?.stringValue == "triage",
                              preemptible: v["preemptible"]?.boolValue ?? true, tokens: burst))
        }
        var r: [String: String] = [:]
        for e in c.value("routes")?.mapEntries ?? [] { r[e.key] = e.value.stringValue }
        routes = r
        defaultLane = c.string("default_lane")
        roots = Set(c.strings("root_authorities") ?? [])
        known = c.strings("known_actors").map(Set.init)
        diffThresholdS = c.double("diff_threshold_s") ?? 3600
    }

    public func start(context: any StageContext) throws {
        for i in lanes.indices { lanes[i].output = try context.output(lanes[i].name); lanes[i].lastRefill = context.now }
        reject = try context.output("triage_reject")
    }

    // MARK: routing and policy

    enum Routed { case lane(Int), refused(String) }

    /// The lane hint, else the exact route, else the longest prefix of whole segments, else the default.
    func route(_ e: Envelope) -> Routed {
        if let h = e.attrs["lane"] {
            guard let hint = h.stringValue else { return .refused("lane hint \(h) is not text") }
            guard let i = laneIndex[hint] else { return .refused("lane hint '\(hint)' names no lane of this mux") }
            return .lane(i)
        }
        var intent = Substring(e.intent)
        while true {
            if let l = routes[String(intent)], let i = laneIndex[l] { return .lane(i) }
            guard let dot = intent.lastIndex(of: ".") else { break }
            intent = intent[..<dot]
        }
        if let d = defaultLane, let i = laneIndex[d] { return .lane(i) }
        return .refused("no route for intent '\(e.intent)' and no default_lane")
    }

    /// The coffee-lane policy, first match wins (the sketch's order), with the reason.
    func coffee(_ e: Envelope, nowNs: UInt64) -> (String, String) {
        if let sealed = e.attrs["sealed_at"] {
            guard let t = Self.timeNs(sealed) else { return ("hard_avoid", "sealed_at '\(sealed)' is not a time") }
            let age = (Double(nowNs) - Double(t)) / 1e9
            if age < -5 { return ("hard_avoid", String(format: "sealed %.0f s in the future", -age)) }
            if age < 60 { return ("freeze_resume", String(format: "sealed %.0f s ago (< 60 s)", age)) }
            if age < diffThresholdS { return ("fork_on_hop_off", String(format: "sealed %.0f s ago (< %.0f s)", age, diffThresholdS)) }
            if age < 86_400 { return ("rebuild", String(format: "sealed %.0f s ago (< 1 day)", age)) }
            return ("hard_avoid", String(format: "sealed %.0f s ago (over a day)", age))
        }
        if let k = known, !k.contains(e.actor) { return ("polite_avoid", "unknown actor '\(e.actor)'") }
        // Numbers may come as numbers or as text; one that cannot be read fails closed.
        func number(_ k: String) -> Double?? {
            guard let a = e.attrs[k] else { return .none }
            guard let v = a.doubleValue ?? a.stringValue.flatMap(Double.init), v.isFinite else { return .some(nil) }
            return .some(v)
        }
        switch number("trust_score") {
        case .some(.none): return ("hard_avoid", "trust_score '\(e.attrs["trust_score"]?.description ?? "")' is not a number")
        case .some(.some(let t)) where t < 0.3: return ("hard_avoid", "trust_score \(t) < 0.3")
        default: break
        }
        if case .some(.some(let f)) = number("recent_failures"), f > 3 { return ("rebuild", "recent_failures \(f) > 3") }
        if let s = e.attrs["endpoint_status"] {
            if s.stringValue == "down" { return ("offline_fallback", "endpoint down") }
            switch number("endpoint_status") {
            case .some(.some(let code)) where code >= 500: return ("offline_fallback", "endpoint status \(String(format: "%.0f", code))")
            case .some(.none): return ("offline_fallback", "endpoint status '\(s)' unreadable")
            default: break
            }
        }
        return ("sip_anyway", "")
    }

    /// An RFC 3339 time or integer nanoseconds.
    static func timeNs(_ v: AttrValue) -> UInt64? {
        if let i = v.intValue { return UInt64(clamping: i) }
        guard let s = v.stringValue, let ns = try? RFC3339.parse(s) else { return nil }
        return UInt64(clamping: ns)
    }

    // MARK: processing

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        var e = envelope
        let now = context.now
        let (policy, why) = coffee(e, nowNs: context.wallClockNs)
        coffeeCounts[policy, default: 0] += 1
        e.attrs["coffee_lane_policy"] = .string(policy)
        if !why.isEmpty { e.attrs["coffee_reason"] = .string(why) }
        if let s = e.attrs["sealed_at"], let t = Self.timeNs(s) {
            e.attrs["time_diff_s"] = .double((Double(context.wallClockNs) - Double(t)) / 1e9)
            e.attrs["diff_threshold_s"] = .double(diffThresholdS)
        }
        if e.attrs["continuation"]?.stringValue == "resume" {
            // The decided policy becomes the continuation; hard and polite avoidance do not resume.
            e.attrs["continuation"] = .string(["freeze_resume", "fork_on_hop_off", "rebuild", "offline_fallback"].contains(policy) ? policy : "receipt")
        }
        if policy == "hard_avoid" { return refuse(e, "coffee_lane_policy hard_avoid: \(why)", decision: "reject", context) }
        var li: Int
        if policy == "offline_fallback" {
            guard let o = laneIndex["offline"] else { return refuse(e, "coffee_lane_policy offline_fallback (\(why)) but this mux has no lane named offline", decision: "reject", context) }
            li = o
        } else {
            switch route(e) {
            case .lane(let i): li = i
            case .refused(let m): return refuse(e, m, decision: "reject", context)
            }
        }
        let lane = lanes[li]
        let contended = lane.holder != nil && lane.holder != e.actor && now < lane.holdUntil
        var ignoreHold = lane.policy == "queue"
        var takesLane = false
        if contended {
            let holder = lane.holder ?? ""
            let left = (lane.holdUntil - now) / 1_000_000
            switch lane.policy {
            case "reject":
                lanes[li].rejected += 1
                return refuse(e, "lane '\(lane.name)' is held by '\(holder)' for \(left) ms more (lane_collision_policy reject)", decision: "reject", context)
            case "assert_root":
                if roots.contains(e.authority) { ignoreHold = true; takesLane = true }
            case "override_all":
                if lane.preemptible {
                    ignoreHold = true; takesLane = true
                    // The previous holder's envelopes still waiting here are preempted.
                    var kept: [Waiting] = []
                    for w in lane.queue {
                        if w.e.actor == holder {
                            lanes[li].preempted += 1
                            held -= 1
                            refuse(w.e, "preempted", decision: "preempt", context, details: ["by_actor": .string(e.actor), "lane": .string(lane.name)])
                        } else { kept.append(w) }
                    }
                    lanes[li].queue = kept
                    lanes[li].holder = e.actor
                    lanes[li].holdUntil = now &+ lane.holdNs
                } else {
                    ignoreHold = true   // waits its turn as under `queue`
                    context.audit(.about(e, decision: "override-refused", reason: "override_all refused: lane '\(lane.name)' is not preemptible; waits as under queue",
                                         details: ["lane": .string(lane.name), "holder": .string(holder)]))
                    context.count("override_refused")
                }
            default: break   // graceful_yield, queue: wait (or, for queue, ignore the hold)
            }
        }
        let w = Waiting(e: e, coffee: policy, ignoreHold: ignoreHold, takesLane: takesLane)
        if takesLane {
            // Taking the lane means going ahead of those waiting for it (after earlier takers).
            let at = lanes[li].queue.firstIndex { !$0.takesLane } ?? lanes[li].queue.count
            lanes[li].queue.insert(w, at: at)
        } else {
            lanes[li].queue.append(w)
        }
        held += 1
        dispatch(context)
    }

    func refuse(_ e: Envelope, _ reason: String, decision: String, _ context: any StageContext, details: [String: AttrValue] = [:]) {
        var t = e
        t.attrs["triage_reason"] = .string(reason)
        var d = details; d["stage_kind"] = .string("mux")
        context.audit(.about(e, decision: decision, reason: reason, details: d))
        context.count("refused")
        context.emit(t, to: reject)
    }

    /// Whether lane `i`'s head may go now (hold, tokens, room downstream). A head over its burst
    /// with `over_burst: triage` is refused here.
    func ready(_ i: Int, now: UInt64, context: any StageContext, force: Bool = false) -> Bool {
        while let w = lanes[i].queue.first {
            refill(i, now: now)
            if lanes[i].burst > 0 && lanes[i].tokens < 1 {
                guard lanes[i].overBurstTriage else { return false }
                lanes[i].queue.removeFirst(); held -= 1
                refuse(w.e, "over burst_limit \(Int(lanes[i].burst)) on lane '\(lanes[i].name)' (refill \(lanes[i].refillPerNs * 1e9)/s)", decision: "reject", context)
                continue
            }
            let l = lanes[i]
            if force { return true }
            if !w.ignoreHold, let h = l.holder, h != w.e.actor, now < l.holdUntil { return false }
            return context.isWritable(l.output)
        }
        return false
    }

    func refill(_ i: Int, now: UInt64) {
        guard lanes[i].burst > 0, lanes[i].refillPerNs > 0 else { return }
        let dt = Double(now &- lanes[i].lastRefill)
        lanes[i].tokens = min(lanes[i].burst, lanes[i].tokens + dt * lanes[i].refillPerNs)
        lanes[i].lastRefill = now
    }

    /// Releases heads while any lane is ready: the highest priority first, polite_avoid heads
    /// only when no other lane is ready.
    func dispatch(_ context: any StageContext, force: Bool = false) {
        let now = context.now
        while true {
            var best = -1, bestPolite = true
            for i in lanes.indices where ready(i, now: now, context: context, force: force) {
                let polite = lanes[i].queue.first?.coffee == "polite_avoid"
                if best < 0 || (bestPolite && !polite) || (polite == bestPolite && lanes[i].priority > lanes[best].priority) {
                    best = i; bestPolite = polite
                }
            }
            guard best >= 0 else { return }
            release(best, now: now, context: context)
        }
    }

    func release(_ i: Int, now: UInt64, context: any StageContext) {
        var w = lanes[i].queue.removeFirst()
        held -= 1
        if lanes[i].burst > 0 { lanes[i].tokens -= 1 }
        if lanes[i].policy != "queue" { lanes[i].holder = w.e.actor; lanes[i].holdUntil = now &+ lanes[i].holdNs }
        lanes[i].released += 1
        seq += 1
        let l = lanes[i]
        w.e.lane = l.name
        w.e.attrs["lane_class"] = .string(l.name)
        w.e.attrs["lane_collision_policy"] = .string(l.policy)
        w.e.attrs["lane_priority"] = .int(l.priority)
        w.e.attrs["preemptible"] = .bool(l.preemptible)
        w.e.attrs["mux_seq"] = .int(seq)
        if context.auditLevel == .all {
            context.audit(.about(w.e, decision: "route", reason: "lane \(l.name)", details: ["coffee_lane_policy": .string(w.coffee)], routine: true))
        }
        context.emit(w.e, to: l.output)
    }

    /// Caps waiting for a burst token that can never come (no refill, bucket empty) are not
    /// counted as held: a loop through the mux can then close, and drain refuses them with the
    /// reason. Everything else waiting is held (it will go).
    public var heldCount: Int {
        var parked = 0
        for l in lanes where l.burst > 0 && l.refillPerNs == 0 && l.tokens < 1 { parked += l.queue.count }
        return held - parked
    }
    public var tickInterval: UInt64? { 5_000_000 }
    public func tick(context: any StageContext) throws {
        dispatch(context)
        report(context)
    }

    /// End of stream: contention is over, so holds no longer apply, and everything goes in
    /// priority order; what waits for a token that will never come (no refill) is refused with
    /// the reason rather than held for ever.
    public func drain(context: any StageContext) throws {
        dispatch(context, force: true)
        for i in lanes.indices {
            for w in lanes[i].queue {
                refuse(w.e, "end of stream: still waiting for a burst token on lane '\(lanes[i].name)'", decision: "reject", context)
            }
            held -= lanes[i].queue.count
            lanes[i].queue.removeAll()
        }
        report(context)
    }

    func report(_ c: any StageContext) {
        c.report("held", .int(Int64(held)))
        for l in lanes {
            c.report("lane.\(l.name)", .string("released \(l.released), waiting \(l.queue.count), holder \(l.holder ?? "-"), rejected \(l.rejected), preempted \(l.preempted)"
                                              + (l.burst > 0 ? String(format: ", tokens %.1f", l.tokens) : "")))
        }
        for (k, v) in coffeeCounts.sorted(by: { $0.key < $1.key }) { c.report("coffee.\(k)", .int(Int64(v))) }
    }
}
