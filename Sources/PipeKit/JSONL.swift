import Foundation

/// The JSONL form of an envelope (CONCEPTS.md): one JSON object per line with the header fields
/// by name, `attrs` as an object, and the payload as `payload` (any JSON value) or `payload_b64`.
public enum EnvelopeJSONL {
    public struct FormatError: Error, Sendable, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    /// One line (without the newline). A payload that is valid JSON text is written as `payload`,
    /// anything else as `payload_b64`. `ingest_ns` is omitted when `includeIngest` is false.
    public static func encode(_ e: Envelope, includeIngest: Bool = true) -> [UInt8] {
        let payload = e.payload
        var o = [UInt8](); o.reserveCapacity(160 + payload.count)
        func key(_ k: String, first: Bool = false) {
            if !first { o.append(UInt8(ascii: ",")) }
            JSON.writeString(k, into: &o); o.append(UInt8(ascii: ":"))
        }
        o.append(UInt8(ascii: "{"))
        key("id", first: true); JSON.writeString(e.id.description, into: &o)
        if let p = e.parent { key("parent"); JSON.writeString(p.description, into: &o) }
        key("actor"); JSON.writeString(e.actor, into: &o)
        key("intent"); JSON.writeString(e.intent, into: &o)
        key("authority"); JSON.writeString(e.authority, into: &o)
        key("rank"); o.append(contentsOf: String(e.rank).utf8)
        if !e.clock.isEmpty {
            key("clock")
            JSON.write(.map(e.clock.keys.sorted().map { ConfigEntry(key: $0, value: .int(Int64(clamping: e.clock[$0] ?? 0))) }), into: &o)
        }
        key("lane"); JSON.writeString(e.lane, into: &o)
        key("hops"); o.append(contentsOf: String(e.hops).utf8)
        key("attempt"); o.append(contentsOf: String(e.attempt).utf8)
        if includeIngest { key("ingest_ns"); o.append(contentsOf: String(e.ingestNs).utf8) }
        key("attrs"); o.append(UInt8(ascii: "{"))
        for (n, k) in e.attrs.keys.sorted().enumerated() {
            if n > 0 { o.append(UInt8(ascii: ",")) }
            JSON.writeString(k, into: &o); o.append(UInt8(ascii: ":"))
            switch e.attrs[k] ?? .bool(false) {
            case .string(let s): JSON.writeString(s, into: &o)
            case .int(let i): o.append(contentsOf: String(i).utf8)
            case .double(let d): JSON.write(.double(d), into: &o)
            case .bool(let b): o.append(contentsOf: (b ? "true" : "false").utf8)
            }
        }
        o.append(UInt8(ascii: "}"))
        if let s = e.sig {
            key("sig"); JSON.write(.object([("key_id", .string(Hex.encode(s.keyID))), ("sig", .string(Hex.encode(s.signature)))]), into: &o)
        }
        if let text = jsonText(payload) {
            key("payload"); o.append(contentsOf: text)
        } else {
            key("payload_b64"); JSON.writeString(Data(payload).base64EncodedString(), into: &o)
        }
        o.append(UInt8(ascii: "}"))
        return o
    }

    /// The payload's bytes if they are one JSON value on one line (else nil).
    static func jsonText(_ p: [UInt8]) -> [UInt8]? {
        guard let first = p.first(where: { $0 != 0x20 && $0 != 0x09 }) else { return nil }
        guard first == UInt8(ascii: "{") || first == UInt8(ascii: "[") || first == UInt8(ascii: "\"")
                || first == UInt8(ascii: "-") || (first >= 48 && first <= 57) || first == UInt8(ascii: "t")
                || first == UInt8(ascii: "f") || first == UInt8(ascii: "n") else { return nil }
        guard let v = try? JSON.parse(bytes: p) else { return nil }
        if p.contains(0x0A) || p.contains(0x0D) { return Array(JSON.serialize(v).utf8) }
        return p
    }

    /// Parses one line. Missing `id` gets a random id (a root at ingest); `attempt` defaults to 1.
    public static func decode(_ line: String, limits: WireLimits = .standard) throws(FormatError) -> Envelope {
        let v: ConfigValue
        do { v = try JSON.parse(line) } catch { throw FormatError(message: error.description) }
        guard case .map(let entries) = v else { throw FormatError(message: "expected a JSON object, got \(v.typeName)") }
        var e = Envelope()
        var sawPayload = false
        for entry in entries {
            let k = entry.key, x = entry.value
            func str() throws(FormatError) -> String {
                guard case .string(let s) = x else { throw FormatError(message: "field '\(k)' must be a string, got \(x.typeName)") }
                return s
            }
            func uint() throws(FormatError) -> UInt64 {
                guard case .int(let i) = x, i >= 0 else { throw FormatError(message: "field '\(k)' must be a non-negative integer") }
                return UInt64(i)
            }
            switch k {
            case "id":
                guard let id = EnvelopeID(hex: try str()) else { throw FormatError(message: "field 'id' must be 32 hex digits") }
                e.id = id
            case "parent":
                if x == .null { continue }
                guard let id = EnvelopeID(hex: try str()) else { throw FormatError(message: "field 'parent' must be 32 hex digits") }
                e.parent = id
            case "actor": e.actor = try str()
            case "intent": e.intent = try str()
            case "authority": e.authority = try str()
            case "lane": e.lane = try str()
            case "rank": e.rank = try uint()
            case "hops": e.hops = UInt32(clamping: try uint())
            case "attempt": e.attempt = UInt32(clamping: try uint())
            case "ingest_ns": e.ingestNs = try uint()
            case "clock":
                guard case .map(let m) = x else { throw FormatError(message: "field 'clock' must be an object") }
                for c in m {
                    guard case .int(let n) = c.value, n >= 0 else { throw FormatError(message: "clock entry '\(c.key)' must be a non-negative integer") }
                    e.clock[c.key] = UInt64(n)
                }
            case "attrs":
                guard case .map(let m) = x else { throw FormatError(message: "field 'attrs' must be an object") }
                for a in m {
                    switch a.value {
                    case .string(let s): e.attrs[a.key] = .string(s)
                    case .int(let i): e.attrs[a.key] = .int(i)
                    case .double(let d): e.attrs[a.key] = .double(d)
                    case .bool(let b): e.attrs[a.key] = .bool(b)
                    default: throw FormatError(message: "attr '\(a.key)' must be a string, number or boolean, got \(a.value.typeName)")
                    }
                }
            case "sig":
                guard case .map = x, let kid = x["key_id"]?.stringValue.flatMap(Hex.decode), let sg = x["sig"]?.stringValue.flatMap(Hex.decode),
                      kid.count == 8, sg.count == 64 else { throw FormatError(message: "field 'sig' must be {key_id: 16 hex, sig: 128 hex}") }
                e.sig = EnvelopeSignature(keyID: kid, signature: sg)
            case "payload":
                if sawPayload { throw FormatError(message: "both 'payload' and 'payload_b64' given") }
                sawPayload = true
                e.payload = Array(JSON.serialize(x).utf8)
            case "payload_b64":
                if sawPayload { throw FormatError(message: "both 'payload' and 'payload_b64' given") }
                sawPayload = true
                guard let d = Data(base64Encoded: try str()) else { throw FormatError(message: "field 'payload_b64' is not base64") }
                e.payload = Array(d)
            default:
                throw FormatError(message: "unknown field '\(k)'")
            }
        }
        do { try EnvelopeCodec.check(e, limits: limits) } catch { throw FormatError(message: error.reason) }
        return e
    }
}
