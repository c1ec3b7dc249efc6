/// The lane protocol's frame types (docs/wire-format.md, "Frames").
public enum FrameType: UInt8, Sendable, CaseIterable, CustomStringConvertible {
    case data = 0x01       // a batch of envelopes, producer -> consumer
    case endOfStream = 0x02 // producer -> consumer: no more data on this lane
    case credit = 0x03     // consumer -> producer: grants more envelopes
    case ack = 0x04        // consumer -> producer: envelope ids fully handled (docs/delivery.md)
    case heartbeat = 0x05  // either way, liveness
    case stats = 0x06      // runner -> host: counters and status report
    case audit = 0x07      // runner -> host: one audit record
    case hello = 0x08      // worker -> host: who I am
    case assign = 0x09     // host -> worker: your stage and its lanes
    case command = 0x0A    // host -> runner: loop closed, stop, finish
    case handoff = 0x0B    // producer -> consumer in the same process: a batch handed over by reference

    public var description: String {
        switch self {
        case .data: return "DATA"; case .endOfStream: return "EOS"; case .credit: return "CREDIT"
        case .ack: return "ACK"; case .heartbeat: return "HEARTBEAT"; case .stats: return "STATS"
        case .audit: return "AUDIT"; case .hello: return "HELLO"; case .assign: return "ASSIGN"
        case .command: return "COMMAND"; case .handoff: return "HANDOFF"
        }
    }
}

/// The 16-byte header that starts every frame: magic "PL", version, type, lane, sequence number.
public struct FrameHeader: Sendable, Equatable {
    public static let size = 16
    public static let magic: (UInt8, UInt8) = (0x50, 0x4C)
    public static let version: UInt8 = 1
    /// Lane id 0 is the control channel between a runner and the host.
    public static let controlLane: UInt32 = 0

    public var type: FrameType
    public var lane: UInt32
    public var seq: UInt64
    public init(type: FrameType, lane: UInt32, seq: UInt64) { self.type = type; self.lane = lane; self.seq = seq }
    /// Overwrites the sequence number of an encoded header (bytes 8..<16).
    public static func patchSeq(in frame: UnsafeMutableRawBufferPointer, _ seq: UInt64) {
        guard frame.count >= size else { return }
        frame.storeBytes(of: seq.littleEndian, toByteOffset: 8, as: UInt64.self)
    }

    public func write(into w: inout ByteWriter) {
        w.u8(Self.magic.0); w.u8(Self.magic.1); w.u8(Self.version); w.u8(type.rawValue)
        w.u32(lane); w.u64(seq)
    }
}

/// A decoded frame header and its body, borrowed from the message buffer.
public struct FrameView {
    public let header: FrameHeader
    public let body: UnsafeRawBufferPointer

    /// Parses the header; the body is checked by the type-specific decoders below.
    public init(_ bytes: UnsafeRawBufferPointer) throws(DecodeError) {
        var r = ByteReader(bytes)
        guard bytes.count >= FrameHeader.size else { throw .truncated(field: "frame.header", need: FrameHeader.size, have: bytes.count) }
        let m0 = try r.u8("magic"), m1 = try r.u8("magic")
        guard m0 == FrameHeader.magic.0, m1 == FrameHeader.magic.1 else { throw .badMagic }
        let v = try r.u8("frame.version")
        guard v == FrameHeader.version else { throw .unsupportedVersion(v) }
        let t = try r.u8("frame.type")
        guard let type = FrameType(rawValue: t) else { throw .unknownFrameType(t) }
        let lane = try r.u32("frame.lane"), seq = try r.u64("frame.seq")
        header = FrameHeader(type: type, lane: lane, seq: seq)
        body = UnsafeRawBufferPointer(rebasing: bytes[FrameHeader.size...])
    }

    /// Iterates the envelopes of a DATA frame. A frame whose structure is broken throws; an
    /// envelope that is individually malformed or oversized is reported to `each` as a failure
    /// with its raw bytes, so that the runner can dead-letter it and go on with the batch.
    /// A DATA frame's send time (wall clock ns), or nil when the body is too short.
    public var dataSentNs: UInt64? { body.count >= 8 ? UInt64(littleEndian: body.loadUnaligned(as: UInt64.self)) : nil }
    /// The envelope count a DATA frame declares, or 0 when the body is too short.
    public var dataDeclaredCount: Int { body.count >= 12 ? Int(UInt32(littleEndian: body.loadUnaligned(fromByteOffset: 8, as: UInt32.self))) : 0 }

    public func forEachEnvelope(limits: WireLimits,
                                _ each: (Result<Envelope, DecodeError>, UnsafeRawBufferPointer) -> Void) throws(DecodeError) {
        guard header.type == .data else { throw .invalid(field: "frame.type", reason: "not DATA") }
        var r = ByteReader(body)
        _ = try r.u64("data.sent_ns")
        let n = Int(try r.u32("data.count"))
        if n > limits.maxBatchEnvelopes { throw .tooLarge(field: "data.count", size: n, limit: limits.maxBatchEnvelopes) }
        // Every envelope needs at least its 4-byte length: refuse counts the body cannot hold.
        if n * 4 > r.remaining { throw .truncated(field: "data.envelopes", need: n * 4, have: r.remaining) }
        var cache = EnvelopeCodec.StringCache()
        for _ in 0..<n {
            let len = Int(try r.u32("data.envelope.length"))
            let raw = try r.slice(len, "data.envelope")
            if len > limits.maxEnvelopeBytes {
                each(.failure(.tooLarge(field: "envelope", size: len, limit: limits.maxEnvelopeBytes)), raw)
                continue
            }
            do { each(.success(try EnvelopeCodec.decode(raw, limits: limits, cache: &cache)), raw) }
            catch { each(.failure(error), raw) }
        }
        if r.remaining != 0 { throw .invalid(field: "data", reason: "\(r.remaining) trailing bytes") }
    }

    private func fixed(_ n: Int, _ what: String) throws(DecodeError) -> ByteReader {
        guard body.count == n else {
            if body.count < n { throw .truncated(field: what, need: n, have: body.count) }
            throw .invalid(field: what, reason: "body is \(body.count) bytes, expected \(n)")
        }
        return ByteReader(body)
    }

    /// EOS body: u64 envelopes sent on the lane in total.
    public func endOfStreamTotal() throws(DecodeError) -> UInt64 { var r = try fixed(8, "eos"); return try r.u64("eos.total") }
    /// CREDIT body: u32 epoch, u64 limit. In `epoch`, the producer may have transmitted up to
    /// `limit` envelopes in total (cumulative, so a duplicated or lost CREDIT frame does no harm).
    /// A new epoch starts when either end restarts; the producer then counts from zero.
    public func credit() throws(DecodeError) -> (epoch: UInt32, limit: UInt64) {
        var r = try fixed(12, "credit"); return (try r.u32("credit.epoch"), try r.u64("credit.limit"))
    }
    /// HANDOFF body: u64 sent_ns, u32 count, u64 token (the same first 12 bytes as DATA, so
    /// ``dataSentNs`` and ``dataDeclaredCount`` read it too).
    public func handoff() throws(DecodeError) -> (sentNs: UInt64, count: Int, token: UInt64) {
        guard header.type == .handoff else { throw .invalid(field: "frame.type", reason: "not HANDOFF") }
        var r = try fixed(20, "handoff")
        return (try r.u64("handoff.sent_ns"), Int(try r.u32("handoff.count")), try r.u64("handoff.token"))
    }
    /// HEARTBEAT body: u64 sender clock in ns.
    public func heartbeatTime() throws(DecodeError) -> UInt64 { var r = try fixed(8, "heartbeat"); return try r.u64("heartbeat.time") }
    /// ACK body, without building an array: calls `each` for every id (docs/delivery.md).
    public func forEachAckID(limit: Int = 65536, _ each: (EnvelopeID) -> Void) throws(DecodeError) {
        guard header.type == .ack else { throw .invalid(field: "frame.type", reason: "not ACK") }
        guard body.count >= 4 else { throw .truncated(field: "ack.count", need: 4, have: body.count) }
        let n = Int(UInt32(littleEndian: body.loadUnaligned(as: UInt32.self)))
        if n > limit { throw .tooLarge(field: "ack.count", size: n, limit: limit) }
        guard body.count - 4 == n * 16 else { throw .invalid(field: "ack", reason: "expected \(n * 16) id bytes, have \(body.count - 4)") }
        for i in 0..<n { each(EnvelopeID(raw: UnsafeRawBufferPointer(rebasing: body[(4 + 16 * i)..<(20 + 16 * i)]))) }
    }
    /// ACK body: u32 count, count x 16-byte ids: the envelopes sent on the lane that are fully handled.
    public func ackIDs(limit: Int = 65536) throws(DecodeError) -> [EnvelopeID] {
        var r = ByteReader(body)
        let n = Int(try r.u32("ack.count"))
        if n > limit { throw .tooLarge(field: "ack.count", size: n, limit: limit) }
        guard r.remaining == n * 16 else { throw .invalid(field: "ack", reason: "expected \(n * 16) id bytes, have \(r.remaining)") }
        var ids = [EnvelopeID](); ids.reserveCapacity(n)
        for _ in 0..<n { if let id = EnvelopeID(bytes: try r.slice(16, "ack.id")) { ids.append(id) } }
        return ids
    }
    /// COMMAND body: u8 code, u64 argument.
    public func command() throws(DecodeError) -> RunnerCommand {
        var r = try fixed(9, "command")
        let c = try r.u8("command.code"), arg = try r.u64("command.arg")
        guard let code = RunnerCommand.Code(rawValue: c) else { throw .invalid(field: "command.code", reason: "unknown \(c)") }
        return RunnerCommand(code: code, argument: arg)
    }
    /// Body bytes as UTF-8 text (ASSIGN and AUDIT bodies are UTF-8 JSON), at most `limit` bytes.
    public func utf8Body(limit: Int = 1 << 20) throws(DecodeError) -> String {
        if body.count > limit { throw .tooLarge(field: "\(header.type) body", size: body.count, limit: limit) }
        guard let s = String(validating: body, as: UTF8.self) else { throw .invalid(field: "\(header.type) body", reason: "not UTF-8") }
        return s
    }
}

/// Host -> runner control commands (COMMAND frame).
public struct RunnerCommand: Sendable, Equatable {
    public enum Code: UInt8, Sendable {
        /// The host found the loop through this stage's loop-back inputs quiescent: end its input.
        case loopClosed = 1
        /// Graceful stop: sources stop producing and report themselves exhausted.
        case stop = 2
        /// Everything is drained: exit the runner.
        case finish = 3
        /// Abort at once (a failed pipeline).
        case abort = 4
    }
    public var code: Code
    public var argument: UInt64
    public init(code: Code, argument: UInt64 = 0) { self.code = code; self.argument = argument }
}

/// Encoders for every frame type. Each returns the whole frame (header + body).
public enum FrameEncoder {
    static func start(_ type: FrameType, lane: UInt32, seq: UInt64, capacity: Int = 32) -> ByteWriter {
        var w = ByteWriter(capacity: capacity)
        FrameHeader(type: type, lane: lane, seq: seq).write(into: &w)
        return w
    }
    public static func endOfStream(lane: UInt32, seq: UInt64, total: UInt64) -> [UInt8] {
        var w = start(.endOfStream, lane: lane, seq: seq); w.u64(total); return w.buffer
    }
    public static func credit(lane: UInt32, seq: UInt64, epoch: UInt32, limit: UInt64) -> [UInt8] {
        var w = start(.credit, lane: lane, seq: seq); w.u32(epoch); w.u64(limit); return w.buffer
    }
    /// HANDOFF: the DATA header fields (sent_ns, count), then the token of a batch the producer
    /// left in its process's handoff table (in-process lanes only; docs/wire-format.md).
    public static func handoff(lane: UInt32, seq: UInt64, sentNs: UInt64, count: Int, token: UInt64) -> [UInt8] {
        var w = start(.handoff, lane: lane, seq: seq); w.u64(sentNs); w.u32(UInt32(clamping: count)); w.u64(token); return w.buffer
    }
    public static func heartbeat(lane: UInt32, seq: UInt64, timeNs: UInt64) -> [UInt8] {
        var w = start(.heartbeat, lane: lane, seq: seq); w.u64(timeNs); return w.buffer
    }
    public static func ack(lane: UInt32, seq: UInt64, ids: [EnvelopeID]) -> [UInt8] {
        ids.withUnsafeBufferPointer { ack(lane: lane, seq: seq, ids: $0) }
    }
    /// An ACK frame written in place (the runner sends one per lane and loop pass, 16 bytes an id).
    public static func ack(lane: UInt32, seq: UInt64, ids: UnsafeBufferPointer<EnvelopeID>) -> [UInt8] {
        let size = FrameHeader.size + 4 + 16 * ids.count
        return [UInt8](unsafeUninitializedCapacity: size) { buf, n in
            guard let base = buf.baseAddress else { n = 0; return }
            var w = RawWriter(UnsafeMutableRawPointer(base))
            w.u8(FrameHeader.magic.0); w.u8(FrameHeader.magic.1); w.u8(FrameHeader.version); w.u8(FrameType.ack.rawValue)
            w.u32(lane); w.u64(seq)
            w.u32(UInt32(ids.count))
            for id in ids { w.id(id) }
            n = size
        }
    }
    public static func command(seq: UInt64, _ c: RunnerCommand) -> [UInt8] {
        var w = start(.command, lane: FrameHeader.controlLane, seq: seq); w.u8(c.code.rawValue); w.u64(c.argument); return w.buffer
    }
    /// A frame whose body is UTF-8 text (ASSIGN, AUDIT).
    public static func text(_ type: FrameType, lane: UInt32 = FrameHeader.controlLane, seq: UInt64, _ text: String) -> [UInt8] {
        var w = start(type, lane: lane, seq: seq, capacity: 16 + text.utf8.count); w.bytes(Array(text.utf8)); return w.buffer
    }
}

/// Builds a DATA frame in place: header, count placeholder, then length-prefixed envelopes.
public struct DataFrameBuilder {
    public private(set) var writer: ByteWriter
    public private(set) var count: Int = 0
    public init(lane: UInt32, seq: UInt64, sentNs: UInt64 = 0, capacity: Int = 4096) {
        writer = ByteWriter(capacity: capacity)
        FrameHeader(type: .data, lane: lane, seq: seq).write(into: &writer)
        writer.u64(sentNs)
        writer.u32(0)
    }
    public var byteCount: Int { writer.buffer.count }
    public mutating func append(_ e: Envelope) {
        let at = writer.buffer.count
        writer.u32(0)
        EnvelopeCodec.encode(e, into: &writer)
        writer.patchU32(at: at, UInt32(writer.buffer.count - at - 4))
        count += 1
    }
    /// The exact size of a DATA frame carrying `envelopes`.
    public static func size(of envelopes: UnsafeBufferPointer<Envelope>) -> Int {
        var total = FrameHeader.size + 12
        for e in envelopes { total += 4 + EnvelopeCodec.encodedSize(e) }
        return total
    }

    /// Writes a whole DATA frame into memory of exactly ``size(of:)`` bytes (the lanes' hot
    /// path writes straight into a ZeroMQ message buffer).
    public static func write(lane: UInt32, seq: UInt64, sentNs: UInt64 = 0, envelopes: UnsafeBufferPointer<Envelope>, into base: UnsafeMutableRawPointer) {
        var w = RawWriter(base)
        w.u8(FrameHeader.magic.0); w.u8(FrameHeader.magic.1); w.u8(FrameHeader.version); w.u8(FrameType.data.rawValue)
        w.u32(lane); w.u64(seq)
        w.u64(sentNs)
        w.u32(UInt32(envelopes.count))
        for e in envelopes {
            w.u32(UInt32(EnvelopeCodec.encodedSize(e)))
            EnvelopeCodec.encode(e, raw: &w)
        }
    }

    /// A whole DATA frame for `envelopes` as an array.
    public static func build(lane: UInt32, seq: UInt64, sentNs: UInt64 = 0, envelopes: UnsafeBufferPointer<Envelope>) -> [UInt8] {
        let total = size(of: envelopes)
        return [UInt8](unsafeUninitializedCapacity: total) { buf, count in
            guard let base = buf.baseAddress else { count = 0; return }
            write(lane: lane, seq: seq, sentNs: sentNs, envelopes: envelopes, into: UnsafeMutableRawPointer(base))
            count = total
        }
    }

    /// Appends an already encoded envelope.
    public mutating func append(encoded: some Collection<UInt8>) {
        writer.u32(UInt32(encoded.count)); writer.bytes(encoded); count += 1
    }
    public mutating func finish() -> [UInt8] {
        writer.patchU32(at: FrameHeader.size + 8, UInt32(count))
        return writer.buffer
    }
}

// MARK: - Attribute values on the wire

extension ByteWriter {
    /// Type tag (1 string, 2 int, 3 double, 4 bool) and value, as in envelope attrs.
    public mutating func attr(_ v: AttrValue) {
        switch v {
        case .string(let s): u8(1); str16(String(s.utf8.prefix(65535)) ?? "")
        case .int(let i): u8(2); u64(UInt64(bitPattern: i))
        case .double(let d): u8(3); u64(d.bitPattern)
        case .bool(let b): u8(4); u8(b ? 1 : 0)
        }
    }
}

extension ByteReader {
    public mutating func attr(_ f: String) throws(DecodeError) -> AttrValue {
        let tag = try u8(f + ".type")
        switch tag {
        case 1: return .string(try str16(f, limit: 65535))
        case 2: return .int(Int64(bitPattern: try u64(f)))
        case 3: return .double(Double(bitPattern: try u64(f)))
        case 4:
            let b = try u8(f)
            guard b <= 1 else { throw .invalid(field: f, reason: "bool value \(b)") }
            return .bool(b == 1)
        default: throw .invalid(field: f + ".type", reason: "unknown type \(tag)")
        }
    }
}
