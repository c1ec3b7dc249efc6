import Foundation
/// Limits enforced by every decoder (and checked before encoding), from docs/wire-format.md.
public struct WireLimits: Sendable, Hashable {
    /// Largest encoded envelope, header and payload included.
    public var maxEnvelopeBytes: Int
    /// Largest header string (actor, intent, authority, lane, clock actor).
    public var maxHeaderString: Int
    /// Largest attribute key.
    public var maxAttrKey: Int
    public var maxAttrs: Int
    public var maxClockEntries: Int
    /// Most envelopes in one data frame.
    public var maxBatchEnvelopes: Int

    public init(maxEnvelopeBytes: Int = 1 << 20, maxHeaderString: Int = 1024, maxAttrKey: Int = 128,
                maxAttrs: Int = 64, maxClockEntries: Int = 256, maxBatchEnvelopes: Int = 4096) {
        self.maxEnvelopeBytes = maxEnvelopeBytes; self.maxHeaderString = maxHeaderString
        self.maxAttrKey = maxAttrKey; self.maxAttrs = maxAttrs; self.maxClockEntries = maxClockEntries
        self.maxBatchEnvelopes = maxBatchEnvelopes
    }
    public static let standard = WireLimits()

    /// A producer packs at most this many bytes of envelopes (length prefixes included) into one
    /// DATA frame, or a single envelope when that one alone is larger.
    public static let frameEnvelopeBytes = 1 << 20

    /// Four times the largest legal DATA frame: the ZMQ_MAXMSGSIZE outer guard (ARCHITECTURE.md).
    /// A frame holds at most ``frameEnvelopeBytes`` of envelopes or one envelope (whichever is
    /// more), and at most `maxBatchEnvelopes` of them.
    public var maxFrameBytes: Int {
        let envelopes = Swift.min(maxBatchEnvelopes * (4 + maxEnvelopeBytes), Swift.max(Self.frameEnvelopeBytes, 4 + maxEnvelopeBytes))
        return FrameHeader.size + 12 + 4 * envelopes
    }
}

/// Binary envelope encoding, version 1 (docs/wire-format.md, "Envelope").
public enum EnvelopeCodec {
    public static let version: UInt8 = 1
    static let flagParent: UInt8 = 0x01, flagClock: UInt8 = 0x02, flagSig: UInt8 = 0x04

    /// Why an envelope cannot be encoded (a stage produced something over the limits).
    public struct EncodeError: Error, Sendable, CustomStringConvertible {
        public let reason: String
        public var description: String { reason }
    }

    /// Checks the limits that the decoder enforces, so that we never send what a peer must refuse.
    public static func check(_ e: Envelope, limits: WireLimits = .standard) throws(EncodeError) {
        // Unchanged since it was decoded: the decoder checked these same limits on these bytes.
        if let n = e.pristineWireCount, n <= limits.maxEnvelopeBytes { return }
        let h = limits.maxHeaderString
        if e.actor.utf8.count > h { throw EncodeError(reason: "actor is \(e.actor.utf8.count) bytes, limit \(h)") }
        if e.intent.utf8.count > h { throw EncodeError(reason: "intent is \(e.intent.utf8.count) bytes, limit \(h)") }
        if e.authority.utf8.count > h { throw EncodeError(reason: "authority is \(e.authority.utf8.count) bytes, limit \(h)") }
        if e.lane.utf8.count > h { throw EncodeError(reason: "lane is \(e.lane.utf8.count) bytes, limit \(h)") }
        if e.attrs.count > limits.maxAttrs { throw EncodeError(reason: "\(e.attrs.count) attrs, limit \(limits.maxAttrs)") }
        if e.clock.count > limits.maxClockEntries { throw EncodeError(reason: "\(e.clock.count) clock entries, limit \(limits.maxClockEntries)") }
        if !e.attrs.isEmpty {
            for (k, v) in e.attrs {
                if k.utf8.count > limits.maxAttrKey { throw EncodeError(reason: "attr key '\(k.prefix(40))' over \(limits.maxAttrKey) bytes") }
                if case .string(let s) = v, s.utf8.count > 65535 { throw EncodeError(reason: "attr '\(k)' value over 65535 bytes") }
            }
        }
        if !e.clock.isEmpty { for (k, _) in e.clock where k.utf8.count > h { throw EncodeError(reason: "clock actor over \(h) bytes") } }
        if let s = e.sig, s.keyID.count != 8 || s.signature.count != 64 {
            throw EncodeError(reason: "signature must be 8-byte key id + 64-byte signature")
        }
        let size = encodedSize(e)
        if size > limits.maxEnvelopeBytes { throw EncodeError(reason: "envelope is \(size) bytes, limit \(limits.maxEnvelopeBytes)") }
    }

    /// The exact size of the encoding of `e`.
    @inline(__always) public static func encodedSize(_ e: Envelope) -> Int {
        if let n = e.pristineWireCount { return n }
        var n = 2 + 16 + 24 + 8 + e.actor.utf8.count + e.intent.utf8.count + e.authority.utf8.count + e.lane.utf8.count + 2 + 4 + e.payloadCount
        if e.parent != nil { n += 16 }
        if !e.clock.isEmpty { n += 2; for (k, _) in e.clock { n += 10 + k.utf8.count } }
        if !e.attrs.isEmpty {
            for (k, v) in e.attrs {
                n += 3 + k.utf8.count
                switch v { case .string(let s): n += 2 + s.utf8.count; case .int, .double: n += 8; case .bool: n += 1 }
            }
        }
        if e.sig != nil { n += 72 }
        return n
    }

    /// Appends the encoding of `e` (no length prefix). Attrs and clock entries are written in
    /// ascending key order (byte-wise UTF-8), so the encoding is canonical.
    public static func encode(_ e: Envelope, into w: inout ByteWriter) {
        w.appendRaw(count: encodedSize(e)) { encode(e, raw: &$0) }
    }

    /// Writes the encoding into memory sized with ``encodedSize(_:)``.
    @inline(__always) public static func encode(_ e: Envelope, raw w: inout RawWriter) {
        if e.withPristineWire({ w.bytes($0) }) != nil { return }
        var flags: UInt8 = 0
        if e.parent != nil { flags |= flagParent }
        if !e.clock.isEmpty { flags |= flagClock }
        if e.sig != nil { flags |= flagSig }
        w.u8(version)
        w.u8(flags)
        w.id(e.id)
        if let p = e.parent { w.id(p) }
        w.u64(e.rank); w.u32(e.hops); w.u32(e.attempt); w.u64(e.ingestNs)
        w.str16(e.actor); w.str16(e.intent); w.str16(e.authority); w.str16(e.lane)
        if !e.clock.isEmpty {
            w.u16(UInt16(truncatingIfNeeded: e.clock.count))
            for k in e.clock.keys.sorted(by: utf8Less) { w.str16(k); w.u64(e.clock[k] ?? 0) }
        }
        w.u16(UInt16(truncatingIfNeeded: e.attrs.count))
        if !e.attrs.isEmpty {
            for k in e.attrs.keys.sorted(by: utf8Less) {
                w.str16(k)
                switch e.attrs[k] ?? .bool(false) {
                case .string(let s): w.u8(1); w.str16(s)
                case .int(let i): w.u8(2); w.u64(UInt64(bitPattern: i))
                case .double(let d): w.u8(3); w.u64(d.bitPattern)
                case .bool(let b): w.u8(4); w.u8(b ? 1 : 0)
                }
            }
        }
        if let s = e.sig {
            // Exactly 8 + 64 bytes whatever the arrays hold (check() refuses other sizes before sending).
            for i in 0..<8 { w.u8(i < s.keyID.count ? s.keyID[i] : 0) }
            for i in 0..<64 { w.u8(i < s.signature.count ? s.signature[i] : 0) }
        }
        w.u32(UInt32(truncatingIfNeeded: e.payloadCount))
        e.withPayloadBytes { w.bytes($0) }
    }

    public static func encode(_ e: Envelope) -> [UInt8] {
        var w = ByteWriter(capacity: encodedSize(e))
        encode(e, into: &w)
        return w.buffer
    }

    // Shared empty maps: most envelopes carry none, and a literal `[:]` per envelope costs a
    // generic metadata lookup.
    static let noAttrs: [String: AttrValue] = [:]
    static let noClock: [String: UInt64] = [:]

    @inline(__always) static func utf8Less(_ a: String, _ b: String) -> Bool { a.utf8.lexicographicallyPrecedes(b.utf8) }

    /// Header strings repeat from envelope to envelope (the same actor, intent, lane): a decoder
    /// reuses the last String made for each field when the bytes are the same, instead of
    /// building and validating a new one.
    public struct StringCache {
        var last: [(bytes: [UInt8], string: String)] = Array(repeating: ([], ""), count: 4)
        public init() {}
        @inline(__always) mutating func string(_ field: Int, _ r: inout ByteReader, _ name: String, limit: Int) throws(DecodeError) -> String {
            let start = r.offset
            let n = Int(try r.u16(name))
            if n == 0 { return "" }
            if n <= limit, r.remaining >= n, last[field].bytes.count == n {
                let p = UnsafeRawBufferPointer(rebasing: r.base[(start + 2)..<(start + 2 + n)])
                let same = last[field].bytes.withUnsafeBytes { q in
                    guard let a = q.baseAddress, let b = p.baseAddress else { return false }
                    return memcmp(a, b, n) == 0
                }
                if same { r.offset += n; return last[field].string }
            }
            r.offset = start
            let s = try r.str16(name, limit: limit)
            last[field] = (Array(UnsafeRawBufferPointer(rebasing: r.base[(start + 2)..<(start + 2 + n)])), s)
            return s
        }
    }

    /// Decodes exactly one envelope occupying all of `bytes`.
    public static func decode(_ bytes: UnsafeRawBufferPointer, limits: WireLimits = .standard) throws(DecodeError) -> Envelope {
        var cache = StringCache()
        return try decode(bytes, limits: limits, cache: &cache)
    }

    /// Decodes one envelope, reusing header strings from `cache` (see ``StringCache``).
    public static func decode(_ bytes: UnsafeRawBufferPointer, limits: WireLimits, cache: inout StringCache) throws(DecodeError) -> Envelope {
        if bytes.count > limits.maxEnvelopeBytes { throw .tooLarge(field: "envelope", size: bytes.count, limit: limits.maxEnvelopeBytes) }
        var r = ByteReader(bytes)
        let v = try r.u8("envelope.version")
        guard v == version else { throw .unsupportedVersion(v) }
        let flags = try r.u8("envelope.flags")
        if flags & ~(flagParent | flagClock | flagSig) != 0 { throw .invalid(field: "envelope.flags", reason: "unknown bits 0x\(String(flags, radix: 16))") }
        let id = EnvelopeID(raw: try r.slice(16, "envelope.id"))
        var parent: EnvelopeID? = nil
        if flags & flagParent != 0 { parent = EnvelopeID(raw: try r.slice(16, "envelope.parent")) }
        let rank = try r.u64("envelope.rank"), hops = try r.u32("envelope.hops")
        let attempt = try r.u32("envelope.attempt"), ingest = try r.u64("envelope.ingest_ns")
        let actor = try cache.string(0, &r, "envelope.actor", limit: limits.maxHeaderString)
        let intent = try cache.string(1, &r, "envelope.intent", limit: limits.maxHeaderString)
        let authority = try cache.string(2, &r, "envelope.authority", limit: limits.maxHeaderString)
        let lane = try cache.string(3, &r, "envelope.lane", limit: limits.maxHeaderString)
        var clock = Self.noClock
        if flags & flagClock != 0 {
            let n = Int(try r.u16("envelope.clock.count"))
            if n > limits.maxClockEntries { throw .tooLarge(field: "envelope.clock", size: n, limit: limits.maxClockEntries) }
            for _ in 0..<n {
                let k = try r.str16("envelope.clock.actor", limit: limits.maxHeaderString)
                clock[k] = try r.u64("envelope.clock.counter")
            }
        }
        let na = Int(try r.u16("envelope.attrs.count"))
        if na > limits.maxAttrs { throw .tooLarge(field: "envelope.attrs", size: na, limit: limits.maxAttrs) }
        var attrs = Self.noAttrs
        if na > 0 {
            attrs.reserveCapacity(na)
            for _ in 0..<na {
                let k = try r.str16("envelope.attr.key", limit: limits.maxAttrKey)
                let tag = try r.u8("envelope.attr.type")
                switch tag {
                case 1: attrs[k] = .string(try r.str16("envelope.attr.string", limit: 65535))
                case 2: attrs[k] = .int(Int64(bitPattern: try r.u64("envelope.attr.int")))
                case 3: attrs[k] = .double(Double(bitPattern: try r.u64("envelope.attr.double")))
                case 4:
                    let b = try r.u8("envelope.attr.bool")
                    guard b <= 1 else { throw .invalid(field: "envelope.attr.bool", reason: "value \(b)") }
                    attrs[k] = .bool(b == 1)
                default: throw .invalid(field: "envelope.attr.type", reason: "unknown type \(tag)")
                }
            }
        }
        var sig: EnvelopeSignature? = nil
        if flags & flagSig != 0 {
            sig = EnvelopeSignature(keyID: try r.bytes(8, "envelope.sig.key_id"), signature: try r.bytes(64, "envelope.sig"))
        }
        let plen = Int(try r.u32("envelope.payload.length"))
        if plen > limits.maxEnvelopeBytes { throw .tooLarge(field: "envelope.payload", size: plen, limit: limits.maxEnvelopeBytes) }
        let payloadOffset = r.offset
        _ = try r.slice(plen, "envelope.payload")
        if r.remaining != 0 { throw .invalid(field: "envelope", reason: "\(r.remaining) trailing bytes") }
        return Envelope(id: id, parent: parent, actor: actor, intent: intent, authority: authority, rank: rank,
                        clock: clock, lane: lane, hops: hops, attempt: attempt, ingestNs: ingest, attrs: attrs,
                        sig: sig, wire: bytes, payloadOffset: payloadOffset)
    }

    public static func decode(_ bytes: [UInt8], limits: WireLimits = .standard) throws(DecodeError) -> Envelope {
        let r: Result<Envelope, DecodeError> = bytes.withUnsafeBytes { p in
            Result { () throws(DecodeError) -> Envelope in try decode(p, limits: limits) }
        }
        return try r.get()
    }
}
