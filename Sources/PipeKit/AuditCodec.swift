/// The binary form of one audit record (docs/audit-log.md): the body of an AUDIT frame entry and,
/// behind a version byte and the sequence number, the canonical bytes the audit log hashes.
/// All integers little-endian; strings are `u32` length + UTF-8; details are sorted by key bytes,
/// keys are ASCII and unique, so one record has exactly one encoding.
public enum AuditCodec {
    /// The canonical-encoding version byte (the first byte of every hashed record).
    public static let version: UInt8 = 1
    /// A body larger than this is refused (by encoders, by the host, by verify).
    public static let maxBodyBytes = 1 << 20

    static let flagRoutine: UInt8 = 1, flagEnvelope: UInt8 = 2
    static let tagString = UInt8(ascii: "s"), tagInt = UInt8(ascii: "i"), tagDouble = UInt8(ascii: "f"), tagBool = UInt8(ascii: "b")

    /// Appends the body of `r` to `o`.
    public static func encodeBody(_ r: AuditRecord, into o: inout [UInt8]) {
        @inline(__always) func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { o.append(contentsOf: $0) } }
        @inline(__always) func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { o.append(contentsOf: $0) } }
        @inline(__always) func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { o.append(contentsOf: $0) } }
        func str(_ s: String) {
            var s = s
            s.withUTF8 { u in u32(UInt32(u.count)); o.append(contentsOf: u) }
        }
        func id(_ e: EnvelopeID) {
            withUnsafeBytes(of: e.hi.bigEndian) { o.append(contentsOf: $0) }
            withUnsafeBytes(of: e.lo.bigEndian) { o.append(contentsOf: $0) }
        }
        o.append((r.routine ? flagRoutine : 0) | (r.envelope != nil ? flagEnvelope : 0))
        u64(r.timeNs)
        if let e = r.envelope { id(e) }
        str(r.decision)
        str(r.actor)
        u16(UInt16(clamping: r.parents.count))
        for p in r.parents.prefix(Int(UInt16.max)) { id(p) }
        str(r.stage); str(r.location); str(r.intent); str(r.reason)
        let keys = r.details.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        u16(UInt16(clamping: keys.count))
        for k in keys.prefix(Int(UInt16.max)) {
            str(k)
            switch r.details[k] ?? .bool(false) {
            case .string(let s): o.append(tagString); str(s)
            case .int(let i): o.append(tagInt); u64(UInt64(bitPattern: i))
            case .double(let d): o.append(tagDouble); u64(d.bitPattern)
            case .bool(let b): o.append(tagBool); o.append(b ? 1 : 0)
            }
        }
    }

    /// The body of `r` as a new array.
    public static func body(_ r: AuditRecord) -> [UInt8] {
        var o: [UInt8] = []
        o.reserveCapacity(160 + r.reason.utf8.count)
        encodeBody(r, into: &o)
        return o
    }

    /// Decodes one body (the whole of `p`). Never traps on bad input.
    public static func decodeBody(_ p: UnsafeRawBufferPointer) throws(DecodeError) -> AuditRecord {
        var r = ByteReader(p)
        let rec = try decode(&r)
        if r.remaining != 0 { throw .invalid(field: "audit record", reason: "\(r.remaining) bytes after the last field") }
        return rec
    }

    public static func decodeBody(_ b: [UInt8]) throws(DecodeError) -> AuditRecord {
        let r: Result<AuditRecord, DecodeError> = b.withUnsafeBytes { p in
            do throws(DecodeError) { return .success(try decodeBody(p)) } catch { return .failure(error) }
        }
        return try r.get()
    }

    static func decode(_ r: inout ByteReader) throws(DecodeError) -> AuditRecord {
        func str(_ f: String) throws(DecodeError) -> String {
            let n = Int(try r.u32(f))
            if n > maxBodyBytes { throw .tooLarge(field: f, size: n, limit: maxBodyBytes) }
            let s = try r.slice(n, f)
            if n == 0 { return "" }
            guard let v = String(validating: s.assumingMemoryBound(to: UInt8.self), as: UTF8.self) else {
                throw .invalid(field: f, reason: "not UTF-8")
            }
            return v
        }
        func id(_ f: String) throws(DecodeError) -> EnvelopeID {
            let hi = UInt64(bigEndian: UInt64(littleEndian: try r.u64(f)))
            let lo = UInt64(bigEndian: UInt64(littleEndian: try r.u64(f)))
            return EnvelopeID(hi: hi, lo: lo)
        }
        let flags = try r.u8("flags")
        if flags & ~(flagRoutine | flagEnvelope) != 0 { throw .invalid(field: "flags", reason: "unknown bits \(flags)") }
        let time = try r.u64("time_ns")
        let env = flags & flagEnvelope != 0 ? try id("envelope") : nil
        let decision = try str("decision")
        if decision.isEmpty { throw .invalid(field: "decision", reason: "empty") }
        let actor = try str("actor")
        let np = Int(try r.u16("parents"))
        var parents: [EnvelopeID] = []
        parents.reserveCapacity(np)
        for _ in 0..<np { parents.append(try id("parent")) }
        let stage = try str("stage"), location = try str("location"), intent = try str("intent"), reason = try str("reason")
        let nd = Int(try r.u16("details"))
        var details: [String: AttrValue] = [:]
        var last: String?
        for _ in 0..<nd {
            let k = try str("detail key")
            // ASCII keys: two different byte strings are then two different Swift strings.
            if !k.utf8.allSatisfy({ $0 < 0x80 }) { throw .invalid(field: "details", reason: "key '\(k)' is not ASCII") }
            if let l = last, !l.utf8.lexicographicallyPrecedes(k.utf8) {
                throw .invalid(field: "details", reason: "keys not sorted and unique at '\(k)'")
            }
            last = k
            switch try r.u8("detail type") {
            case tagString: details[k] = .string(try str("detail '\(k)'"))
            case tagInt: details[k] = .int(Int64(bitPattern: try r.u64("detail '\(k)'")))
            case tagDouble: details[k] = .double(Double(bitPattern: try r.u64("detail '\(k)'")))
            case tagBool:
                let b = try r.u8("detail '\(k)'")
                if b > 1 { throw .invalid(field: "detail '\(k)'", reason: "bool byte \(b)") }
                details[k] = .bool(b == 1)
            case let t: throw .invalid(field: "detail '\(k)'", reason: "unknown type tag \(t)")
            }
        }
        return AuditRecord(decision: decision, envelope: env, actor: actor, parents: parents, stage: stage, location: location,
                           timeNs: time, intent: intent, reason: reason, details: details, routine: flags & flagRoutine != 0)
    }

    /// Checks one body without building the record (the host's writer does this for every record
    /// it receives): lengths in bounds, strings UTF-8, a decision, known flags and tags, detail keys
    /// sorted and unique, nothing left over; with `stage`, that the record names that stage.
    /// Returns why the body is refused, or nil. Accepts exactly what `decodeBody` accepts.
    public static func check(_ p: UnsafeRawBufferPointer, stage: String?) -> String? {
        var r = ByteReader(p)
        func utf8(_ s: UnsafeRawBufferPointer) -> Bool {
            var acc: UInt8 = 0
            for b in s { acc |= b }
            if acc < 0x80 { return true }
            return String(validating: s.assumingMemoryBound(to: UInt8.self), as: UTF8.self) != nil
        }
        func str(_ f: String) throws(DecodeError) -> UnsafeRawBufferPointer {
            let n = Int(try r.u32(f))
            if n > maxBodyBytes { throw .tooLarge(field: f, size: n, limit: maxBodyBytes) }
            let s = try r.slice(n, f)
            if !utf8(s) { throw .invalid(field: f, reason: "not UTF-8") }
            return s
        }
        do throws(DecodeError) {
            let flags = try r.u8("flags")
            if flags & ~(flagRoutine | flagEnvelope) != 0 { throw .invalid(field: "flags", reason: "unknown bits \(flags)") }
            _ = try r.u64("time_ns")
            if flags & flagEnvelope != 0 { _ = try r.slice(16, "envelope") }
            if try str("decision").isEmpty { throw .invalid(field: "decision", reason: "empty") }
            _ = try str("actor")
            let np = Int(try r.u16("parents"))
            _ = try r.slice(16 * np, "parents")
            let st = try str("stage")
            if let stage {
                var want = stage
                let same = want.withUTF8 { w in w.elementsEqual(st) }
                if !same { return "a record naming stage '\(String(decoding: st, as: UTF8.self))' came from stage '\(stage)'" }
            }
            _ = try str("location"); _ = try str("intent"); _ = try str("reason")
            let nd = Int(try r.u16("details"))
            var last: UnsafeRawBufferPointer?
            for _ in 0..<nd {
                let k = try str("detail key")
                if k.contains(where: { $0 >= 0x80 }) { throw .invalid(field: "details", reason: "key '\(String(decoding: k, as: UTF8.self))' is not ASCII") }
                if let l = last {
                    if !l.lexicographicallyPrecedes(k) {
                        throw .invalid(field: "details", reason: "keys not sorted and unique at '\(String(decoding: k, as: UTF8.self))'")
                    }
                }
                last = k
                switch try r.u8("detail type") {
                case tagString: _ = try str("detail value")
                case tagInt, tagDouble: _ = try r.u64("detail value")
                case tagBool:
                    let b = try r.u8("detail value")
                    if b > 1 { throw .invalid(field: "detail value", reason: "bool byte \(b)") }
                case let t: throw .invalid(field: "detail type", reason: "unknown type tag \(t)")
                }
            }
            if r.remaining != 0 { throw .invalid(field: "audit record", reason: "\(r.remaining) bytes after the last field") }
        } catch {
            return "a record that does not decode: \(error)"
        }
        return nil
    }

    /// Appends one AUDIT frame entry (`u32` body length, body) for `r`.
    public static func appendEntry(_ r: AuditRecord, into o: inout [UInt8]) {
        let at = o.count
        o.append(contentsOf: [0, 0, 0, 0])
        encodeBody(r, into: &o)
        let n = UInt32(o.count - at - 4).littleEndian
        withUnsafeBytes(of: n) { b in for i in 0..<4 { o[at + i] = b[i] } }
    }

    /// How many entries an AUDIT frame body holds, or nil when it does not split cleanly.
    public static func entryCount(_ p: UnsafeRawBufferPointer) -> Int? {
        var off = 0, n = 0
        while off < p.count {
            guard p.count - off >= 4 else { return nil }
            let len = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: off, as: UInt32.self)))
            guard len <= maxBodyBytes, p.count - off - 4 >= len else { return nil }
            off += 4 + len; n += 1
        }
        return n
    }

    /// Splits an AUDIT frame body into its entries' bodies, or says why it cannot.
    public static func entries(_ p: UnsafeRawBufferPointer) throws(DecodeError) -> [UnsafeRawBufferPointer] {
        var r = ByteReader(p)
        var out: [UnsafeRawBufferPointer] = []
        while r.remaining > 0 {
            let n = Int(try r.u32("entry length"))
            if n > maxBodyBytes { throw .tooLarge(field: "audit entry", size: n, limit: maxBodyBytes) }
            out.append(try r.slice(n, "audit entry"))
        }
        return out
    }
}
