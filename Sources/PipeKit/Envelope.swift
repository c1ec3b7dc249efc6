import Foundation

/// A 128-bit envelope id: the dedup and ack key. Roots get a random id at ingest; derived
/// envelopes get a deterministic one (``EnvelopeID/derived(from:output:index:)``).
public struct EnvelopeID: Hashable, Sendable, Comparable, CustomStringConvertible {
    public var hi: UInt64
    public var lo: UInt64

    public init(hi: UInt64, lo: UInt64) { self.hi = hi; self.lo = lo }

    /// A random id from the kernel's generator (read in bulk: ``RandomPool``).
    public static func random() -> EnvelopeID {
        let (hi, lo) = RandomPool.shared.pair()
        return EnvelopeID(hi: hi, lo: lo)
    }

    public static func random<G: RandomNumberGenerator>(using g: inout G) -> EnvelopeID {
        EnvelopeID(hi: g.next(), lo: g.next())
    }

    /// The 16 bytes, big-endian (`hi` first), as on the wire and in hex form.
    public var bytes: [UInt8] {
        var out = [UInt8](repeating: 0, count: 16)
        for i in 0..<8 {
            out[i] = UInt8(truncatingIfNeeded: hi >> (56 - 8 * UInt64(i)))
            out[8 + i] = UInt8(truncatingIfNeeded: lo >> (56 - 8 * UInt64(i)))
        }
        return out
    }

    /// From 16 big-endian bytes in memory.
    @inline(__always) public init(raw: UnsafeRawBufferPointer) {
        hi = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt64.self))
        lo = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
    }

    public init?(bytes: some Collection<UInt8>) {
        guard bytes.count == 16 else { return nil }
        var hi: UInt64 = 0, lo: UInt64 = 0
        for (i, b) in bytes.enumerated() {
            if i < 8 { hi = hi << 8 | UInt64(b) } else { lo = lo << 8 | UInt64(b) }
        }
        self.hi = hi; self.lo = lo
    }

    /// 32 lower-case hex digits.
    public var description: String {
        String(unsafeUninitializedCapacity: 32) { buf in
            for i in 0..<16 {
                let b = UInt8(truncatingIfNeeded: (i < 8 ? hi : lo) >> (56 - 8 * UInt64(i & 7)))
                buf[2 * i] = Hex.digit(b >> 4); buf[2 * i + 1] = Hex.digit(b & 15)
            }
            return 32
        }
    }

    public init?(hex: String) {
        guard hex.utf8.count == 32, let b = Hex.decode(hex) else { return nil }
        self.init(bytes: b)
    }

    /// Deterministic id of an envelope derived from `parent` on `output` as its `index`-th emission:
    /// the first 16 bytes of SHA-256("pipe.derive.v1" || parent(16) || u16le(len) || output || u32le(index)).
    /// A replay after a crash recreates the same ids, so sinks can deduplicate.
    public static func derived(from parent: EnvelopeID, output: String, index: UInt32) -> EnvelopeID {
        var w = ByteWriter(capacity: 64)
        w.bytes(Array("pipe.derive.v1".utf8))
        w.bytes(parent.bytes)
        w.str16(output)
        w.u32(index)
        let digest = SHA256.hash(w.buffer)
        return digest.withUnsafeBytes { EnvelopeID(raw: $0) }  // the first 16 of 32 bytes
    }

    public static func < (a: EnvelopeID, b: EnvelopeID) -> Bool { (a.hi, a.lo) < (b.hi, b.lo) }
}

/// A typed scalar attribute value.
public enum AttrValue: Sendable, Hashable, CustomStringConvertible {
    case string(String)
    case int(Int64)
    case double(Double)
    case bool(Bool)

    public var description: String {
        switch self {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .double(let d): return String(d)
        case .bool(let b): return b ? "true" : "false"
        }
    }
    public var stringValue: String? { if case .string(let s) = self { return s } else { return nil } }
    public var intValue: Int64? { if case .int(let i) = self { return i } else { return nil } }
    public var doubleValue: Double? {
        switch self { case .double(let d): return d; case .int(let i): return Double(i); default: return nil }
    }
    public var boolValue: Bool? { if case .bool(let b) = self { return b } else { return nil } }
}

/// An Ed25519 signature with the signer's 8-byte key id.
public struct EnvelopeSignature: Sendable, Hashable {
    public var keyID: [UInt8]      // 8 bytes
    public var signature: [UInt8]  // 64 bytes
    public init(keyID: [UInt8], signature: [UInt8]) { self.keyID = keyID; self.signature = signature }
}

/// Everything that flows is an envelope: a small typed header plus opaque payload bytes.
/// Field meanings are in CONCEPTS.md ("The envelope"); the binary form is in docs/wire-format.md.
///
/// Value semantics over one copy-on-write storage box: copying an envelope (into a lane's
/// sender queue, to each branch of a fan-out) costs one reference count, not one per field.
public struct Envelope: Sendable, Hashable {
    final class Storage: @unchecked Sendable {
        // @unchecked: copy-on-write. A Storage is mutated only through an Envelope that holds
        // the only reference (checked with isKnownUniquelyReferenced), so it is never shared mutably.
        var id: EnvelopeID
        var parent: EnvelopeID?
        var actor: String
        var intent: String
        var authority: String
        var rank: UInt64
        var clock: [String: UInt64]
        var lane: String
        var hops: UInt32
        var attempt: UInt32
        var ingestNs: UInt64
        var attrs: [String: AttrValue]
        var sig: EnvelopeSignature?
        /// The payload, when it is held as an array (made by a stage, or asked for by one).
        var payloadArray: [UInt8]
        /// The envelope as it came off the wire (malloc'd), its payload being the tail from
        /// `payloadOffset`. nil when `payloadArray` holds the payload.
        var wire: UnsafeMutableRawPointer?
        var wireCount = 0
        var payloadOffset = 0
        /// True while nothing was changed since decoding: the wire bytes are then the encoding,
        /// so forwarding copies them instead of encoding field by field.
        var pristine = false
        init(id: EnvelopeID, parent: EnvelopeID?, actor: String, intent: String, authority: String, rank: UInt64,
             clock: [String: UInt64], lane: String, hops: UInt32, attempt: UInt32, ingestNs: UInt64,
             attrs: [String: AttrValue], sig: EnvelopeSignature?, payload: [UInt8]) {
            self.id = id; self.parent = parent; self.actor = actor; self.intent = intent; self.authority = authority
            self.rank = rank; self.clock = clock; self.lane = lane; self.hops = hops; self.attempt = attempt
            self.ingestNs = ingestNs; self.attrs = attrs; self.sig = sig; self.payloadArray = payload
        }
        deinit { free(wire) }
        func copy() -> Storage {
            let c = Storage(id: id, parent: parent, actor: actor, intent: intent, authority: authority, rank: rank, clock: clock, lane: lane,
                            hops: hops, attempt: attempt, ingestNs: ingestNs, attrs: attrs, sig: sig, payload: payloadArray)
            if let wire { c.setWire(UnsafeRawBufferPointer(start: wire, count: wireCount), payloadOffset: payloadOffset) }
            c.pristine = pristine
            return c
        }
        /// Takes a copy of an encoded envelope whose payload starts at `payloadOffset`.
        func setWire(_ bytes: UnsafeRawBufferPointer, payloadOffset: Int) {
            free(wire); wire = nil; wireCount = 0; self.payloadOffset = 0
            payloadArray = []
            guard bytes.count > 0, payloadOffset <= bytes.count, let src = bytes.baseAddress, let p = malloc(bytes.count) else { return }
            p.copyMemory(from: src, byteCount: bytes.count)
            wire = p; wireCount = bytes.count; self.payloadOffset = payloadOffset
        }
        /// Moves the payload into `payloadArray` (before a stage mutates it).
        func materialize() {
            guard let w = wire else { return }
            payloadArray = Array(UnsafeRawBufferPointer(start: w + payloadOffset, count: wireCount - payloadOffset))
            free(w); wire = nil; wireCount = 0; payloadOffset = 0
            pristine = false
        }
        var payloadCount: Int { wire != nil ? wireCount - payloadOffset : payloadArray.count }
        func withPayload<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
            if let wire { return try body(UnsafeRawBufferPointer(start: wire + payloadOffset, count: wireCount - payloadOffset)) }
            return try payloadArray.withUnsafeBytes(body)
        }
    }
    var s: Storage

    @inline(__always) mutating func unique() { if !isKnownUniquelyReferenced(&s) { s = s.copy() } }

    /// The identity of the storage box. While another copy of the envelope is held, any change
    /// moves it to a new box, so the same identity then means the same, unchanged envelope.
    package var storageIdentity: ObjectIdentifier { ObjectIdentifier(s) }

    public var id: EnvelopeID { get { s.id } set { unique(); s.pristine = false; s.id = newValue } }
    public var parent: EnvelopeID? { get { s.parent } set { unique(); s.pristine = false; s.parent = newValue } }
    /// Who sent it (e.g. `codex.aint`).
    public var actor: String { get { s.actor } set { unique(); s.pristine = false; s.actor = newValue } }
    /// Dotted verb (e.g. `agent.tool.high`).
    public var intent: String { get { s.intent } set { unique(); s.pristine = false; s.intent = newValue } }
    public var authority: String { get { s.authority } set { unique(); s.pristine = false; s.authority = newValue } }
    /// Lamport rank; 0 = unplaced.
    public var rank: UInt64 { get { s.rank } set { unique(); s.pristine = false; s.rank = newValue } }
    /// Optional vector clock, actor -> counter.
    public var clock: [String: UInt64] { get { s.clock } _modify { unique(); s.pristine = false; yield &s.clock } }
    /// Lane it travels on (set by the mux).
    public var lane: String { get { s.lane } set { unique(); s.pristine = false; s.lane = newValue } }
    public var hops: UInt32 { get { s.hops } set { unique(); s.pristine = false; s.hops = newValue } }
    /// Delivery attempt, 1 on first delivery.
    public var attempt: UInt32 { get { s.attempt } set { unique(); s.pristine = false; s.attempt = newValue } }
    /// Wall-clock ingest time in ns since the Unix epoch.
    public var ingestNs: UInt64 { get { s.ingestNs } set { unique(); s.pristine = false; s.ingestNs = newValue } }
    public var attrs: [String: AttrValue] { get { s.attrs } _modify { unique(); s.pristine = false; yield &s.attrs } }
    public var sig: EnvelopeSignature? { get { s.sig } set { unique(); s.pristine = false; s.sig = newValue } }
    /// The payload bytes. Reading builds an array when the envelope came off the wire; stages that
    /// only measure or copy it should prefer ``payloadCount`` and ``withPayloadBytes(_:)``.
    public var payload: [UInt8] {
        get { s.wire == nil ? s.payloadArray : s.withPayload { Array($0) } }
        _modify { unique(); s.materialize(); yield &s.payloadArray }
    }
    /// The payload's length in bytes.
    public var payloadCount: Int { s.payloadCount }
    /// Borrowed view of the payload bytes, valid only inside `body`.
    public func withPayloadBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R { try s.withPayload(body) }

    /// Decoder's initialiser: keeps a copy of the whole encoding (`wire`, payload from `payloadOffset`).
    init(id: EnvelopeID, parent: EnvelopeID?, actor: String, intent: String, authority: String, rank: UInt64, clock: [String: UInt64],
         lane: String, hops: UInt32, attempt: UInt32, ingestNs: UInt64, attrs: [String: AttrValue], sig: EnvelopeSignature?,
         wire: UnsafeRawBufferPointer, payloadOffset: Int) {
        s = Storage(id: id, parent: parent, actor: actor, intent: intent, authority: authority, rank: rank, clock: clock, lane: lane,
                    hops: hops, attempt: attempt, ingestNs: ingestNs, attrs: attrs, sig: sig, payload: [])
        s.setWire(wire, payloadOffset: payloadOffset)
        s.pristine = true
    }

    /// The bytes this envelope was decoded from, while nothing has changed since (else nil).
    @inline(__always) func withPristineWire<R>(_ body: (UnsafeRawBufferPointer) -> R) -> R? {
        guard s.pristine, let w = s.wire else { return nil }
        return body(UnsafeRawBufferPointer(start: w, count: s.wireCount))
    }
    @inline(__always) var pristineWireCount: Int? { s.pristine && s.wire != nil ? s.wireCount : nil }

    public init(id: EnvelopeID = .random(), parent: EnvelopeID? = nil, actor: String = "", intent: String = "",
                authority: String = "", rank: UInt64 = 0, clock: [String: UInt64] = [:], lane: String = "",
                hops: UInt32 = 0, attempt: UInt32 = 1, ingestNs: UInt64 = 0, attrs: [String: AttrValue] = [:],
                sig: EnvelopeSignature? = nil, payload: [UInt8] = []) {
        s = Storage(id: id, parent: parent, actor: actor, intent: intent, authority: authority, rank: rank, clock: clock, lane: lane,
                    hops: hops, attempt: attempt, ingestNs: ingestNs, attrs: attrs, sig: sig, payload: payload)
    }

    public static func == (a: Envelope, b: Envelope) -> Bool {
        if a.s === b.s { return true }
        let x = a.s, y = b.s
        return x.id == y.id && x.parent == y.parent && x.actor == y.actor && x.intent == y.intent && x.authority == y.authority
            && x.rank == y.rank && x.clock == y.clock && x.lane == y.lane && x.hops == y.hops && x.attempt == y.attempt
            && x.ingestNs == y.ingestNs && x.attrs == y.attrs && x.sig == y.sig && x.payloadCount == y.payloadCount
            && x.withPayload { p in y.withPayload { q in p.elementsEqual(q) } }
    }

    public func hash(into h: inout Hasher) {
        h.combine(s.id); h.combine(s.parent); h.combine(s.actor); h.combine(s.intent); h.combine(s.rank); s.withPayload { h.combine(bytes: $0) }
    }

    /// A new envelope derived from this one: deterministic id, `parent` set, header copied, no signature.
    public func derived(output: String, index: UInt32, payload: [UInt8]? = nil) -> Envelope {
        var e = self
        e.id = .derived(from: id, output: output, index: index)
        e.parent = id
        e.sig = nil
        if let payload { e.payload = payload }
        return e
    }
}

/// Lower-case hex helpers.
public enum Hex {
    private static let digits = Array("0123456789abcdef".utf8)
    @inline(__always) static func digit(_ v: UInt8) -> UInt8 { v < 10 ? 0x30 + v : 0x57 + v }
    /// The common case, without generic dispatch: hex of a byte array.
    public static func encode(_ bytes: [UInt8]) -> String {
        String(unsafeUninitializedCapacity: bytes.count * 2) { buf in
            bytes.withUnsafeBufferPointer { src in
                var i = 0
                for b in src { buf[i] = digit(b >> 4); buf[i + 1] = digit(b & 15); i += 2 }
                return i
            }
        }
    }
    /// Appends the hex of `bytes` to `out` (lower case).
    public static func append(_ bytes: [UInt8], to out: inout [UInt8]) {
        out.reserveCapacity(out.count + bytes.count * 2)
        for b in bytes { out.append(digit(b >> 4)); out.append(digit(b & 15)) }
    }
    public static func encode(_ bytes: some Collection<UInt8>) -> String {
        String(unsafeUninitializedCapacity: bytes.count * 2) { buf in
            var i = 0
            for b in bytes { buf[i] = digits[Int(b >> 4)]; buf[i + 1] = digits[Int(b & 15)]; i += 2 }
            return i
        }
    }
    /// The value of one hex digit (either case), or nil.
    @inline(__always) public static func nibble(_ c: UInt8) -> UInt8? {
        switch c {
        case 48...57: return c - 48
        case 97...102: return c - 87
        case 65...70: return c - 55
        default: return nil
        }
    }
    /// Four hex digits (a JSON `\u` escape's) as a number, or nil.
    public static func quad(_ digits: some Collection<UInt8>) -> UInt32? {
        guard digits.count == 4 else { return nil }
        var v: UInt32 = 0
        for c in digits { guard let d = nibble(c) else { return nil }; v = v << 4 | UInt32(d) }
        return v
    }
    public static func decode(_ s: String) -> [UInt8]? {
        let u = Array(s.utf8)
        guard u.count % 2 == 0 else { return nil }
        let v = nibble
        var out = [UInt8](); out.reserveCapacity(u.count / 2)
        var i = 0
        while i < u.count {
            guard let h = v(u[i]), let l = v(u[i + 1]) else { return nil }
            out.append(h << 4 | l); i += 2
        }
        return out
    }
}
