import Dispatch
import Foundation
import PipeKit
import PipeSeal
import Synchronization

/// The single batched writer of a host's audit log. Producers (the host's control loop, which
/// receives every runner's AUDIT frames, and the host's own decisions) hand it bytes; its thread
/// validates each record, appends whatever is waiting as one transaction, and signs checkpoints
/// every `checkpointEvery` records or `checkpointInterval` and at close.
///
/// When an append fails (disk full, I/O error) the records stay queued and are retried; the head
/// does not move, so the chain never forks. Past `maxPendingRecords` the writer reports `failed`
/// and the host stops the pipeline: decisions that cannot be audited must not go on being made.
public final class AuditWriter: @unchecked Sendable {
    // @unchecked: `log`, `held` and `bodies` are touched only by the writer thread (and by
    // init/close before it starts and after it has finished); everything shared is in `state`.
    public struct Settings: Sendable {
        public var path: String
        public var pipeline: String
        public var signer: SigningKey?
        public var checkpointEvery: Int
        public var checkpointIntervalNs: UInt64
        public var maxPendingRecords: Int
        public var location: String
        public init(path: String, pipeline: String, signer: SigningKey?, checkpointEvery: Int = 10_000,
                    checkpointIntervalNs: UInt64 = 10_000_000_000, maxPendingRecords: Int = 1_000_000, location: String = "host") {
            self.path = path; self.pipeline = pipeline; self.signer = signer; self.checkpointEvery = checkpointEvery
            self.checkpointIntervalNs = checkpointIntervalNs; self.maxPendingRecords = maxPendingRecords; self.location = location
        }
    }

    public struct Stats: Sendable, Equatable {
        public var appended = 0
        public var refused = 0
        public var pending = 0
        public var checkpoints = 0
        public var headSeq: Int64 = 0
        public var checkpointSeq: Int64 = 0
        public var failedAppends = 0
        public var lastError: String?
        public var failed = false
        /// The last checkpoint failure (kept after later appends succeed).
        public var checkpointError: String?
        public init() {}
    }

    /// Bytes copied once on submit and freed after their records commit; the writer appends
    /// straight from them (no second copy), so their address must not move: manual allocation.
    final class Bytes: @unchecked Sendable {
        let p: UnsafeMutableRawBufferPointer
        init(_ src: UnsafeRawBufferPointer) {
            p = .allocate(byteCount: max(1, src.count), alignment: 8)
            if let b = src.baseAddress { p.baseAddress?.copyMemory(from: b, byteCount: src.count) }
            count = src.count
        }
        let count: Int
        var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: p.baseAddress, count: count) }
        deinit { p.deallocate() }
    }
    struct Item { var stage: String?; var frame: Bytes; var count: Int }
    struct State {
        var queue: [Item] = []
        var stopping = false
        var stats = Stats()
    }

    public let settings: Settings
    let log: AuditLog
    let state: Mutex<State>
    let wake = DispatchSemaphore(value: 0)
    let done = DispatchSemaphore(value: 0)
    static let maxBatchRecords = 8192
    /// The staged batch: record bodies pointing into `held`.
    var held: [Bytes] = []
    var bodies: [UnsafeRawBufferPointer] = []
    var lastCheckpointNs: UInt64 = 0
    var started = false

    /// Opens (or creates) the log; errors (another pipeline's log, a broken chain, an unreadable
    /// file) surface here, before the pipeline starts.
    public init(_ settings: Settings) throws(AuditError) {
        self.settings = settings
        log = try AuditLog(path: settings.path, pipeline: settings.pipeline, signer: settings.signer)
        var s = Stats()
        s.headSeq = log.headSeq; s.checkpointSeq = log.checkpointSeq; s.checkpoints = log.checkpointCount
        state = Mutex(State(stats: s))
    }

    /// Starts the writer thread.
    public func start() {
        guard !started else { return }
        started = true
        lastCheckpointNs = Self.nowNs()
        let t = Thread { [self] in run(); done.signal() }
        t.name = "audit-writer"
        t.start()
    }

    /// Queues an AUDIT frame body (entries of `u32` length + record body) from `stage`; each
    /// record's `stage` field must name the sender. Copies the bytes. Returns how many records
    /// the frame holds (1 for a frame that does not split: it becomes one refusal).
    @discardableResult
    public func submit(frame: UnsafeRawBufferPointer, from stage: String) -> Int {
        let n = AuditCodec.entryCount(frame) ?? 1
        enqueue(Item(stage: stage, frame: Bytes(frame), count: n))
        return n
    }

    /// Queues one record made by the host itself.
    public func submit(_ record: AuditRecord) {
        var r = record
        if r.location.isEmpty { r.location = settings.location }
        if r.timeNs == 0 { r.timeNs = Self.nowNs() }
        var f: [UInt8] = []
        AuditCodec.appendEntry(r, into: &f)
        enqueue(Item(stage: nil, frame: f.withUnsafeBytes { Bytes($0) }, count: 1))
    }

    func enqueue(_ item: Item) {
        let wasEmpty = state.withLock { s in
            let e = s.queue.isEmpty
            s.queue.append(item)
            s.stats.pending += item.count
            if s.stats.pending > settings.maxPendingRecords { s.stats.failed = true }
            return e
        }
        if wasEmpty { wake.signal() }
    }

    public var stats: Stats { state.withLock { $0.stats } }

    /// Drains everything queued, signs a final checkpoint and stops the thread.
    @discardableResult
    public func close() -> Stats {
        state.withLock { $0.stopping = true }
        if started {
            wake.signal()
            done.wait()
        } else {
            drain(final: true)
        }
        return stats
    }

    static func nowNs() -> UInt64 {
        var ts = timespec(); clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    func run() {
        while true {
            let waitMs = bodies.isEmpty ? 200 : 500   // a failed batch is retried after a pause
            _ = wake.wait(timeout: .now() + .milliseconds(waitMs))
            // Let a trickle gather for a moment: one commit per ~10 ms at most under light load
            // (each commit writes at least one 64 KiB page), full batches under heavy load.
            let (queued, stopping0) = state.withLock { ($0.stats.pending, $0.stopping) }
            if !stopping0 && queued < Self.maxBatchRecords { usleep(10_000) }
            let stopping = state.withLock { $0.stopping }
            drain(final: stopping)
            if stopping { return }
        }
    }

    /// One writer pass: take what is queued (unless a failed batch is still waiting), append,
    /// checkpoint when due. With `final`, retries a failing append a few times before giving up.
    func drain(final: Bool) {
        var attempts = final ? 5 : 1
        while attempts > 0 {
            attempts -= 1
            if bodies.isEmpty {
                // At most ~8k records per transaction: the staging buffer keeps its capacity
                // (no page faults from growing it) and a commit never holds the file for long.
                let items = state.withLock { s -> [Item] in
                    var n = 0, k = 0
                    while k < s.queue.count && n < Self.maxBatchRecords { n += s.queue[k].count; k += 1 }
                    let taken = Array(s.queue[..<k])
                    s.queue.removeFirst(k)
                    return taken
                }
                if items.isEmpty { break }
                stage(items)
            }
            if appendBatch() {
                attempts = max(attempts, 1)   // keep draining while records are queued
                checkpointIfDue(final: false)
            } else if final {
                usleep(100_000)
            }
        }
        checkpointIfDue(final: final)
    }

    func checkpointIfDue(final: Bool) {
        let now = Self.nowNs()
        let due = log.headSeq - log.checkpointSeq >= Int64(settings.checkpointEvery)
            || (log.headSeq > log.checkpointSeq && now &- lastCheckpointNs >= settings.checkpointIntervalNs)
        guard due || final else { return }
        do {
            if try log.checkpoint(timeNs: now) { lastCheckpointNs = now }
            let (cs, cc) = (log.checkpointSeq, log.checkpointCount)
            state.withLock { $0.stats.checkpointSeq = cs; $0.stats.checkpoints = cc }
        } catch {
            state.withLock { $0.stats.lastError = error.message; $0.stats.checkpointError = error.message }
        }
    }

    /// Validates the items' records into the staged batch: a record that does not decode, or
    /// names a stage other than its sender, is replaced by an `audit-refused` record saying so.
    func stage(_ items: [Item]) {
        held.removeAll(keepingCapacity: true)
        bodies.removeAll(keepingCapacity: true)
        var refused = 0
        for item in items {
            held.append(item.frame)
            let f = item.frame.bytes
            let entries: [UnsafeRawBufferPointer]
            do {
                entries = try AuditCodec.entries(f)
            } catch {
                refused += item.count
                add(refusal(item.stage, "an AUDIT frame of \(f.count) bytes does not split into records: \(error)"))
                continue
            }
            for e in entries {
                if let why = AuditCodec.check(e, stage: item.stage) {
                    refused += 1
                    add(refusal(item.stage, why))
                } else {
                    bodies.append(e)
                }
            }
        }
        if refused > 0 { state.withLock { $0.stats.refused += refused } }
    }

    func add(_ r: AuditRecord) {
        let b = AuditCodec.body(r).withUnsafeBytes { Bytes($0) }
        held.append(b)
        bodies.append(b.bytes)
    }

    func refusal(_ stage: String?, _ why: String) -> AuditRecord {
        AuditRecord(decision: "audit-refused", stage: "host", location: settings.location, timeNs: Self.nowNs(),
                    intent: "audit.integrity", reason: "stage '\(stage ?? "host")' sent \(why)",
                    details: ["from_stage": .string(stage ?? "host")])
    }

    /// Appends the staged batch; false (batch kept for a retry) when the append failed.
    func appendBatch() -> Bool {
        guard !bodies.isEmpty else { return true }
        let n = bodies.count
        var result: AuditError?
        do { try log.append(bodies) } catch { result = error }
        let head = log.headSeq
        if let e = result {
            state.withLock { $0.stats.failedAppends += 1; $0.stats.lastError = e.message }
            return false
        }
        // `pending` counted frame entries; refusals replaced entries one for one (a frame that
        // did not split counted as its estimate), so subtract what was taken.
        state.withLock { s in
            s.stats.appended += n; s.stats.headSeq = head
            s.stats.pending = max(0, s.stats.pending - n)
            s.stats.lastError = nil
        }
        held.removeAll(keepingCapacity: true)
        bodies.removeAll(keepingCapacity: true)
        return true
    }
}
