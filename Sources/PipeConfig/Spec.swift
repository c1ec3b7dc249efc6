import PipeKit

/// A position in a pipeline file (1-based).
public struct SourcePos: Sendable, Hashable, Comparable {
    public var line: Int
    public var column: Int
    public init(line: Int, column: Int) { self.line = line; self.column = column }
    public static let start = SourcePos(line: 1, column: 1)
    public static func < (a: SourcePos, b: SourcePos) -> Bool { (a.line, a.column) < (b.line, b.column) }
}

/// One problem in a pipeline file, printed as `file:line:column: message`.
public struct Diagnostic: Sendable, Hashable, CustomStringConvertible, Error {
    public var file: String
    public var pos: SourcePos
    public var message: String
    public init(file: String, pos: SourcePos, message: String) { self.file = file; self.pos = pos; self.message = message }
    public var description: String { "\(file):\(pos.line):\(pos.column): \(message)" }
}

/// Where a stage runs. One type for all three forms (ARCHITECTURE.md, "Placement").
public enum Placement: Sendable, Hashable, CustomStringConvertible {
    /// A thread in the host; lanes over `inproc://`.
    case inProcess
    /// A child worker process spawned and supervised by the host; lanes over `ipc://`.
    case process
    /// A remote worker that connects in over `tcp://` (the distributed issue).
    case worker(String)

    public var description: String {
        switch self { case .inProcess: return "in-process"; case .process: return "process"; case .worker(let n): return "worker:\(n)" }
    }
    /// Whether the stage runs on a remote worker (lanes over tcp).
    public var isRemote: Bool { if case .worker = self { return true }; return false }
    /// The remote worker's name, if any.
    public var workerName: String? { if case .worker(let n) = self { return n }; return nil }
}

/// What a full lane does to its producer.
public enum WhenFull: String, Sendable, Hashable, CaseIterable {
    case block
    case dropNewest = "drop_newest"
    case dropOldest = "drop_oldest"
    case spill
}

/// Bound, policy and watermarks of a lane.
public struct LaneSettings: Sendable, Hashable {
    /// Most envelopes in flight on the lane (credits).
    public var bound: Int
    public var whenFull: WhenFull
    /// Most bytes (encoded envelopes) in flight, when set.
    public var bytes: Int?
    /// Watermarks in envelopes of depth (CONCEPTS.md, "backpressure watermarks"); nil: derived
    /// from the bound (low 50%, high 80%, release midway).
    public var low: Int?
    public var high: Int?
    public var release: Int?
    public init(bound: Int = 1024, whenFull: WhenFull = .block, bytes: Int? = nil, low: Int? = nil, high: Int? = nil, release: Int? = nil) {
        self.bound = bound; self.whenFull = whenFull; self.bytes = bytes; self.low = low; self.high = high; self.release = release
    }
    /// The watermarks in force: given ones, else derived from the bound.
    public var marks: (low: Int, high: Int, release: Int) {
        let h = high ?? max(1, bound * 8 / 10)
        let l = min(low ?? max(0, bound / 2), max(0, h - 1))
        return (l, h, release ?? (l + h + 1) / 2)
    }
    /// Why these settings are inconsistent, or nil.
    public var problem: String? {
        if let b = bytes, b < 1 { return "bytes must be at least 1" }
        let m = marks
        if let h = high, h > bound { return "high watermark \(h) is above the bound \(bound)" }
        if let l = low, l >= m.high { return "low watermark \(l) must be below the high watermark \(m.high)" }
        if let r = release, r < m.low || r > m.high { return "release mark \(r) must lie between low \(m.low) and high \(m.high)" }
        return nil
    }
    /// These settings with the fields `patch` sets replaced.
    public func applying(_ patch: LanePatch) -> LaneSettings {
        var s = self
        if let v = patch.bound { s.bound = v }
        if let v = patch.whenFull { s.whenFull = v }
        if let v = patch.bytes { s.bytes = v }
        if let v = patch.low { s.low = v }
        if let v = patch.high { s.high = v }
        if let v = patch.release { s.release = v }
        return s
    }
}

/// Lane settings as written (every field optional): `defaults.lane` and `lanes:` overrides.
public struct LanePatch: Sendable, Hashable {
    public var bound: Int?
    public var whenFull: WhenFull?
    public var bytes: Int?
    public var low: Int?
    public var high: Int?
    public var release: Int?
    public init(bound: Int? = nil, whenFull: WhenFull? = nil, bytes: Int? = nil, low: Int? = nil, high: Int? = nil, release: Int? = nil) {
        self.bound = bound; self.whenFull = whenFull; self.bytes = bytes; self.low = low; self.high = high; self.release = release
    }
    public static let keys = ["bound", "when_full", "bytes", "low", "high", "release"]
}

/// One input reference: `stage` or `stage.output`, feeding `port`.
public struct InputRef: Sendable, Hashable {
    public var port: String
    public var stage: String
    /// nil: the producing stage's default (first) output.
    public var output: String?
    /// A declared loop-back edge, with its hop limit.
    public var loopBack: Bool
    public var maxHops: Int?
    public var pos: SourcePos
    public init(port: String, stage: String, output: String?, loopBack: Bool = false, maxHops: Int? = nil, pos: SourcePos = .start) {
        self.port = port; self.stage = stage; self.output = output; self.loopBack = loopBack; self.maxHops = maxHops; self.pos = pos
    }
    public var text: String { output.map { "\(stage).\($0)" } ?? stage }
}

/// One stage as written in the file.
public struct StageSpec: Sendable, Hashable {
    public var id: String
    public var kind: String
    public var config: ConfigValue?
    public var inputs: [InputRef]
    /// nil: the pipeline default.
    public var placement: Placement?
    public var replicas: Int
    public var pos: SourcePos
    public var kindPos: SourcePos
    /// Positions of config keys, for diagnostics.
    public var configKeyPos: [String: SourcePos]
    public var configPos: SourcePos
    public init(id: String, kind: String, config: ConfigValue? = nil, inputs: [InputRef] = [], placement: Placement? = nil,
                replicas: Int = 1, pos: SourcePos = .start, kindPos: SourcePos = .start, configKeyPos: [String: SourcePos] = [:],
                configPos: SourcePos = .start) {
        self.id = id; self.kind = kind; self.config = config; self.inputs = inputs; self.placement = placement
        self.replicas = replicas; self.pos = pos; self.kindPos = kindPos; self.configKeyPos = configKeyPos; self.configPos = configPos
    }
}

/// A `lanes:` override: settings for the lane(s) from `from` (stage or stage.output) to `to` (stage or stage.port).
public struct LaneOverride: Sendable, Hashable {
    public var from: String
    public var to: String
    public var patch: LanePatch
    public var pos: SourcePos
    public var bound: Int? { patch.bound }
    public var whenFull: WhenFull? { patch.whenFull }
}

/// `metrics:`: the optional Prometheus endpoint.
public struct MetricsSpec: Sendable, Hashable {
    /// `HOST:PORT` to listen on (loopback unless the operator says otherwise).
    public var listen: String
    public var host: String
    public var port: Int
    public init(listen: String, host: String, port: Int) { self.listen = listen; self.host = host; self.port = port }
}

/// Where and how the hash-chained audit log is kept (`audit:` in the YAML; docs/audit-log.md).
public struct AuditLogSpec: Sendable, Hashable {
    /// The SQLite log; relative paths against the run directory.
    public var path: String = "audit.db"
    /// The Ed25519 key that signs checkpoints (a `pipehost keygen` file); relative paths against
    /// the run directory, created there (mode 0600) when it is the default and missing.
    public var key: String = "audit.key"
    public var keyIsDefault = true
    public var checkpointEvery: Int = 10_000
    public var checkpointIntervalS: Double = 10
    public init() {}
}

/// `delivery:` in the YAML (docs/delivery.md): whether envelopes are acknowledged end to end.
public struct DeliverySpec: Sendable, Hashable {
    public enum Mode: String, Sendable, Hashable, CaseIterable {
        /// Nothing is acknowledged; a crashed worker loses what it held (the default).
        case atMostOnce = "at-most-once"
        /// Sources keep every envelope until every sink it reaches has it; sinks deduplicate.
        case atLeastOnce = "at-least-once"
    }
    public var mode: Mode = .atMostOnce
    /// A source sends an envelope again when it is not acknowledged within this time.
    public var ackTimeoutMs: Int = 10_000
    /// A source takes a break from producing while this many envelopes are unacknowledged.
    public var maxPending: Int = 65_536
    /// After this many attempts an envelope is dead-lettered as undeliverable.
    public var maxAttempts: Int = 10
    /// How many recent envelope ids each sink remembers to drop redeliveries.
    public var dedupWindow: Int = 200_000
    public init() {}
    public static let keys = ["mode", "ack_timeout_ms", "max_pending", "max_attempts", "dedup_window"]
}

/// `remote:`: where remote workers connect in, how they are authenticated, and who they are
/// (docs/operations.md, "Remote workers").
public struct RemoteSpec: Sendable, Hashable {
    /// One allowed worker: its name (what `placement: { worker: NAME }` says) and CURVE public key.
    public struct WorkerKey: Sendable, Hashable {
        public var name: String
        /// A Z85 public key, or the path of a `curve.pub` file (relative to the pipeline file);
        /// empty: the worker is admitted only with a grant from an owner.
        public var key: String
        public var pos: SourcePos
        public init(name: String, key: String, pos: SourcePos) { self.name = name; self.key = key; self.pos = pos }
    }
    /// `tcp://HOST:PORT`: the registration and control endpoint workers connect to.
    public var listen: String = ""
    public var listenHost: String = ""
    public var listenPort: Int = 0
    /// The address workers reach the host's lane endpoints at (default: the listen host).
    public var advertise: String?
    /// The host's CURVE secret key file (`curve.key` from `pipehost keygen`).
    public var key: String?
    /// Plaintext tcp, no authentication (a warning at start).
    public var insecure = false
    /// How long the host waits for a worker to come (its stages wait meanwhile).
    public var workerWaitSeconds: Double = 120
    /// A stage is `down` when its runner has been silent this long.
    public var downAfterMs: Int = 3000
    public var workers: [WorkerKey] = []
    /// Owner keys whose grants the host accepts (hex Ed25519 public keys or `signing.pub` paths).
    public var owners: [String] = []
    /// Where the highest grant epoch seen per worker key is kept (relative: the run directory).
    public var grantEpochs = "grant-epochs.sqlite"
    /// `tcp://HOST:PORT` for remote `pipectl` (CURVE; read-only commands), and who may use it.
    public var control: String?
    public var operators: [WorkerKey] = []
    public var pos: SourcePos = .start
    public init() {}
    public static let keys = ["listen", "advertise", "key", "insecure", "worker_wait_s", "down_after_ms", "workers", "owners", "grant_epochs", "control", "operators"]
    /// The host part workers connect to for lanes.
    public var laneHost: String { advertise ?? listenHost }
}

/// A parsed pipeline file.
public struct PipelineSpec: Sendable, Hashable {
    public var file: String
    public var name: String
    public var audit: AuditLevel
    public var auditLog = AuditLogSpec()
    /// Where dead letters go: a JSONL file, relative paths against the run directory.
    public var deadLetterPath: String
    public var defaultPlacement: Placement
    public var defaultLane: LaneSettings
    public var limits: WireLimits
    public var stages: [StageSpec]
    public var lanes: [LaneOverride]
    public var metrics: MetricsSpec?
    public var delivery = DeliverySpec()
    public var remote: RemoteSpec?
    public init(file: String, name: String, audit: AuditLevel = .decisions, deadLetterPath: String = "dead-letters.jsonl",
                defaultPlacement: Placement = .inProcess, defaultLane: LaneSettings = LaneSettings(),
                limits: WireLimits = .standard, stages: [StageSpec] = [], lanes: [LaneOverride] = []) {
        self.file = file; self.name = name; self.audit = audit; self.deadLetterPath = deadLetterPath
        self.defaultPlacement = defaultPlacement; self.defaultLane = defaultLane; self.limits = limits
        self.stages = stages; self.lanes = lanes
    }
}

/// Names per CONCEPTS.md: `[a-z0-9_-]+`.
public func isValidName(_ s: String) -> Bool {
    !s.isEmpty && s.utf8.allSatisfy { ($0 >= 97 && $0 <= 122) || ($0 >= 48 && $0 <= 57) || $0 == 95 || $0 == 45 }
}
