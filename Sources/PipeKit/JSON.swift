/// A small strict JSON reader and writer over ``ConfigValue`` (RFC 8259). Used for JSONL envelopes,
/// ASSIGN bodies and the control protocol; it never traps on bad input and bounds nesting depth.
public enum JSON {
    public struct ParseError: Error, Sendable, CustomStringConvertible {
        public let offset: Int
        public let message: String
        public var description: String { "JSON error at byte \(offset): \(message)" }
    }

    public static func parse(_ text: String, maxDepth: Int = 64) throws(ParseError) -> ConfigValue {
        var t = text
        let r: Result<ConfigValue, ParseError> = t.withUTF8 { u in
            Result { () throws(ParseError) -> ConfigValue in
                var p = Parser(u: u, maxDepth: maxDepth)
                p.ws()
                let v = try p.value(depth: 0)
                p.ws()
                if p.i != u.count { throw p.err("trailing characters") }
                return v
            }
        }
        return try r.get()
    }

    public static func parse(bytes: [UInt8], maxDepth: Int = 64) throws(ParseError) -> ConfigValue {
        try parse(String(decoding: bytes, as: UTF8.self), maxDepth: maxDepth)
    }

    struct Parser {
        let u: UnsafeBufferPointer<UInt8>
        let maxDepth: Int
        var i = 0
        init(u: UnsafeBufferPointer<UInt8>, maxDepth: Int) { self.u = u; self.maxDepth = maxDepth }

        func err(_ m: String) -> ParseError { ParseError(offset: i, message: m) }
        mutating func ws() { while i < u.count, u[i] == 0x20 || u[i] == 0x0A || u[i] == 0x0D || u[i] == 0x09 { i += 1 } }
        mutating func lit(_ s: String, _ v: ConfigValue) throws(ParseError) -> ConfigValue {
            for c in s.utf8 { guard i < u.count, u[i] == c else { throw err("invalid literal") }; i += 1 }
            return v
        }
        mutating func value(depth: Int) throws(ParseError) -> ConfigValue {
            guard depth <= maxDepth else { throw err("nested deeper than \(maxDepth)") }
            guard i < u.count else { throw err("unexpected end of input") }
            switch u[i] {
            case UInt8(ascii: "{"):
                i += 1; ws()
                var entries: [ConfigEntry] = []
                if i < u.count, u[i] == UInt8(ascii: "}") { i += 1; return .map(entries) }
                while true {
                    ws()
                    guard i < u.count, u[i] == UInt8(ascii: "\"") else { throw err("expected object key") }
                    let k = try string()
                    ws()
                    guard i < u.count, u[i] == UInt8(ascii: ":") else { throw err("expected ':'") }
                    i += 1; ws()
                    let v = try value(depth: depth + 1)
                    // A duplicate key is refused: readers that keep the first and readers that keep
                    // the last would see different documents (signed receipts depend on this).
                    if entries.contains(where: { $0.key == k }) { throw err("duplicate key '\(k)'") }
                    entries.append(ConfigEntry(key: k, value: v))
                    ws()
                    guard i < u.count else { throw err("unterminated object") }
                    if u[i] == UInt8(ascii: ",") { i += 1; continue }
                    if u[i] == UInt8(ascii: "}") { i += 1; return .map(entries) }
                    throw err("expected ',' or '}'")
                }
            case UInt8(ascii: "["):
                i += 1; ws()
                var items: [ConfigValue] = []
                if i < u.count, u[i] == UInt8(ascii: "]") { i += 1; return .list(items) }
                while true {
                    ws()
                    items.append(try value(depth: depth + 1))
                    ws()
                    guard i < u.count else { throw err("unterminated array") }
                    if u[i] == UInt8(ascii: ",") { i += 1; continue }
                    if u[i] == UInt8(ascii: "]") { i += 1; return .list(items) }
                    throw err("expected ',' or ']'")
                }
            case UInt8(ascii: "\""): return .string(try string())
            case UInt8(ascii: "t"): return try lit("true", .bool(true))
            case UInt8(ascii: "f"): return try lit("false", .bool(false))
            case UInt8(ascii: "n"): return try lit("null", .null)
            default: return try number()
            }
        }
        mutating func number() throws(ParseError) -> ConfigValue {
            let start = i
            var isInt = true
            if i < u.count, u[i] == UInt8(ascii: "-") { i += 1 }
            guard i < u.count, u[i] >= 48, u[i] <= 57 else { throw err("invalid value") }
            // JSON numbers have no leading zeros ("0", "0.5" yes; "05" no).
            if u[i] == 48, i + 1 < u.count, u[i + 1] >= 48, u[i + 1] <= 57 { throw err("number with a leading zero") }
            while i < u.count {
                let c = u[i]
                if c >= 48 && c <= 57 { i += 1 } else if c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E") || c == UInt8(ascii: "+") || c == UInt8(ascii: "-") { isInt = false; i += 1 } else { break }
            }
            let s = String(decoding: UnsafeBufferPointer(rebasing: u[start..<i]), as: UTF8.self)
            if isInt, let v = Int64(s) { return .int(v) }
            guard let d = Double(s), d.isFinite else { throw ParseError(offset: start, message: "invalid number '\(s)'") }
            return .double(d)
        }
        mutating func hex4() throws(ParseError) -> UInt32 {
            guard i + 4 <= u.count else { throw err("truncated \\u escape") }
            guard let v = Hex.quad(u[i..<(i + 4)]) else { throw err("bad \\u escape") }
            i += 4
            return v
        }
        mutating func string() throws(ParseError) -> String {
            i += 1  // opening quote
            var out = [UInt8]()
            let start = i
            // Fast path: no escapes.
            while i < u.count, u[i] != UInt8(ascii: "\""), u[i] != UInt8(ascii: "\\"), u[i] >= 0x20 { i += 1 }
            if i < u.count, u[i] == UInt8(ascii: "\"") {
                let s = String(decoding: UnsafeBufferPointer(rebasing: u[start..<i]), as: UTF8.self); i += 1; return s
            }
            out.append(contentsOf: UnsafeBufferPointer(rebasing: u[start..<i]))
            while true {
                guard i < u.count else { throw err("unterminated string") }
                let c = u[i]; i += 1
                if c == UInt8(ascii: "\"") { break }
                if c < 0x20 { throw err("control character in string") }
                if c != UInt8(ascii: "\\") { out.append(c); continue }
                guard i < u.count else { throw err("unterminated escape") }
                let e = u[i]; i += 1
                switch e {
                case UInt8(ascii: "\""): out.append(0x22)
                case UInt8(ascii: "\\"): out.append(0x5C)
                case UInt8(ascii: "/"): out.append(0x2F)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"):
                    var cp = try hex4()
                    if cp >= 0xD800 && cp < 0xDC00 {
                        guard i + 1 < u.count, u[i] == UInt8(ascii: "\\"), u[i + 1] == UInt8(ascii: "u") else { throw err("lone surrogate") }
                        i += 2
                        let lo = try hex4()
                        guard lo >= 0xDC00 && lo < 0xE000 else { throw err("bad surrogate pair") }
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                    } else if cp >= 0xDC00 && cp < 0xE000 { throw err("lone surrogate") }
                    guard let sc = Unicode.Scalar(cp) else { throw err("bad code point") }
                    out.append(contentsOf: Array(String(Character(sc)).utf8))
                default: throw err("bad escape")
                }
            }
            return String(decoding: out, as: UTF8.self)
        }
    }

    /// Compact JSON text. Map keys keep their order.
    public static func serialize(_ v: ConfigValue, sortKeys: Bool = false) -> String {
        var out = [UInt8](); out.reserveCapacity(128)
        write(v, into: &out, sortKeys: sortKeys)
        return String(decoding: out, as: UTF8.self)
    }

    public static func write(_ v: ConfigValue, into out: inout [UInt8], sortKeys: Bool = false) {
        switch v {
        case .null: out.append(contentsOf: "null".utf8)
        case .bool(let b): out.append(contentsOf: (b ? "true" : "false").utf8)
        case .int(let i): out.append(contentsOf: String(i).utf8)
        case .double(let d): out.append(contentsOf: (d.isFinite ? String(d) : "null").utf8)
        case .string(let s): writeString(s, into: &out)
        case .list(let l):
            out.append(UInt8(ascii: "["))
            for (n, x) in l.enumerated() { if n > 0 { out.append(UInt8(ascii: ",")) }; write(x, into: &out, sortKeys: sortKeys) }
            out.append(UInt8(ascii: "]"))
        case .map(let m):
            out.append(UInt8(ascii: "{"))
            let entries = sortKeys ? m.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) } : m
            for (n, e) in entries.enumerated() {
                if n > 0 { out.append(UInt8(ascii: ",")) }
                writeString(e.key, into: &out); out.append(UInt8(ascii: ":")); write(e.value, into: &out, sortKeys: sortKeys)
            }
            out.append(UInt8(ascii: "}"))
        }
    }

    private static let hexDigits = Array("0123456789abcdef".utf8)
    public static func writeString(_ s: String, into out: inout [UInt8]) {
        out.append(0x22)
        var s = s
        s.withUTF8 { u in
            // Runs of bytes that need no escape are copied in one go.
            var start = 0
            for i in 0..<u.count {
                let c = u[i]
                if c >= 0x20 && c != 0x22 && c != 0x5C { continue }
                if i > start { out.append(contentsOf: UnsafeBufferPointer(rebasing: u[start..<i])) }
                switch c {
                case 0x22: out.append(0x5C); out.append(0x22)
                case 0x5C: out.append(0x5C); out.append(0x5C)
                case 0x0A: out.append(0x5C); out.append(UInt8(ascii: "n"))
                case 0x0D: out.append(0x5C); out.append(UInt8(ascii: "r"))
                case 0x09: out.append(0x5C); out.append(UInt8(ascii: "t"))
                default:
                    out.append(contentsOf: "\\u00".utf8); out.append(hexDigits[Int(c >> 4)]); out.append(hexDigits[Int(c & 15)])
                }
                start = i + 1
            }
            if start < u.count { out.append(contentsOf: UnsafeBufferPointer(rebasing: u[start..<u.count])) }
        }
        out.append(0x22)
    }
}

extension ConfigValue {
    /// Map form from `(key, value)` pairs.
    public static func object(_ pairs: [(String, ConfigValue)]) -> ConfigValue { .map(pairs.map { ConfigEntry(key: $0.0, value: $0.1) }) }
    public var stringValue: String? { if case .string(let s) = self { return s }; return nil }
    public var intValue: Int64? { if case .int(let i) = self { return i }; return nil }
    public var doubleValue: Double? { switch self { case .int(let i): return Double(i); case .double(let d): return d; default: return nil } }
    public var boolValue: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var listValue: [ConfigValue]? { if case .list(let l) = self { return l }; return nil }
    public var mapEntries: [ConfigEntry]? { if case .map(let m) = self { return m }; return nil }
}
