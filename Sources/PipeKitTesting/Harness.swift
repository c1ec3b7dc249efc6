import Logging
import PipeKit

/// What a harness found left over at `finish()`: outputs nobody took and envelopes still held.
public struct Leftovers: Sendable, Equatable, CustomStringConvertible {
    public var outputs: [String: Int]
    public var held: Int
    public var isEmpty: Bool { outputs.values.allSatisfy { $0 == 0 } && held == 0 }
    public var description: String {
        isEmpty ? "nothing left over" : "left over: " + outputs.filter { $0.value > 0 }.map { "\($0.value) on \($0.key)" }.sorted().joined(separator: ", ") + (held > 0 ? ", \(held) held" : "")
    }
}

/// Runs one stage synchronously with a manual clock, the way NIO's EmbeddedChannel runs a
/// handler: `feed` envelopes, `advance` time, `take` what came out, `finish` to drain and see
/// what was left over. Audit records and dead letters are captured.
public final class StageHarness: StageContext {
    public let descriptor: StageDescriptor
    public let stage: any Stage
    public let stageID: String
    public var logger: Logger
    public private(set) var now: UInt64
    public var wallClockNs: UInt64
    public var auditLevel: AuditLevel
    public var runDirectory: String
    public var store: (any KeyValueStore)?
    let outputNames: [String]
    public private(set) var outputs: [String: [Envelope]] = [:]
    public private(set) var audits: [AuditRecord] = []
    public private(set) var deadLetters: [(envelope: Envelope, reason: String)] = []
    public private(set) var statusReport: [String: AttrValue] = [:]
    public private(set) var metrics: [String: Int] = [:]
    /// Outputs reported not writable (to test a stage's reaction to backpressure).
    public var blockedOutputs: Set<String> = []
    /// Lanes feeding each input port (default 1), as `laneCount(port:)` reports them.
    public var laneCounts: [String: Int] = [:]
    public func laneCount(port: String) -> Int { laneCounts[port] ?? 1 }
    /// As if the stage's worker had been restarted this often.
    public let restarts: Int
    /// The wire limits the stage sees (`limits:` of a pipeline).
    public var limits = WireLimits.standard
    var nextTick: UInt64?

    public init(_ descriptor: StageDescriptor, config: ConfigValue? = nil, stageID: String = "test", startNs: UInt64 = 1_000_000_000,
                auditLevel: AuditLevel = .decisions, runDirectory: String = "/tmp", store: (any KeyValueStore)? = nil,
                laneCounts: [String: Int] = [:], restarts: Int = 0) throws {
        let issues = validateConfig(config, fields: descriptor.fields)
        if !issues.isEmpty { throw StageError.halt("invalid config: " + issues.map(\.message).joined(separator: "; ")) }
        let reader = ConfigReader(config, fields: descriptor.fields)
        let more = descriptor.check(reader)
        if !more.isEmpty { throw StageError.halt("invalid config: " + more.map(\.message).joined(separator: "; ")) }
        self.descriptor = descriptor
        self.stage = try descriptor.make(reader)
        self.stageID = stageID
        self.logger = Logger(label: "harness.\(stageID)")
        self.now = startNs
        self.wallClockNs = 1_700_000_000_000_000_000
        self.auditLevel = auditLevel
        self.runDirectory = runDirectory
        self.store = store
        self.laneCounts = laneCounts
        self.restarts = restarts
        self.outputNames = descriptor.allOutputs(reader)
        try stage.start(context: self)
        if let t = stage.tickInterval { nextTick = now + t }
    }

    // MARK: StageContext
    public func output(_ name: String) throws(StageError) -> OutputHandle {
        guard let i = outputNames.firstIndex(of: name) else { throw StageError.halt("no output '\(name)'") }
        return OutputHandle(index: i, name: name)
    }
    public func emit(_ envelope: consuming Envelope, to output: OutputHandle) { outputs[output.name, default: []].append(envelope) }
    public func isWritable(_ output: OutputHandle) -> Bool { !blockedOutputs.contains(output.name) }
    public func deadLetter(_ envelope: Envelope, reason: String) {
        deadLetters.append((envelope, reason))
        audits.append(.about(envelope, decision: "dead-letter", reason: reason))
    }
    public func audit(_ record: AuditRecord) { if !record.routine || auditLevel == .all { audits.append(record) } }
    public func report(_ key: String, _ value: AttrValue) { statusReport[key] = value }
    public func count(_ metric: String, by amount: Int) { metrics[metric, default: 0] += amount }

    // MARK: driving

    /// Feeds one envelope to `port` (as if from lane `laneIndex` of that port). Stage errors are
    /// handled as the runner does: dead-letter with the reason, or rethrown for `halt`.
    public func feed(_ e: Envelope, port: String = "in", laneIndex: Int = 0, from: String = "upstream.out", loopBack: Bool = false) throws {
        let pi = descriptor.inputs.firstIndex { $0.name == port } ?? 0
        do {
            try stage.process(e, from: Arrival(port: port, portIndex: pi, laneIndex: laneIndex, from: from, loopBack: loopBack), context: self)
        } catch let se as StageError where se.action == .halt {
            throw se
        } catch {
            deadLetter(e, reason: "\(error)")
        }
    }

    /// Asks a source to produce until it is exhausted, idle, or `maxCalls` is reached.
    @discardableResult
    public func produce(budget: Int = 256, maxCalls: Int = 10_000) throws -> SourceProgress {
        guard let src = stage as? any SourceStage else { throw StageError.halt("\(descriptor.kind) is not a source") }
        var last = SourceProgress.active
        for _ in 0..<maxCalls {
            last = try src.produce(budget: budget, context: self)
            if last != .active { break }
        }
        return last
    }

    /// Moves the manual clock forward, calling `tick` at every interval that falls due.
    public func advance(byNs delta: UInt64) throws {
        let target = now + delta
        while let t = nextTick, t <= target {
            now = t
            wallClockNs += 0
            try stage.tick(context: self)
            nextTick = stage.tickInterval.map { now + $0 }
        }
        wallClockNs += target - now
        now = target
    }
    public func advance(byMs ms: UInt64) throws { try advance(byNs: ms * 1_000_000) }

    /// Takes (and clears) what the stage emitted on `output`.
    /// Returns and forgets the audit records captured so far.
    public func takeAudits() -> [AuditRecord] {
        defer { audits.removeAll(keepingCapacity: true) }
        return audits
    }

    public func take(_ output: String = "out") -> [Envelope] {
        defer { outputs[output] = [] }
        return outputs[output] ?? []
    }

    /// Drains the stage (end of stream) and reports what was left over, untaken or held.
    public func finish() throws -> Leftovers {
        try stage.drain(context: self)
        stage.stop()
        return Leftovers(outputs: outputs.mapValues(\.count), held: stage.heldCount)
    }
}

/// Runs a linear chain synchronously: each stage's `via` output feeds the next stage's `in`.
public final class ChainHarness {
    public let stages: [StageHarness]
    let via: [String]
    public init(_ stages: [StageHarness], via: [String]? = nil) {
        self.stages = stages
        self.via = via ?? Array(repeating: "out", count: stages.count)
    }
    /// Feeds the first stage and pushes everything through the chain.
    public func feed(_ e: Envelope) throws {
        try stages[0].feed(e)
        try pump()
    }
    public func pump() throws {
        for i in 0..<(stages.count - 1) {
            for e in stages[i].take(via[i]) { try stages[i + 1].feed(e) }
        }
    }
    public func advance(byMs ms: UInt64) throws {
        for s in stages { try s.advance(byMs: ms) }
        try pump()
    }
    /// What the last stage emitted.
    public func take(_ output: String = "out") -> [Envelope] { stages[stages.count - 1].take(output) }
    /// Drains every stage in order, pumping between, and sums the leftovers.
    public func finish() throws -> Leftovers {
        var total = Leftovers(outputs: [:], held: 0)
        for i in stages.indices {
            try stages[i].stage.drain(context: stages[i])
            if i + 1 < stages.count { for e in stages[i].take(via[i]) { try stages[i + 1].feed(e) } }
        }
        for s in stages {
            s.stage.stop()
            for (k, v) in s.outputs { total.outputs[s.stageID + "." + k, default: 0] += v.count }
            total.held += s.stage.heldCount
        }
        return total
    }
}
