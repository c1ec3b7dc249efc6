import Logging

/// What a stage is: a source (no inputs), a transform, or a sink (no outputs).
public enum StageRole: String, Sendable, Hashable { case source, transform, sink }

/// A named input port. Most stages have one (`in`); the slot injector has `in` and `feedback`.
public struct InputPort: Sendable, Hashable {
    public var name: String
    public var doc: String
    /// Whether an edge into this port may be declared a loop-back (closing a cycle).
    public var acceptsLoopBack: Bool
    public init(_ name: String, doc: String, acceptsLoopBack: Bool = false) {
        self.name = name; self.doc = doc; self.acceptsLoopBack = acceptsLoopBack
    }
}

/// Where an envelope came from: the port, and which lane of that port (a PULL socket hides the
/// sender; frames name their lane so stages like the aligner can tell inputs apart).
public struct Arrival: Sendable, Hashable {
    public var port: String
    public var portIndex: Int
    /// Index of the lane among the lanes feeding `port` (in declaration order).
    public var laneIndex: Int
    /// The producing `stage.output`.
    public var from: String
    /// Whether the lane is a declared loop-back.
    public var loopBack: Bool
    /// How the lane travels: `inproc`, `ipc` or `tcp`.
    public var transport: String
    public init(port: String, portIndex: Int = 0, laneIndex: Int = 0, from: String = "", loopBack: Bool = false, transport: String = "inproc") {
        self.port = port; self.portIndex = portIndex; self.laneIndex = laneIndex; self.from = from; self.loopBack = loopBack
        self.transport = transport
    }
}

/// A stage's named output, resolved once (``StageContext/output(_:)``) and then used by index.
public struct OutputHandle: Sendable, Hashable {
    public let index: Int
    public let name: String
    public init(index: Int, name: String) { self.index = index; self.name = name }
}

/// The name of the implicit output every stage has.
public let deadLetterOutput = "dead_letter"

/// Whether routine routing is audited (`audit: all`) or only decisions (`audit: decisions`).
public enum AuditLevel: String, Sendable, Hashable { case all, decisions }

/// A stage's whole room: everything it may touch. Implemented by the runtime's runners and by
/// PipeKitTesting's harness. Called only from the stage's own thread.
public protocol StageContext: AnyObject {
    /// The stage instance id (e.g. `pass`, or `pass.1` for replicas).
    var stageID: String { get }
    var logger: Logger { get }
    /// The stage clock in nanoseconds (monotonic in production, manual in tests).
    var now: UInt64 { get }
    /// Wall-clock time in ns since the Unix epoch (manual in tests).
    var wallClockNs: UInt64 { get }
    var auditLevel: AuditLevel { get }
    /// The run directory; stages resolve relative file paths against it.
    var runDirectory: String { get }
    /// The durable key-value store, when the descriptor asked for one.
    var store: (any KeyValueStore)? { get }
    /// Resolves an output name (including `dead_letter`); throws for a name the stage does not have.
    func output(_ name: String) throws(StageError) -> OutputHandle
    /// Emits to an output. Never blocks: the runner stops feeding the stage while a blocking
    /// output is not writable.
    func emit(_ envelope: consuming Envelope, to output: OutputHandle)
    /// False while the output's lanes have no room (credits); a stage may choose to hold or shed.
    func isWritable(_ output: OutputHandle) -> Bool
    /// Sends the envelope to `dead_letter` with its reason (counted and audited).
    func deadLetter(_ envelope: Envelope, reason: String)
    /// Records a decision (see ``AuditRecord``).
    func audit(_ record: AuditRecord)
    /// Sets one figure of the stage's status report (`pipectl status`).
    func report(_ key: String, _ value: AttrValue)
    /// Adds to a named stage metric.
    func count(_ metric: String, by amount: Int)
    /// How many lanes feed input `port` (a merging stage, like the aligner, waits for each).
    func laneCount(port: String) -> Int
    /// How often this stage's worker was restarted before this incarnation (0: the first). A sink
    /// that truncates its output at start keeps it on a restart.
    var restarts: Int { get }
    /// The pipeline's wire limits (`limits:` in YAML): a source that parses envelopes checks them
    /// where it can name the bad input (a file and line), not only when it emits.
    var limits: WireLimits { get }
}

extension StageContext {
    public func count(_ metric: String) { count(metric, by: 1) }
    public func laneCount(port: String) -> Int { 1 }
    public var restarts: Int { 0 }
    public var limits: WireLimits { .standard }
    /// `path` if absolute, else resolved against the run directory.
    public func resolvePath(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        return runDirectory.hasSuffix("/") ? runDirectory + path : runDirectory + "/" + path
    }
}

/// A durable key-value store (SQLite-backed in production).
public protocol KeyValueStore: AnyObject {
    func get(_ key: String) throws -> [UInt8]?
    func put(_ key: String, _ value: [UInt8]) throws
    func delete(_ key: String) throws
    func keys(prefix: String) throws -> [String]
    /// Writes and deletes together, all or nothing (one transaction where the store has them).
    func batch(put: [(String, [UInt8])], delete: [String]) throws
}

extension KeyValueStore {
    public func batch(put: [(String, [UInt8])], delete: [String]) throws {
        for (k, v) in put { try self.put(k, v) }
        for k in delete { try self.delete(k) }
    }
}

/// What a stage error asks the runner to do.
public struct StageError: Error, Sendable, CustomStringConvertible {
    public enum Action: Sendable, Equatable {
        /// Try the envelope again (up to the runner's retry limit, then dead-letter).
        case retry
        /// Dead-letter the envelope with the reason and go on.
        case deadLetter
        /// Stop the stage (and so the pipeline) with the reason.
        case halt
    }
    public var action: Action
    public var reason: String
    public init(_ action: Action, _ reason: String) { self.action = action; self.reason = reason }
    public static func deadLetter(_ reason: String) -> StageError { StageError(.deadLetter, reason) }
    public static func halt(_ reason: String) -> StageError { StageError(.halt, reason) }
    public static func retry(_ reason: String) -> StageError { StageError(.retry, reason) }
    public var description: String { reason }
}

/// The runtime half of a stage. One thread per instance: state needs no locks.
/// Every method has a default, so a stage writes only what it changes.
public protocol Stage: AnyObject {
    /// Called once on the stage's thread before anything else.
    func start(context: any StageContext) throws
    /// Handles one envelope.
    func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws
    /// How often `tick` is wanted, in ns; nil for never.
    var tickInterval: UInt64? { get }
    func tick(context: any StageContext) throws
    /// End of stream on every input: flush what is held, write what is buffered.
    func drain(context: any StageContext) throws
    /// Envelopes held inside the stage (counted as in flight for end-of-stream decisions).
    var heldCount: Int { get }
    /// Called once when the stage is torn down (after drain, or on abort).
    func stop()
    /// Makes durable what `process` has taken so far (a sink's buffered writes). Under
    /// `delivery: at-least-once` the runner calls it before it acknowledges those envelopes
    /// upstream (docs/delivery.md); a failure holds the acknowledgements back.
    func commit(context: any StageContext) throws
    /// For a sink under at-least-once delivery: ids of envelopes its own output already holds (the
    /// newest `limit` of them), read back at start so a redelivery after a crash is not written
    /// twice. nil: the sink keeps no such record and the runner keeps the window in SQLite;
    /// `[]`: nothing to recover (an empty or truncated output, or a sink whose duplicates cost nothing).
    func deliveredIDs(limit: Int, context: any StageContext) throws -> [EnvelopeID]?
}

extension Stage {
    public func start(context: any StageContext) throws {}
    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {}
    public var tickInterval: UInt64? { nil }
    public func tick(context: any StageContext) throws {}
    public func drain(context: any StageContext) throws {}
    public var heldCount: Int { 0 }
    public func stop() {}
    public func commit(context: any StageContext) throws {}
    public func deliveredIDs(limit: Int, context: any StageContext) throws -> [EnvelopeID]? { nil }
}

/// What a source's `produce` call achieved.
public enum SourceProgress: Sendable, Equatable {
    /// Emitted something; call again when the outputs are writable.
    case active
    /// Nothing available now; call again after `afterNs` (or when woken).
    case idle(afterNs: UInt64)
    /// Nothing more will ever come.
    case exhausted
}

/// A stage with no inputs that produces envelopes.
public protocol SourceStage: Stage {
    /// Emits at most `budget` envelopes.
    func produce(budget: Int, context: any StageContext) throws -> SourceProgress
    /// Graceful stop requested (SIGTERM): stop producing; the next `produce` should say exhausted.
    func requestStop()
}

extension SourceStage {
    public func requestStop() {}
}

/// A source that can say where it is and go on from there. With `durable: true` in its config the
/// runner journals every envelope it emits, with this position, to SQLite before sending it, and
/// a restart with the same run directory re-sends what was not acknowledged and resumes
/// (docs/delivery.md).
public protocol ResumableSource: SourceStage {
    /// Whether the configuration asked for a journal (`durable: true`).
    var durable: Bool { get }
    /// Everything needed to go on after the last envelope emitted so far.
    func position() -> [UInt8]
    /// Goes on from a saved position (called after `start`, before the first `produce`).
    func resume(from position: [UInt8]) throws
}

/// Everything the host and tools know about a stage kind: the config half. Validated without
/// resources; `make` builds the runtime half from a valid configuration.
public struct StageDescriptor: Sendable {
    /// Kebab-case kind name used in YAML.
    public let kind: String
    public let summary: String
    public let role: StageRole
    public let inputs: [InputPort]
    /// Output names as a function of the validated configuration (the mux's outputs are its lanes).
    public let outputs: @Sendable (ConfigReader) -> [String]
    /// How outputs are computed, for docs (e.g. "out", or "one per entry of `lanes`").
    public let outputsDoc: String
    public let fields: [ConfigField]
    /// Whether the stage gets a durable key-value store.
    public let usesStore: Bool
    /// Whether only a remote worker can run the stage (its code is not in this binary: `external`).
    public let remoteOnly: Bool
    /// Extra validation across fields (nil when fine); runs after field checks pass.
    public let check: @Sendable (ConfigReader) -> [ConfigIssue]
    public let make: @Sendable (ConfigReader) throws -> any Stage

    public init(kind: String, summary: String, role: StageRole, inputs: [InputPort] = [InputPort("in", doc: "envelopes to handle")],
                outputs: @escaping @Sendable (ConfigReader) -> [String] = { _ in ["out"] }, outputsDoc: String = "out",
                fields: [ConfigField] = [], usesStore: Bool = false, remoteOnly: Bool = false,
                check: @escaping @Sendable (ConfigReader) -> [ConfigIssue] = { _ in [] },
                make: @escaping @Sendable (ConfigReader) throws -> any Stage) {
        self.kind = kind; self.summary = summary; self.role = role
        self.inputs = role == .source ? [] : inputs
        if role == .sink {
            self.outputs = { _ in [] }
            self.outputsDoc = "(none)"
        } else {
            self.outputs = outputs
            self.outputsDoc = outputsDoc
        }
        self.fields = fields; self.usesStore = usesStore; self.remoteOnly = remoteOnly; self.check = check; self.make = make
    }

    /// The stage's outputs for `config`, plus the implicit `dead_letter`.
    public func allOutputs(_ config: ConfigReader) -> [String] { outputs(config) + [deadLetterOutput] }
}
