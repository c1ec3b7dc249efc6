/// Little-endian byte writer used by every binary encoding in docs/wire-format.md.
public struct ByteWriter: Sendable {
    public var buffer: [UInt8]
    public init(capacity: Int = 256) { buffer = []; buffer.reserveCapacity(capacity) }
    @inline(__always) public mutating func u8(_ v: UInt8) { buffer.append(v) }
    @inline(__always) public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    @inline(__always) public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    @inline(__always) public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { buffer.append(contentsOf: $0) } }
    @inline(__always) public mutating func bytes(_ b: some Collection<UInt8>) { buffer.append(contentsOf: b) }
    /// u16 length + UTF-8 bytes. Callers enforce the length limit before encoding.
    @inline(__always) public mutating func str16(_ s: String) {
        var s = s
        s.withUTF8 { p in
            u16(UInt16(truncatingIfNeeded: p.count))
            buffer.append(contentsOf: p)
        }
    }
    /// Appends exactly `count` bytes written by `body` through a ``RawWriter``.
    public mutating func appendRaw(count: Int, _ body: (inout RawWriter) -> Void) {
        let start = buffer.count
        buffer.append(contentsOf: repeatElement(0, count: count))
        buffer.withUnsafeMutableBytes { raw in
            guard let base = raw.baseAddress else { return }
            var w = RawWriter(base + start)
            body(&w)
        }
    }
    /// Overwrites a u32 written earlier at `offset`.
    public mutating func patchU32(at offset: Int, _ v: UInt32) {
        let le = v.littleEndian
        for i in 0..<4 { buffer[offset + i] = UInt8(truncatingIfNeeded: le >> (8 * UInt32(i))) }
    }
}

/// Writes little-endian values straight into memory the caller has sized exactly (the hot
/// path of frame encoding: one allocation per frame, no bounds checks per field).
public struct RawWriter {
    public private(set) var p: UnsafeMutableRawPointer
    public init(_ p: UnsafeMutableRawPointer) { self.p = p }
    @inline(__always) public mutating func u8(_ v: UInt8) { p.storeBytes(of: v, as: UInt8.self); p += 1 }
    @inline(__always) public mutating func u16(_ v: UInt16) { p.storeBytes(of: v.littleEndian, as: UInt16.self); p += 2 }
    @inline(__always) public mutating func u32(_ v: UInt32) { p.storeBytes(of: v.littleEndian, as: UInt32.self); p += 4 }
    @inline(__always) public mutating func u64(_ v: UInt64) { p.storeBytes(of: v.littleEndian, as: UInt64.self); p += 8 }
    @inline(__always) public mutating func bytes(_ b: UnsafeRawBufferPointer) {
        if let base = b.baseAddress, b.count > 0 { p.copyMemory(from: base, byteCount: b.count) }
        p += b.count
    }
    @inline(__always) public mutating func bytes(_ b: [UInt8]) { b.withUnsafeBytes { bytes($0) } }
    /// u16 length + UTF-8 bytes (callers have checked the length).
    @inline(__always) public mutating func str16(_ s: String) {
        var s = s
        s.withUTF8 { u in
            u16(UInt16(truncatingIfNeeded: u.count))
            bytes(UnsafeRawBufferPointer(u))
        }
    }
    /// 16 bytes, big-endian `hi` then `lo` (the id's canonical byte order).
    @inline(__always) public mutating func id(_ id: EnvelopeID) {
        p.storeBytes(of: id.hi.bigEndian, as: UInt64.self); p.storeBytes(of: id.lo.bigEndian, toByteOffset: 8, as: UInt64.self); p += 16
    }
}

/// Why a binary decode failed. Decoding never trusts a length and never traps.
public enum DecodeError: Error, Sendable, Equatable, CustomStringConvertible {
    case truncated(field: String, need: Int, have: Int)
    case badMagic
    case unsupportedVersion(UInt8)
    case unknownFrameType(UInt8)
    case tooLarge(field: String, size: Int, limit: Int)
    case invalid(field: String, reason: String)

    public var description: String {
        switch self {
        case .truncated(let f, let n, let h): return "truncated \(f): need \(n) bytes, have \(h)"
        case .badMagic: return "bad frame magic"
        case .unsupportedVersion(let v): return "unsupported version \(v)"
        case .unknownFrameType(let t): return "unknown frame type 0x\(String(t, radix: 16))"
        case .tooLarge(let f, let s, let l): return "\(f) too large: \(s) > limit \(l)"
        case .invalid(let f, let r): return "invalid \(f): \(r)"
        }
    }
}

/// Bounds-checked little-endian reader over a byte buffer.
public struct ByteReader {
    public let base: UnsafeRawBufferPointer
    public var offset: Int
    public init(_ base: UnsafeRawBufferPointer, offset: Int = 0) { self.base = base; self.offset = offset }
    public var remaining: Int { base.count - offset }

    @inline(__always) mutating func need(_ n: Int, _ field: String) throws(DecodeError) {
        if n < 0 || remaining < n { throw .truncated(field: field, need: n, have: remaining) }
    }
    @inline(__always) public mutating func u8(_ f: String) throws(DecodeError) -> UInt8 {
        try need(1, f); defer { offset += 1 }; return base[offset]
    }
    @inline(__always) public mutating func u16(_ f: String) throws(DecodeError) -> UInt16 {
        try need(2, f); defer { offset += 2 }; return UInt16(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }
    @inline(__always) public mutating func u32(_ f: String) throws(DecodeError) -> UInt32 {
        try need(4, f); defer { offset += 4 }; return UInt32(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
    @inline(__always) public mutating func u64(_ f: String) throws(DecodeError) -> UInt64 {
        try need(8, f); defer { offset += 8 }; return UInt64(littleEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
    public mutating func bytes(_ n: Int, _ f: String) throws(DecodeError) -> [UInt8] {
        try need(n, f); defer { offset += n }
        guard n > 0, let start = base.baseAddress else { return [] }
        let src = start + offset
        return [UInt8](unsafeUninitializedCapacity: n) { buf, count in
            buf.baseAddress?.initialize(from: src.assumingMemoryBound(to: UInt8.self), count: n)
            count = n
        }
    }
    public mutating func slice(_ n: Int, _ f: String) throws(DecodeError) -> UnsafeRawBufferPointer {
        try need(n, f); defer { offset += n }
        return UnsafeRawBufferPointer(rebasing: base[offset..<(offset + n)])
    }
    /// u16 length + UTF-8, rejecting invalid UTF-8 and lengths above `limit`.
    public mutating func str16(_ f: String, limit: Int) throws(DecodeError) -> String {
        let n = Int(try u16(f))
        if n > limit { throw .tooLarge(field: f, size: n, limit: limit) }
        try need(n, f)
        let p = UnsafeRawBufferPointer(rebasing: base[offset..<(offset + n)])
        offset += n
        if n == 0 { return "" }
        // ASCII (the common case) needs no validation; anything else is validated, never repaired.
        let u = p.assumingMemoryBound(to: UInt8.self)
        var acc: UInt8 = 0
        for b in u { acc |= b }
        if acc < 0x80 { return String(decoding: u, as: UTF8.self) }
        guard let s = String(validating: u, as: UTF8.self) else {
            throw .invalid(field: f, reason: "not UTF-8")
        }
        return s
    }
}
