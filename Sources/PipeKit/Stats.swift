/// One lane end's counters as a runner sees them (STATS frame).
public struct LaneEndStats: Sendable, Equatable {
    public enum Role: UInt8, Sendable { case producer = 0, consumer = 1 }
    public var lane: UInt32
    public var role: Role
    /// Producer: envelopes sent (emitted into the lane). Consumer: envelopes received and processed.
    public var count: UInt64
    /// Producer: credits it holds. Consumer: credits granted and not yet used by the producer.
    public var credits: UInt32
    /// Producer: envelopes waiting in our sender queue. Consumer: 0.
    public var queued: UInt32
    /// Producer: EOS sent. Consumer: EOS received.
    public var endOfStream: Bool
    /// Producer: nanoseconds spent blocked on this lane (no credit while the stage wanted to send).
    public var blockedNs: UInt64
    /// Producer: envelopes dropped by `drop_newest` / `drop_oldest`.
    public var dropped: UInt64
    /// Producer: envelopes written to the spill queue in total, and how many are on disk now.
    public var spilled: UInt64
    public var spillDepth: UInt32
    /// Consumer: time from the producer sending a DATA frame to this end taking it, per envelope.
    public var latency: DurationHistogram
    /// The lane's credit epoch as this end sees it (0: a producer that has no CREDIT yet), and
    /// `count` within it: envelopes this incarnation transmitted (producer) or took (consumer)
    /// since the epoch began. When both ends report the same epoch, the host takes the depth from
    /// these, so envelopes lost with a dead incarnation do not stay on the lane as depth.
    public var epoch: UInt32
    public var countInEpoch: UInt64
    public init(lane: UInt32, role: Role, count: UInt64, credits: UInt32, queued: UInt32, endOfStream: Bool, blockedNs: UInt64 = 0,
                dropped: UInt64 = 0, spilled: UInt64 = 0, spillDepth: UInt32 = 0, latency: DurationHistogram = DurationHistogram(),
                epoch: UInt32 = 0, countInEpoch: UInt64 = 0) {
        self.lane = lane; self.role = role; self.count = count; self.credits = credits; self.queued = queued
        self.endOfStream = endOfStream; self.blockedNs = blockedNs; self.dropped = dropped; self.spilled = spilled
        self.spillDepth = spillDepth; self.latency = latency; self.epoch = epoch; self.countInEpoch = countInEpoch
    }
}

/// A runner's periodic report to the host (STATS frame body, docs/wire-format.md).
public struct StatsReport: Sendable, Equatable {
    public struct Flags: OptionSet, Sendable, Equatable {
        public let rawValue: UInt8
        public init(rawValue: UInt8) { self.rawValue = rawValue }
        /// Nothing queued, nothing being processed, nothing held.
        public static let idle = Flags(rawValue: 0x01)
        /// A source that will produce nothing more.
        public static let exhausted = Flags(rawValue: 0x02)
        /// The runner drained, sent EOS on every output and is done.
        public static let finished = Flags(rawValue: 0x04)
        /// All non-loop inputs ended; waiting for the host to close the loop.
        public static let awaitingLoopClose = Flags(rawValue: 0x08)
        /// The stage halted with an error.
        public static let failed = Flags(rawValue: 0x10)
    }
    public var stage: String
    public var timeNs: UInt64
    public var flags: Flags
    public var received: UInt64
    public var emitted: UInt64
    public var deadLettered: UInt64
    public var errors: UInt64
    public var held: UInt32
    /// Nanoseconds spent in stage code (process, produce, tick, drain) since the runner started.
    public var busyNs: UInt64
    /// Time per envelope in stage code: each input batch (or produce call) contributes its mean
    /// per envelope, once per envelope.
    public var processing: DurationHistogram
    public var lanes: [LaneEndStats]
    /// The stage's own status report (figures `pipectl status` shows).
    public var status: [(String, AttrValue)]

    public init(stage: String, timeNs: UInt64, flags: Flags, received: UInt64, emitted: UInt64, deadLettered: UInt64,
                errors: UInt64, held: UInt32, busyNs: UInt64 = 0, processing: DurationHistogram = DurationHistogram(),
                lanes: [LaneEndStats], status: [(String, AttrValue)]) {
        self.stage = stage; self.timeNs = timeNs; self.flags = flags; self.received = received; self.emitted = emitted
        self.deadLettered = deadLettered; self.errors = errors; self.held = held; self.busyNs = busyNs; self.processing = processing
        self.lanes = lanes; self.status = status
    }

    public static func == (a: StatsReport, b: StatsReport) -> Bool {
        a.stage == b.stage && a.timeNs == b.timeNs && a.flags == b.flags && a.received == b.received
            && a.emitted == b.emitted && a.deadLettered == b.deadLettered && a.errors == b.errors && a.held == b.held
            && a.busyNs == b.busyNs && a.processing == b.processing && a.lanes == b.lanes && a.status.map(\.0) == b.status.map(\.0) && a.status.map(\.1) == b.status.map(\.1)
    }

    public func encode(seq: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 96 + lanes.count * 40)
        FrameHeader(type: .stats, lane: FrameHeader.controlLane, seq: seq).write(into: &w)
        w.str16(stage); w.u64(timeNs); w.u8(flags.rawValue)
        w.u64(received); w.u64(emitted); w.u64(deadLettered); w.u64(errors); w.u32(held)
        w.u64(busyNs); w.histogram(processing)
        w.u16(UInt16(truncatingIfNeeded: lanes.count))
        for l in lanes {
            w.u32(l.lane); w.u8(l.role.rawValue); w.u64(l.count); w.u32(l.credits); w.u32(l.queued)
            w.u8(l.endOfStream ? 1 : 0); w.u64(l.blockedNs)
            w.u64(l.dropped); w.u64(l.spilled); w.u32(l.spillDepth); w.histogram(l.latency)
            w.u32(l.epoch); w.u64(l.countInEpoch)
        }
        w.u16(UInt16(truncatingIfNeeded: status.count))
        for (k, v) in status { w.str16(k); w.attr(v) }
        return w.buffer
    }

    public static func decode(_ f: FrameView) throws(DecodeError) -> StatsReport {
        guard f.header.type == .stats else { throw .invalid(field: "frame.type", reason: "not STATS") }
        var r = ByteReader(f.body)
        let stage = try r.str16("stats.stage", limit: 256)
        let t = try r.u64("stats.time"), flags = Flags(rawValue: try r.u8("stats.flags"))
        let rc = try r.u64("stats.received"), em = try r.u64("stats.emitted"), dl = try r.u64("stats.dead_lettered")
        let er = try r.u64("stats.errors"), held = try r.u32("stats.held")
        let busy = try r.u64("stats.busy_ns"), processing = try r.histogram("stats.processing")
        let nl = Int(try r.u16("stats.lanes.count"))
        if nl * 63 > r.remaining { throw .truncated(field: "stats.lanes", need: nl * 63, have: r.remaining) }
        var lanes = [LaneEndStats]()
        for _ in 0..<nl {
            let lane = try r.u32("stats.lane.id")
            let roleRaw = try r.u8("stats.lane.role")
            guard let role = LaneEndStats.Role(rawValue: roleRaw) else { throw .invalid(field: "stats.lane.role", reason: "\(roleRaw)") }
            let count = try r.u64("stats.lane.count"), credits = try r.u32("stats.lane.credits"), q = try r.u32("stats.lane.queued")
            let eos = try r.u8("stats.lane.eos"), blocked = try r.u64("stats.lane.blocked_ns")
            let dropped = try r.u64("stats.lane.dropped"), spilled = try r.u64("stats.lane.spilled"), depth = try r.u32("stats.lane.spill_depth")
            let latency = try r.histogram("stats.lane.latency")
            let epoch = try r.u32("stats.lane.epoch"), inEpoch = try r.u64("stats.lane.count_in_epoch")
            lanes.append(LaneEndStats(lane: lane, role: role, count: count, credits: credits, queued: q, endOfStream: eos != 0, blockedNs: blocked,
                                      dropped: dropped, spilled: spilled, spillDepth: depth, latency: latency, epoch: epoch, countInEpoch: inEpoch))
        }
        let ns = Int(try r.u16("stats.status.count"))
        var status = [(String, AttrValue)]()
        for _ in 0..<ns { status.append((try r.str16("stats.status.key", limit: 256), try r.attr("stats.status.value"))) }
        if r.remaining != 0 { throw .invalid(field: "stats", reason: "\(r.remaining) trailing bytes") }
        return StatsReport(stage: stage, timeNs: t, flags: flags, received: rc, emitted: em, deadLettered: dl, errors: er,
                           held: held, busyNs: busy, processing: processing, lanes: lanes, status: status)
    }
}

/// HELLO body: a worker introduces itself to the host.
public struct Hello: Sendable, Equatable {
    /// 2: STATS lane entries carry the credit epoch and the count within it.
    public static let protocolVersion: UInt16 = 2
    public var protocolVersion: UInt16
    public var pid: UInt32
    /// The worker's name (the `NAME` of `placement: { worker: NAME }`, or the stage id for child workers).
    public var worker: String
    /// An authority grant (reserved for the distributed issue; empty now).
    public var grant: [UInt8]
    public init(protocolVersion: UInt16 = Hello.protocolVersion, pid: UInt32, worker: String, grant: [UInt8] = []) {
        self.protocolVersion = protocolVersion; self.pid = pid; self.worker = worker; self.grant = grant
    }
    public func encode(seq: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 64 + grant.count)
        FrameHeader(type: .hello, lane: FrameHeader.controlLane, seq: seq).write(into: &w)
        w.u16(protocolVersion); w.u32(pid); w.str16(worker); w.u32(UInt32(grant.count)); w.bytes(grant)
        return w.buffer
    }
    public static func decode(_ f: FrameView) throws(DecodeError) -> Hello {
        guard f.header.type == .hello else { throw .invalid(field: "frame.type", reason: "not HELLO") }
        var r = ByteReader(f.body)
        let v = try r.u16("hello.version"), pid = try r.u32("hello.pid")
        let name = try r.str16("hello.worker", limit: 256)
        let gl = Int(try r.u32("hello.grant.length"))
        if gl > 65536 { throw .tooLarge(field: "hello.grant", size: gl, limit: 65536) }
        let grant = try r.bytes(gl, "hello.grant")
        if r.remaining != 0 { throw .invalid(field: "hello", reason: "\(r.remaining) trailing bytes") }
        return Hello(protocolVersion: v, pid: pid, worker: name, grant: grant)
    }
}

extension ByteWriter {
    /// `u8 n` (0 when empty), then n x `u64` bucket counts and `u64` sum of nanoseconds.
    public mutating func histogram(_ h: DurationHistogram) {
        u8(UInt8(truncatingIfNeeded: h.counts.count))
        if h.counts.isEmpty { return }
        for c in h.counts { u64(c) }
        u64(h.sumNs)
    }
}

extension ByteReader {
    public mutating func histogram(_ field: String) throws(DecodeError) -> DurationHistogram {
        let n = Int(try u8(field + ".count"))
        if n == 0 { return DurationHistogram() }
        guard n == DurationHistogram.bucketCount else {
            throw .invalid(field: field, reason: "\(n) buckets, expected \(DurationHistogram.bucketCount)")
        }
        var counts = [UInt64](); counts.reserveCapacity(n)
        for _ in 0..<n { counts.append(try u64(field + ".bucket")) }
        return DurationHistogram(counts: counts, sumNs: try u64(field + ".sum_ns"))
    }
}
