import Glibc
import PipeConfig
import PipeKit
import PipeStore

/// At-least-once delivery (docs/delivery.md): the bookkeeping one runner keeps.
///
/// Acknowledgements go hop by hop and mean "done downstream": a consumer acknowledges an input
/// envelope on the lane's return path once the `process` call that took it has returned and
/// every envelope it emitted meanwhile has been acknowledged by its own consumers. A sink's
/// acknowledgement waits for `commit` (its writes made durable). So an envelope a source emitted
/// is acknowledged exactly when every sink it reached (through every fan-out branch and every
/// fork) has it. The source keeps it until then, journals it when durable, and sends it again
/// (attempt + 1) after the ack timeout or at once when the consumer of a lane restarts.
final class DeliveryState {
    /// An input being handled (`inLane >= 0`) or a source's root (`inLane == -1`), with the count
    /// of emitted copies not yet acknowledged.
    struct Token {
        var inLane: Int32
        var id: EnvelopeID
        var pending: Int32
        /// False once the call that created it returned (for a root: once emitted).
        var open: Bool
        /// False when a copy was lost with a restarted consumer: the token completes silently and
        /// the source's redelivery brings the envelope again.
        var live: Bool
        /// Copies registered under another generation are stale (a redelivered root's earlier
        /// attempt, or an earlier token that had this index).
        var gen: UInt64
    }
    /// One copy sent (or queued) on an output lane, in lane order.
    struct Sent {
        var id: EnvelopeID
        var token: Int32
        var gen: UInt64
        /// When it was queued (coarse monotonic ns): a head this old is taken for lost.
        var at: UInt64
    }
    struct Root {
        var envelope: Envelope
        var output: Int
        /// Journal row; 0 when not journaled.
        var rowid: Int64
        var deadline: UInt64
        /// The token's generation when the root was made (a resend changes the token's, not this).
        var born: UInt64 = 0
        /// A copy read back from output lane `lane`'s spill queue (its row `spillSeq`), which goes
        /// again on that lane only; -1 for a source's root (which goes on `output`).
        var lane: Int32 = -1
        var spillSeq: Int64 = 0
    }

    let settings: DeliverySpec
    let timeoutNs: UInt64
    var tokens: [Token] = []
    var free: [Int32] = []
    /// Per output lane, the copies not yet acknowledged, in the order they were queued. A lane
    /// delivers in order and its consumer acknowledges in the order its inputs complete, which is
    /// almost always that order: an acknowledgement is matched against the head, with no hashing.
    var sent: [Ring<Sent>]
    /// Acknowledgements that did not match their lane's head (a filter acknowledges at once what
    /// it drops while earlier envelopes are still downstream; a `drop_oldest` drop): (id, lane) ->
    /// how many. Settled when the head reaches them, or by a walk of the lane when many pile up.
    var early = IDTable(capacity: 64)
    var earlyCount: [Int]
    var earlyTotal = 0
    /// When lanes with early acknowledgements are next walked (a lost head must not hold them).
    var nextWalk: UInt64 = 0
    var nextGen: UInt64 = 1
    /// The token emits are attributed to now (-1: none).
    var current: Int32 = -1
    /// The attempt of the input being handled: what the stage emits meanwhile carries at least it.
    var currentAttempt: UInt32 = 1
    /// What `currentAttempt` returns to: 2 for a source whose worker restarted (it may send again
    /// what its earlier incarnation sent, and sinks look up only later attempts).
    var baseAttempt: UInt32 = 1
    /// Inside `process`: the input (its lane and id) a token is made for on the first emit.
    var handling = false
    var inputLane: Int32 = -1
    var inputID = EnvelopeID(hi: 0, lo: 0)
    var redelivering = false
    /// Per input lane: ids to acknowledge once the stage has committed.
    var acksOut: [[EnvelopeID]]
    var acksWaiting = 0
    // A source's side: roots by token.
    var roots: [Root?] = []
    var rootCount = 0
    /// Of them, copies read back from a spill lane (not counted against a source's max_pending).
    var laneRoots = 0
    /// Set while a stage that is not a source emits something it must keep as a root (the dead
    /// letter of an undeliverable read-back copy).
    var emitAsRoot = false
    /// The last open root was acknowledged (the runner reports at once).
    var rootsEmptied = false
    /// Coarse monotonic time, refreshed every loop pass (stamps copies and deadlines without a
    /// clock read per envelope).
    var clock: UInt64 = coarseMonotonicNs()
    /// When the open roots are next scanned for overdue acknowledgements (0: at once).
    var nextScan: UInt64 = 0
    let scanIntervalNs: UInt64
    var unjournaled: [(token: Int32, gen: UInt64)] = []
    /// Journal rows of redelivered roots, with the envelope at its new attempt.
    var attemptUpdates: [(Int64, [UInt8])] = []
    var completedRows: [Int64] = []
    /// Spill rows whose read-back copies are done (lane, seq): the runner deletes them.
    var spillDone: [(lane: Int32, seq: Int64)] = []
    var journal: SourceJournal?
    /// A journal write failed: nothing more may leave (it would not be recoverable).
    var journalBroken = false
    // A sink's side.
    var dedup: DedupWindow?
    // Counters (reported as metrics).
    var acksSent: UInt64 = 0
    var acksReceived: UInt64 = 0
    var unknownAcks: UInt64 = 0
    var redelivered: UInt64 = 0
    var undeliverable: UInt64 = 0
    var duplicates: UInt64 = 0
    var lost: UInt64 = 0

    init(settings: DeliverySpec, inLanes: Int, outLanes: Int) {
        self.settings = settings
        timeoutNs = UInt64(settings.ackTimeoutMs) * 1_000_000
        scanIntervalNs = Swift.max(5_000_000, Swift.min(1_000_000_000, timeoutNs / 8))
        acksOut = Array(repeating: [], count: inLanes)
        sent = Array(repeating: Ring<Sent>(), count: outLanes)
        earlyCount = Array(repeating: 0, count: outLanes)
    }

    func newToken(inLane: Int32, id: EnvelopeID) -> Int32 {
        nextGen &+= 1
        let t = Token(inLane: inLane, id: id, pending: 0, open: true, live: true, gen: nextGen)
        if let i = free.popLast() { tokens[Int(i)] = t; return i }
        tokens.append(t)
        return Int32(tokens.count - 1)
    }

    func root(_ t: Int32) -> Root? { Int(t) < roots.count ? roots[Int(t)] : nil }
    func setRoot(_ t: Int32, _ r: Root) {
        while roots.count <= Int(t) { roots.append(nil) }
        if roots[Int(t)] == nil { rootCount += 1; if r.lane >= 0 { laneRoots += 1 } }
        roots[Int(t)] = r
    }
    @discardableResult func removeRoot(_ t: Int32) -> Root? {
        guard Int(t) < roots.count, let r = roots[Int(t)] else { return nil }
        roots[Int(t)] = nil
        rootCount -= 1
        if r.lane >= 0 { laneRoots -= 1 }
        return r
    }

    /// A copy of `id` was queued on output lane `lane` for token `t`.
    @inline(__always) func register(lane: Int, id: EnvelopeID, token t: Int32, at now: UInt64) {
        sent[lane].append(Sent(id: id, token: t, gen: tokens[Int(t)].gen, at: now))
        tokens[Int(t)].pending += 1
    }

    @inline(__always) func isStale(_ x: Sent) -> Bool { tokens[Int(x.token)].gen != x.gen }

    // The acknowledgement hot path lives here, on the state itself: called on the runner's
    // `delivery` it cost a retain and release of this object per call, several per envelope.

    /// An acknowledgement of `id` on output lane `li` (or a copy dropped by policy). Returns true
    /// when so many wait out of order that the lane should be walked.
    @inline(__always) func acknowledge(lane li: Int, id: EnvelopeID) -> Bool {
        dropStaleHeads(li)
        if !sent[li].isEmpty, sent[li].peek(0).id == id {
            let h = sent[li].peek(0)
            sent[li].removeFirst()
            release(h.token)
            if earlyCount[li] > 0 { settleEarly(li) }
            return false
        }
        // Out of order: remembered until the head gets there.
        if let n = early.insert(id, tag: Int32(li), value: 1) { early.update(id, tag: Int32(li), value: n + 1) }
        earlyCount[li] += 1; earlyTotal += 1
        if earlyCount[li] > Swift.max(4096, sent[li].count / 4) { return true }
        settleEarly(li)
        return false
    }

    @inline(__always) func dropStaleHeads(_ li: Int) {
        while !sent[li].isEmpty, isStale(sent[li].peek(0)) { sent[li].removeFirst() }
    }

    /// Pops heads that were acknowledged early.
    func settleEarly(_ li: Int) {
        while true {
            dropStaleHeads(li)
            guard earlyCount[li] > 0, !sent[li].isEmpty else { return }
            let h = sent[li].peek(0)
            guard let n = early.value(h.id, tag: Int32(li)) else { return }
            if n > 1 { early.update(h.id, tag: Int32(li), value: n - 1) } else { early.remove(h.id, tag: Int32(li)) }
            earlyCount[li] -= 1; earlyTotal -= 1
            sent[li].removeFirst()
            release(h.token)
        }
    }

    /// One outstanding copy of token `t` was acknowledged (or dropped by policy).
    @inline(__always) func release(_ t: Int32) {
        tokens[Int(t)].pending -= 1
        if tokens[Int(t)].pending <= 0 && !tokens[Int(t)].open { complete(t) }
    }

    /// Token `t` is done: acknowledge the input upstream, or let the source forget the root.
    func complete(_ t: Int32) {
        let tok = tokens[Int(t)]
        if tok.inLane >= 0 {
            if tok.live { acksOut[Int(tok.inLane)].append(tok.id); acksWaiting += 1 }
        } else if let r = removeRoot(t) {
            if r.rowid > 0 { completedRows.append(r.rowid) }
            if r.lane >= 0 { spillDone.append((r.lane, r.spillSeq)) }
            if rootCount == 0 { rootsEmptied = true }
        }
        free.append(t)
    }
}

/// A durable source's journal (`<run dir>/state/<stage>.journal.sqlite`, WAL): the envelopes it
/// emitted and that are not yet acknowledged, and its position, written in one transaction per
/// runner loop pass before any of them is sent. Bound to its pipeline, stage and kind.
final class SourceJournal {
    let db: Database
    let path: String
    private let insert: Statement
    private let remove: Statement
    private let setMeta: Statement
    private let update: Statement

    init(path: String, pipeline: String, stage: String, kind: String) throws {
        self.path = path
        do {
            db = try Database(path: path)
            chmod(path, 0o600)
            try db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL)")
            try db.execute("CREATE TABLE IF NOT EXISTS pending (rowid INTEGER PRIMARY KEY AUTOINCREMENT, output INTEGER NOT NULL, envelope BLOB NOT NULL)")
            insert = try db.prepare("INSERT INTO pending (output, envelope) VALUES (?, ?)")
            remove = try db.prepare("DELETE FROM pending WHERE rowid = ?")
            setMeta = try db.prepare("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)")
            update = try db.prepare("UPDATE pending SET envelope = ? WHERE rowid = ?")
        } catch {
            throw RuntimeError.io("journal \(path): \(error) (a corrupt journal: move it away to start the source afresh, losing what it held)")
        }
        let binding = [("pipeline", pipeline), ("stage", stage), ("kind", kind)]
        var found: [String: String] = [:]
        do {
            let q = try db.prepare("SELECT k, v FROM meta WHERE k IN ('pipeline', 'stage', 'kind')")
            try q.bind([])
            while try q.step() { found[q.text(0)] = String(decoding: q.blob(1), as: UTF8.self) }
        } catch { throw RuntimeError.io("journal \(path): cannot read its binding: \(error)") }
        if found.isEmpty {
            do {
                try db.execute("BEGIN IMMEDIATE")
                for (k, v) in binding { try setMeta.run([.text(k), .blob(Array(v.utf8))]) }
                try db.execute("COMMIT")
            } catch { throw RuntimeError.io("journal \(path): cannot write its binding: \(error)") }
        } else {
            for (k, v) in binding where found[k] != v {
                throw RuntimeError.plan("journal \(path) belongs to pipeline '\(found["pipeline"] ?? "?")' stage '\(found["stage"] ?? "?")' (kind \(found["kind"] ?? "?")), not pipeline '\(pipeline)' stage '\(stage)' (kind \(kind)); use another run directory or move the journal away")
            }
        }
    }

    /// The saved position, or nil for a new journal.
    func position() throws -> [UInt8]? {
        let q = try db.prepare("SELECT v FROM meta WHERE k = 'position'")
        try q.bind([])
        return try q.step() ? q.blob(0) : nil
    }

    /// Every unacknowledged envelope, oldest first: (row, output index, encoded envelope).
    func pending() throws -> [(Int64, Int, [UInt8])] {
        let q = try db.prepare("SELECT rowid, output, envelope FROM pending ORDER BY rowid")
        try q.bind([])
        var out: [(Int64, Int, [UInt8])] = []
        while try q.step() { out.append((q.int(0), Int(q.int(1)), q.blob(2))) }
        return out
    }

    /// One transaction: new envelopes (returns their rows), acknowledged rows gone, the position.
    func write(new: [(output: Int, envelope: [UInt8])], done: [Int64], updates: [(Int64, [UInt8])] = [], position: [UInt8]?) throws -> [Int64] {
        var rows: [Int64] = []
        rows.reserveCapacity(new.count)
        do {
            try db.execute("BEGIN IMMEDIATE")
            for n in new {
                try insert.run([.int(Int64(n.output)), .blob(n.envelope)])
                rows.append(db.lastInsertRowID)
            }
            for r in done { try remove.run([.int(r)]) }
            for (row, e) in updates { try update.run([.blob(e), .int(row)]) }
            if let p = position { try setMeta.run([.text("position"), .blob(p)]) }
            try db.execute("COMMIT")
        } catch {
            try? db.execute("ROLLBACK")
            throw error
        }
        return rows
    }
}

/// The last ids written into a ring (one sequential write each), with a hash index over the ring
/// brought up to date only when something is looked up, so that writing never hashes. An index
/// entry names a ring slot and counts only while that slot still holds the id.
struct IDRing {
    private var ring: [EnvelopeID] = []
    private var mask = 0
    private let size: Int
    /// Ids written in total; the ring holds the last `size` of them.
    private(set) var head = 0
    private var index = IDTable(capacity: 64)
    /// The index covers ring entries written before this count.
    private var indexed = 0

    init(capacity: Int) {
        var n = 1024
        while n < capacity { n <<= 1 }
        size = n
    }

    var count: Int { Swift.min(head, size) }

    @inline(__always) mutating func add(_ id: EnvelopeID) {
        if ring.isEmpty { ring = Array(repeating: EnvelopeID(hi: 0, lo: 0), count: size); mask = size - 1 }
        ring[head & mask] = id
        head += 1
    }

    mutating func contains(_ id: EnvelopeID) -> Bool {
        guard head > 0 else { return false }
        let oldest = Swift.max(0, head - size)
        if indexed < oldest || index.count > 2 * size {
            // Too far behind (or full of stale entries): start the index over.
            index = IDTable(capacity: Swift.min(size, Swift.max(1024, head - oldest)))
            indexed = oldest
        }
        while indexed < head {
            let slot = Int32(indexed & mask)
            let x = ring[indexed & mask]
            if index.insert(x, value: slot) != nil { index.update(x, value: slot) }
            indexed += 1
        }
        guard let slot = index.value(id) else { return false }
        return ring[Int(slot)] == id
    }
}

/// The ids a sink has taken recently (the last `dedup_window` of them, at least): a redelivered
/// envelope whose id is here is acknowledged without being handled again. Only later attempts
/// (possible redeliveries) are looked up among all ids; a first attempt is looked up only among
/// the ids that arrived as later attempts (a redelivery can overtake its original through
/// another replica), which is empty in a run without redeliveries. Seeded at start from the
/// sink's own output (``Stage/deliveredIDs(limit:context:)``), or else kept in SQLite
/// (`<run dir>/state/<stage>.delivered.sqlite`), saved before the acknowledgements leave.
final class DedupWindow {
    let capacity: Int
    private var all: IDRing
    private var later: IDRing
    /// After a restart with a remembered window, first attempts are looked up among all ids
    /// until this many more have been taken (which arrived as later attempts before the restart
    /// is not known).
    private var strictFirstAttempts = 0
    private var unsaved: [EnvelopeID] = []
    private let db: Database?
    private let insert: Statement?
    private var saves = 0

    init(capacity: Int, seed: [EnvelopeID], path: String?) throws {
        self.capacity = capacity
        all = IDRing(capacity: capacity)
        later = IDRing(capacity: capacity)
        var ids = seed
        if let path {
            let d = try Database(path: path)
            chmod(path, 0o600)
            try d.execute("CREATE TABLE IF NOT EXISTS delivered (seq INTEGER PRIMARY KEY AUTOINCREMENT, id BLOB NOT NULL)")
            let q = try d.prepare("SELECT id FROM delivered ORDER BY seq DESC LIMIT ?")
            try q.bind([.int(Int64(capacity))])
            var back: [EnvelopeID] = []
            while try q.step() { if let id = EnvelopeID(bytes: q.blob(0)) { back.append(id) } }
            ids = back.reversed() + ids
            insert = try d.prepare("INSERT INTO delivered (id) VALUES (?)")
            db = d
        } else { db = nil; insert = nil }
        for id in ids.suffix(capacity) { add(id, save: false) }
        if !ids.isEmpty { strictFirstAttempts = capacity }
    }

    var count: Int { all.count }

    @inline(__always) func add(_ id: EnvelopeID, later isLater: Bool = false, save: Bool = true) {
        all.add(id)
        if isLater { later.add(id) }
        if strictFirstAttempts > 0 && save { strictFirstAttempts -= 1 }
        if save && db != nil { unsaved.append(id) }
    }

    /// Whether `id` was taken (a later attempt is looked up here).
    func contains(_ id: EnvelopeID) -> Bool { all.contains(id) }
    /// Whether `id` arrived as a later attempt (a first attempt is looked up here).
    @inline(__always) func seenLater(_ id: EnvelopeID) -> Bool {
        if strictFirstAttempts > 0 { return all.contains(id) }
        return later.head > 0 && later.contains(id)
    }

    /// Writes the ids taken since the last save (one transaction); trims the table now and then.
    func save() throws {
        guard let db, let insert, !unsaved.isEmpty else { return }
        try db.execute("BEGIN IMMEDIATE")
        do {
            for id in unsaved { try insert.run([.blob(id.bytes)]) }
            saves += 1
            if saves % 64 == 0 { try db.execute("DELETE FROM delivered WHERE seq <= (SELECT max(seq) FROM delivered) - \(capacity)") }
            try db.execute("COMMIT")
        } catch {
            try? db.execute("ROLLBACK")
            throw error
        }
        unsaved.removeAll(keepingCapacity: true)
    }
}

extension RunnerCore {
    /// The consumer of output lane `li` acknowledged `id` (or the copy was dropped by policy).
    @inline(__always) func acknowledged(lane li: Int, id: EnvelopeID, mayWalk: Bool = true) {
        guard let dv = delivery else { return }
        if dv.acknowledge(lane: li, id: id) {
            // Not from inside an emit (a walk may resend): the next loop pass walks instead.
            if mayWalk { walkLane(li) } else { dv.nextWalk = 0 }
        }
    }

    /// Many acknowledgements wait behind a head that is not coming (a copy lost on the way): walk
    /// the lane once, settling every copy acknowledged early and dropping stale ones; what is
    /// left in `early` for the lane names nothing outstanding (an earlier incarnation's) and goes.
    func walkLane(_ li: Int) {
        guard let dv = delivery else { return }
        var keep = Ring<DeliveryState.Sent>()
        var done: [Int32] = []
        while !dv.sent[li].isEmpty {
            let x = dv.sent[li].peek(0)
            dv.sent[li].removeFirst()
            if dv.isStale(x) { continue }
            if let n = dv.early.value(x.id, tag: Int32(li)) {
                if n > 1 { dv.early.update(x.id, tag: Int32(li), value: n - 1) } else { dv.early.remove(x.id, tag: Int32(li)) }
                dv.earlyCount[li] -= 1; dv.earlyTotal -= 1
                done.append(x.token)
            } else { keep.append(x) }
        }
        // A head older than the ack timeout is taken for lost (its consumer dropped it, or lost
        // it in a restart further down): the source sends its root again by then anyway, and
        // nothing behind it may wait for it. Its token then completes without acknowledging.
        // A source's root is not done because its copy is lost: it goes again.
        let now = coarseMonotonicNs()
        var resend: [Int32] = []
        // (Only a head that has left: the last `queue.count` copies may still wait in our queue.)
        while keep.count > outLanes[li].queue.count, now &- keep.peek(0).at > dv.timeoutNs {
            let x = keep.peek(0)
            keep.removeFirst()
            dv.lost &+= 1
            if dv.tokens[Int(x.token)].inLane >= 0 {
                dv.tokens[Int(x.token)].live = false
                done.append(x.token)
            } else {
                resend.append(x.token)
            }
        }
        dv.sent[li] = keep
        let unknown = dv.earlyCount[li]
        if unknown > 0 {
            dv.early.removeAll { _, lane, _ in lane == Int32(li) }
            dv.earlyCount[li] = 0; dv.earlyTotal -= unknown
            dv.unknownAcks &+= UInt64(unknown)
        }
        for t in done { dv.release(t) }
        for t in resend where dv.root(t) != nil { redeliver(t, why: "its copy on lane \(outLanes[li].id) was not acknowledged within \(dv.settings.ackTimeoutMs) ms") }
    }

    /// Once a second at most: lanes holding early acknowledgements are walked, so that a head
    /// whose acknowledgement never comes holds nothing behind it for long.
    func walkLanesIfDue(_ now: UInt64) {
        guard let dv = delivery, dv.earlyTotal > 0, now >= dv.nextWalk || dv.nextWalk == 0 else { return }
        dv.nextWalk = now &+ 1_000_000_000
        for li in dv.earlyCount.indices where dv.earlyCount[li] > 0 { walkLane(li) }
    }


    /// The consumer of output lane `li` restarted: what it had not acknowledged is gone with it.
    /// A source sends its roots again at once; a transform's inputs that waited for those copies
    /// are never acknowledged (the source's timeout brings them again).
    func consumerRestarted(_ li: Int) {
        guard let dv = delivery else { return }
        // What was acknowledged out of order is delivered: settle it before counting losses.
        if dv.earlyCount[li] > 0 { walkLane(li) }
        var hit: [Int32] = []
        // The last `queue.count` copies have not left our queue: they go in the new epoch, not lost.
        while dv.sent[li].count > outLanes[li].queue.count {
            let x = dv.sent[li].peek(0)
            dv.sent[li].removeFirst()
            if !dv.isStale(x) { hit.append(x.token) }
        }
        if dv.earlyCount[li] > 0 {
            dv.early.removeAll { _, lane, _ in lane == Int32(li) }
            dv.earlyTotal -= dv.earlyCount[li]; dv.earlyCount[li] = 0
        }
        guard !hit.isEmpty else { return }
        dv.lost &+= UInt64(hit.count)
        // A source's roots, and a spill lane's read-back copies, are this runner's to send again.
        let ours = hit.contains { dv.tokens[Int($0)].inLane < 0 }
        log.warning("lane \(outLanes[li].id) to \(outLanes[li].to): the consumer started a new credit epoch (it restarted, or frames were lost on a dropped connection) with \(hit.count) envelopes unacknowledged; \(ours ? "sending them again" : "the source will send them again")")
        var roots: [Int32] = []
        for t in hit {
            if dv.tokens[Int(t)].inLane >= 0 { dv.tokens[Int(t)].live = false } else { roots.append(t) }
            dv.tokens[Int(t)].pending -= 1
            if dv.tokens[Int(t)].pending <= 0 && !dv.tokens[Int(t)].open {
                if dv.tokens[Int(t)].inLane < 0 { continue }  // redelivered below
                dv.complete(t)
            }
        }
        // In lane order (token indices are reused: their order says nothing).
        var seen = Set<Int32>()
        for t in roots where seen.insert(t).inserted { redeliver(t, why: "lane \(outLanes[li].id) consumer restarted") }
    }

    /// Sends root `t` again with `attempt` raised, or dead-letters it after `max_attempts`.
    func redeliver(_ t: Int32, why: String) {
        guard let dv = delivery, var r = dv.root(t) else { return }
        // The copies still out become stale (a new generation); a late acknowledgement of one
        // still settles the new attempt's copy of the same id (the sink has the envelope).
        dv.nextGen &+= 1
        dv.tokens[Int(t)].gen = dv.nextGen
        dv.tokens[Int(t)].pending = 0
        let saved = (dv.current, dv.redelivering)
        defer { dv.current = saved.0; dv.redelivering = saved.1 }
        // A dead letter is never given up on (it would only be dead-lettered again): it is sent
        // again, with backoff, until the dead-letter sink has it.
        if Int(r.envelope.attempt) >= dv.settings.maxAttempts && r.output != deadLetterHandle.index {
            dv.undeliverable += 1
            dv.tokens[Int(t)].open = false
            dv.complete(t)
            // The dead letter is a new root (journaled in the same transaction that deletes this
            // one's row): a crash between the two loses nothing.
            dv.current = -1; dv.redelivering = false
            // A read-back copy's dead letter is kept as a root even by a stage that is not a source.
            dv.emitAsRoot = r.lane >= 0
            deadLetter(r.envelope, reason: "undeliverable: not acknowledged after \(r.envelope.attempt) attempts (\(why))")
            dv.emitAsRoot = false
            return
        }
        r.envelope.attempt &+= 1
        // Backoff: each attempt waits twice as long as the one before, up to 16 timeouts.
        r.deadline = monotonicNs() &+ dv.timeoutNs &* UInt64(1 << Swift.min(4, Int(r.envelope.attempt) - 1))
        if r.rowid > 0 { dv.attemptUpdates.append((r.rowid, EnvelopeCodec.encode(r.envelope))) }
        dv.setRoot(t, r)
        dv.redelivered += 1
        audit(.about(r.envelope, decision: "redeliver", reason: "attempt \(r.envelope.attempt): \(why)"))
        dv.tokens[Int(t)].open = true
        dv.current = t; dv.redelivering = true
        if r.lane >= 0 { resendOnSpillLane(Int(r.lane), r.envelope, token: t) }
        else { emit(r.envelope, to: OutputHandle(index: r.output, name: outputNames[r.output])) }
        dv.current = -1; dv.redelivering = false
        dv.tokens[Int(t)].open = false
        if dv.tokens[Int(t)].pending <= 0 { dv.complete(t) }
    }

    /// Roots whose acknowledgement is overdue go again. The open roots (at most `max_pending`)
    /// are scanned every `ack_timeout_ms / 8` (5 ms to 1 s): no per-root timer to keep, and
    /// memory stays bounded by the open roots whatever the backoff. Returns when to look again.
    func checkTimeouts(_ now: UInt64) -> UInt64 {
        guard let dv = delivery else { return .max }
        guard dv.rootCount > 0 else { dv.nextScan = 0; return .max }
        if now < dv.nextScan { return dv.nextScan }
        dv.nextScan = now &+ dv.scanIntervalNs
        var due: [Int32] = []
        var waiting = false
        for i in dv.roots.indices {
            guard let r = dv.roots[i], r.deadline <= now else { continue }
            // Still waiting in this runner's own queue (backpressure): not lost, not due.
            let lanes = r.lane >= 0 ? [Int(r.lane)] : outputLanes[r.output]
            if lanes.contains(where: { !outLanes[$0].queue.isEmpty }) {
                dv.roots[i]?.deadline = now &+ dv.timeoutNs
                waiting = true
                continue
            }
            due.append(Int32(i))
        }
        if waiting { log.debug("roots past their deadline still wait in this runner's lane queue (backpressure); not resent") }
        for t in due { redeliver(t, why: "no acknowledgement within \(dv.settings.ackTimeoutMs) ms") }
        return dv.nextScan
    }

    /// Whether a source may produce more now (`max_pending` unacknowledged at most).
    var pendingRoom: Int {
        guard let dv = delivery else { return Int.max }
        return Swift.max(0, dv.settings.maxPending - (dv.rootCount - dv.laneRoots))
    }

    /// Nothing the source emitted waits for an acknowledgement.
    var deliverySettled: Bool { (delivery?.rootCount ?? 0) == 0 }

    /// Once per loop pass, before lanes are flushed: journal what the source emitted (before it
    /// leaves), then (unless `acknowledge` is false: a spill write is failing) commit the stage,
    /// save the sink's window and acknowledge upstream.
    func settleDelivery(acknowledge: Bool = true) {
        guard let dv = delivery, !dv.journalBroken else { return }
        if let j = dv.journal, !dv.unjournaled.isEmpty || !dv.completedRows.isEmpty || !dv.attemptUpdates.isEmpty {
            var new: [(output: Int, envelope: [UInt8])] = []
            var which: [Int32] = []
            // A root that completed in this pass (dropped, spilled, no lanes) left no row to write;
            // its token may already name a newer root, which the generation tells apart.
            for (t, gen) in dv.unjournaled {
                if let r = dv.root(t), r.born == gen, r.rowid == 0 { new.append((r.output, EnvelopeCodec.encode(r.envelope))); which.append(t) }
            }
            let position = dv.unjournaled.isEmpty ? nil : (source as? any ResumableSource)?.position()
            do {
                let rows = try j.write(new: new, done: dv.completedRows, updates: dv.attemptUpdates, position: position)
                for (t, row) in zip(which, rows) { dv.roots[Int(t)]?.rowid = row }
                dv.unjournaled.removeAll(keepingCapacity: true)
                dv.completedRows.removeAll(keepingCapacity: true)
                dv.attemptUpdates.removeAll(keepingCapacity: true)
            } catch {
                dv.journalBroken = true
                fail("journal \(j.path): write failed (\(error)); nothing more is sent, and a restart resumes from what the journal holds")
                audit(AuditRecord(decision: "journal-failed", reason: "\(j.path): \(error)"))
                return
            }
        }
        guard acknowledge, dv.acksWaiting > 0 else { return }
        do { try stage.commit(context: self) } catch {
            handleStageError(error, envelope: nil)
            return
        }
        do { try dv.dedup?.save() } catch {
            log.error("cannot save the delivered-id window: \(error); acknowledgements held back")
            return
        }
        let chunk = Swift.max(1, Swift.min(limits.maxBatchEnvelopes, 4096))
        for li in dv.acksOut.indices where !dv.acksOut[li].isEmpty {
            var start = 0
            let ids = dv.acksOut[li]
            while start < ids.count {
                let end = Swift.min(ids.count, start + chunk)
                inLanes[li].seq += 1
                let frame = ids.withUnsafeBufferPointer { FrameEncoder.ack(lane: inLanes[li].id, seq: inLanes[li].seq, ids: UnsafeBufferPointer(rebasing: $0[start..<end])) }
                _ = try? inLanes[li].ret.send(frame, dontWait: true)
                start = end
            }
            dv.acksSent &+= UInt64(ids.count)
            dv.acksOut[li].removeAll(keepingCapacity: true)
        }
        dv.acksWaiting = 0
    }

    /// At start: the sink's window of delivered ids, and a durable source's journal replayed
    /// (its position restored, what it held sent again with `attempt` raised).
    func startDelivery() throws {
        guard let dv = delivery else { return }
        if source != nil && a.restarts > 0 && !(dv.journal != nil) {
            // A non-durable source starting over may send again what it sent before: as later
            // attempts, so that sinks look them up.
            dv.baseAttempt = 2; dv.currentAttempt = 2
        }
        if isSink {
            let seed = try stage.deliveredIDs(limit: dv.settings.dedupWindow, context: self)
            mkdir(a.runDirectory + "/state", 0o700)
            dv.dedup = try DedupWindow(capacity: dv.settings.dedupWindow, seed: seed ?? [],
                                       path: seed == nil ? a.runDirectory + "/state/\(a.stage).delivered.sqlite" : nil)
            if dv.dedup?.count ?? 0 > 0 { log.info("delivery: \(dv.dedup?.count ?? 0) envelope ids already delivered are remembered") }
        }
        guard let j = dv.journal, let rs = source as? any ResumableSource else { return }
        if let p = try j.position() { try rs.resume(from: p) }
        let rows = try j.pending()
        if !rows.isEmpty { log.info("journal: \(rows.count) unacknowledged envelopes from an earlier run go again") }
        for (row, output, bytes) in rows {
            guard output >= 0, output < outputNames.count,
                  let e = try? bytes.withUnsafeBytes({ (b: UnsafeRawBufferPointer) throws(DecodeError) -> Envelope in try EnvelopeCodec.decode(b, limits: limits) }) else {
                dv.completedRows.append(row)
                deadLetter(Envelope(intent: "journal.corrupt", payload: Array(bytes.prefix(65536))), reason: "journal \(j.path): row \(row) does not decode")
                continue
            }
            let t = dv.newToken(inLane: -1, id: e.id)
            dv.tokens[Int(t)].open = false
            dv.setRoot(t, DeliveryState.Root(envelope: e, output: output, rowid: row, deadline: 0))
            redeliver(t, why: "unacknowledged when the last run ended")
        }
    }

    /// Delivery figures for `pipectl status` (metrics).
    func deliveryStatus(_ st: inout [(String, AttrValue)]) {
        guard let dv = delivery else { return }
        st.append(("delivery.unacked", .int(Int64(dv.rootCount))))
        st.append(("delivery.acks_sent", .int(Int64(clamping: dv.acksSent))))
        st.append(("delivery.acks_received", .int(Int64(clamping: dv.acksReceived))))
        // Sources, and stages with a spill lane (they deliver what they read back from it).
        if source != nil || outLanes.contains(where: { $0.spill?.tracked ?? false }) {
            st.append(("delivery.redelivered", .int(Int64(clamping: dv.redelivered))))
            st.append(("delivery.undeliverable", .int(Int64(clamping: dv.undeliverable))))
        }
        if isSink { st.append(("delivery.duplicates", .int(Int64(clamping: dv.duplicates)))) }
        if dv.lost > 0 { st.append(("delivery.lost_with_consumer", .int(Int64(clamping: dv.lost)))) }
        if dv.unknownAcks > 0 { st.append(("delivery.unknown_acks", .int(Int64(clamping: dv.unknownAcks)))) }
    }
}

/// What a durable source's journal holds, read without changing it (`pipectl journal`).
public struct JournalInfo: Sendable {
    public var pipeline: String
    public var stage: String
    public var kind: String
    /// The source's saved position (its own encoding), or nil before the first write.
    public var position: [UInt8]?
    /// Envelopes sent and not acknowledged: a restart with this run directory sends them again.
    public var pending: Int
    /// The lowest and highest attempt among them.
    public var attempts: ClosedRange<UInt32>?

    /// Opens `path` read-only; a file that is not a journal gives a clear error.
    public static func read(path: String) throws(RuntimeError) -> JournalInfo {
        guard access(path, R_OK) == 0 else { throw .io("\(path): cannot read it (\(String(cString: strerror(errno))))") }
        do {
            let db = try Database(path: path, readOnly: true)
            var meta: [String: [UInt8]] = [:]
            let q = try db.prepare("SELECT k, v FROM meta")
            try q.bind([])
            while try q.step() { meta[q.text(0)] = q.blob(1) }
            guard let p = meta["pipeline"], let s = meta["stage"], let k = meta["kind"] else {
                throw RuntimeError.io("\(path): not a source journal (no pipeline, stage and kind binding)")
            }
            var info = JournalInfo(pipeline: String(decoding: p, as: UTF8.self), stage: String(decoding: s, as: UTF8.self),
                                   kind: String(decoding: k, as: UTF8.self), position: meta["position"], pending: 0, attempts: nil)
            let rows = try db.prepare("SELECT envelope FROM pending ORDER BY rowid")
            try rows.bind([])
            while try rows.step() {
                info.pending += 1
                let raw = rows.blobInPlace(0)
                if let e = try? EnvelopeCodec.decode(raw, limits: .standard) {
                    info.attempts = info.attempts.map { min($0.lowerBound, e.attempt)...max($0.upperBound, e.attempt) } ?? e.attempt...e.attempt
                }
            }
            return info
        } catch let e as RuntimeError { throw e }
        catch { throw .io("\(path): not a readable source journal (\(error))") }
    }

    /// The position in words, for the kinds whose encoding is known here.
    public var positionText: String {
        guard let p = position else { return "none yet" }
        func u64(_ at: Int) -> UInt64 { p[at..<(at + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        switch (kind, p.count) {
        case ("generator", 17): return "\(u64(0)) envelopes emitted"
        case ("file-source", 16): return "byte offset \(u64(0)), after line \(u64(8))"
        default: return "\(p.count) bytes: \(Hex.encode(p))"
        }
    }
}
