import PipeKit

/// One sensor value of a state. `value` is nil when the sensor cannot be evaluated (NaN, an
/// infinity, a string, null...), with `problem` saying what was there instead.
struct SensorValue: Sendable, Equatable {
    var name: String
    var value: Double?
    var problem: String?
}

/// A device state as the twin stage reads it from a payload (CONCEPTS.md, "The twin comparator"):
/// `{"device_id": "...", "timestamp": RFC 3339 with offset | Unix ns, "values": {sensor: number},
/// "status": "..."}`. Other keys are ignored (devices may add their own).
struct StateReading: Sendable, Equatable {
    var deviceID: String
    var timestampNs: Int64
    var values: [SensorValue]
    var status: String

    func value(_ sensor: String) -> SensorValue? {
        for v in values where v.name == sensor { return v }
        return nil
    }
}

/// Why a state payload was refused; the text is the dead-letter reason.
struct StateError: Error, Sendable, Equatable, CustomStringConvertible {
    let message: String
    init(_ message: String) { self.message = message }
    var description: String { message }
}

/// A strict single-pass reader of the state object. It accepts the tokens `NaN`, `Infinity` and
/// `-Infinity` (what Python's json module writes) inside `values` only, so that such a sensor is
/// "cannot be evaluated" rather than the whole state being unreadable. Duplicate keys are refused:
/// two parsers that disagree on which `status` counts are how checks get bypassed.
struct StateParser {
    private let p: UnsafeRawBufferPointer
    private var i = 0
    private static let maxSensors = 1024

    private init(_ p: UnsafeRawBufferPointer) { self.p = p }

    static func parse(_ bytes: UnsafeRawBufferPointer) throws(StateError) -> StateReading {
        var s = StateParser(bytes)
        return try s.object()
    }

    static func parse(_ bytes: [UInt8]) throws(StateError) -> StateReading {
        try bytes.withUnsafeBytes { b in Result { () throws(StateError) -> StateReading in try parse(b) } }.get()
    }

    // MARK: structure

    private mutating func object() throws(StateError) -> StateReading {
        ws()
        guard peek == UInt8(ascii: "{") else { throw StateError("state payload is not a JSON object") }
        i += 1
        var deviceID: String?, timestamp: Int64?, values: [SensorValue]?, status: String?
        var first = true
        while true {
            ws()
            if peek == UInt8(ascii: "}") { i += 1; break }
            if !first { try expect(UInt8(ascii: ","), "',' or '}' in the state object") ; ws() }
            first = false
            let key = try string("a key in the state object")
            ws(); try expect(UInt8(ascii: ":"), "':' after \"\(key)\""); ws()
            switch key {
            case "device_id":
                guard deviceID == nil else { throw StateError("duplicate key 'device_id'") }
                guard peek == UInt8(ascii: "\"") else { throw StateError("device_id must be a string") }
                deviceID = try string("device_id")
            case "timestamp":
                guard timestamp == nil else { throw StateError("duplicate key 'timestamp'") }
                timestamp = try timestampValue()
            case "values":
                guard values == nil else { throw StateError("duplicate key 'values'") }
                values = try sensorValues()
            case "status":
                guard status == nil else { throw StateError("duplicate key 'status'") }
                guard peek == UInt8(ascii: "\"") else { throw StateError("status must be a string") }
                status = try string("status")
            default:
                try skipValue(depth: 0)
            }
        }
        ws()
        guard i == p.count else { throw StateError("unexpected data after the state object at byte \(i)") }
        guard let deviceID else { throw StateError("state has no device_id") }
        guard let timestamp else { throw StateError("state has no timestamp") }
        guard let values else { throw StateError("state has no values") }
        guard let status else { throw StateError("state has no status") }
        return StateReading(deviceID: deviceID, timestampNs: timestamp, values: values, status: status)
    }

    private mutating func timestampValue() throws(StateError) -> Int64 {
        if peek == UInt8(ascii: "\"") {
            let start = i + 1
            var end = start
            while end < p.count, p[end] != UInt8(ascii: "\""), p[end] != UInt8(ascii: "\\"), p[end] >= 0x20 { end += 1 }
            if end < p.count, p[end] == UInt8(ascii: "\"") {
                i = end + 1
                do { return try RFC3339.parse(UnsafeRawBufferPointer(rebasing: p[start..<end])) }
                catch { throw StateError("timestamp '\(String(decoding: UnsafeRawBufferPointer(rebasing: p[start..<end]), as: UTF8.self))': \(error.message)") }
            }
            let text = try string("timestamp")
            throw StateError("timestamp '\(text)': escapes are not allowed in a timestamp")
        }
        let start = i
        while i < p.count, isNumberByte(p[i]) { i += 1 }
        guard i > start else { throw StateError("timestamp must be an RFC 3339 string or integer Unix nanoseconds") }
        let token = UnsafeRawBufferPointer(rebasing: p[start..<i])
        guard token.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }), token.count <= 19,
              let ns = Int64(String(decoding: token, as: UTF8.self)) else {
            throw StateError("timestamp \(String(decoding: token, as: UTF8.self)) is not a non-negative integer of Unix nanoseconds")
        }
        return ns
    }

    private mutating func sensorValues() throws(StateError) -> [SensorValue] {
        guard peek == UInt8(ascii: "{") else { throw StateError("values must be an object of sensor: number") }
        i += 1
        var out: [SensorValue] = []
        out.reserveCapacity(8)
        var first = true
        while true {
            ws()
            if peek == UInt8(ascii: "}") { i += 1; return out }
            if !first { try expect(UInt8(ascii: ","), "',' or '}' in values"); ws() }
            first = false
            let name = try string("a sensor name")
            ws(); try expect(UInt8(ascii: ":"), "':' after sensor \"\(name)\""); ws()
            if out.contains(where: { $0.name == name }) { throw StateError("values has sensor '\(name)' twice") }
            if out.count >= Self.maxSensors { throw StateError("more than \(Self.maxSensors) sensors in values") }
            out.append(try sensor(name))
        }
    }

    private mutating func sensor(_ name: String) throws(StateError) -> SensorValue {
        let c = peek
        if c == UInt8(ascii: "-") || (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "N") || c == UInt8(ascii: "I") {
            let start = i
            if c == UInt8(ascii: "-") { i += 1 }
            if word("Infinity") { return SensorValue(name: name, value: nil, problem: c == UInt8(ascii: "-") ? "-Infinity" : "Infinity") }
            if c == UInt8(ascii: "N"), word("NaN") { return SensorValue(name: name, value: nil, problem: "NaN") }
            while i < p.count, isNumberByte(p[i]) { i += 1 }
            let token = UnsafeRawBufferPointer(rebasing: p[start..<i])
            guard let d = Self.double(token) else {
                throw StateError("sensor '\(name)': '\(String(decoding: token, as: UTF8.self))' is not a number")
            }
            return d.isFinite ? SensorValue(name: name, value: d, problem: nil)
                              : SensorValue(name: name, value: nil, problem: "\(String(decoding: token, as: UTF8.self)) (out of range)")
        }
        let what: String
        switch c {
        case UInt8(ascii: "\""): what = "a string"
        case UInt8(ascii: "n"): what = "null"
        case UInt8(ascii: "t"), UInt8(ascii: "f"): what = "a boolean"
        case UInt8(ascii: "{"): what = "an object"
        case UInt8(ascii: "["): what = "a list"
        default: throw StateError("sensor '\(name)': expected a value at byte \(i)")
        }
        try skipValue(depth: 0)
        return SensorValue(name: name, value: nil, problem: what)
    }

    // MARK: tokens

    private var peek: UInt8 { i < p.count ? p[i] : 0 }

    private mutating func ws() {
        while i < p.count, p[i] == 0x20 || p[i] == 0x0A || p[i] == 0x0D || p[i] == 0x09 { i += 1 }
    }

    private mutating func expect(_ c: UInt8, _ what: @autoclosure () -> String) throws(StateError) {
        guard peek == c else { throw StateError("expected \(what()) at byte \(i)") }
        i += 1
    }

    private mutating func word(_ w: StaticString) -> Bool {
        let n = w.utf8CodeUnitCount
        guard i + n <= p.count else { return false }
        let base = w.utf8Start
        for k in 0..<n where p[i + k] != base[k] { return false }
        i += n
        return true
    }

    private func isNumberByte(_ c: UInt8) -> Bool {
        (c >= 0x30 && c <= 0x39) || c == UInt8(ascii: "-") || c == UInt8(ascii: "+") || c == UInt8(ascii: ".") || c == UInt8(ascii: "e") || c == UInt8(ascii: "E")
    }

    /// A JSON number token (strict grammar) as a Double.
    private static func double(_ t: UnsafeRawBufferPointer) -> Double? {
        var k = 0
        func digits() -> Int { let s = k; while k < t.count, t[k] >= 0x30, t[k] <= 0x39 { k += 1 }; return k - s }
        if k < t.count, t[k] == UInt8(ascii: "-") { k += 1 }
        let intStart = k
        let n = digits()
        guard n > 0, !(n > 1 && t[intStart] == 0x30) else { return nil }
        if k < t.count, t[k] == UInt8(ascii: ".") { k += 1; guard digits() > 0 else { return nil } }
        if k < t.count, t[k] == UInt8(ascii: "e") || t[k] == UInt8(ascii: "E") {
            k += 1
            if k < t.count, t[k] == UInt8(ascii: "+") || t[k] == UInt8(ascii: "-") { k += 1 }
            guard digits() > 0 else { return nil }
        }
        guard k == t.count else { return nil }
        return fastDouble(t) ?? Double(String(decoding: t, as: UTF8.self))
    }

    private static let powersOf10: [Double] = (0...22).map { e in (0..<e).reduce(1.0) { x, _ in x * 10 } }

    /// Clinger's fast path: a decimal with at most 15 significant digits and a power of ten within
    /// 10^22 converts exactly with one multiplication or division (both operands are exact).
    /// Anything else returns nil and goes to the full conversion.
    private static func fastDouble(_ t: UnsafeRawBufferPointer) -> Double? {
        var k = 0, negative = false, mantissa: UInt64 = 0, digits = 0, exp10 = 0
        if t[k] == UInt8(ascii: "-") { negative = true; k += 1 }
        while k < t.count, t[k] >= 0x30, t[k] <= 0x39 {
            if mantissa != 0 || t[k] != 0x30 { digits += 1 }
            mantissa = mantissa &* 10 &+ UInt64(t[k] - 0x30); k += 1
        }
        if k < t.count, t[k] == UInt8(ascii: ".") {
            k += 1
            while k < t.count, t[k] >= 0x30, t[k] <= 0x39 {
                if mantissa != 0 || t[k] != 0x30 { digits += 1 }
                mantissa = mantissa &* 10 &+ UInt64(t[k] - 0x30); exp10 -= 1; k += 1
            }
        }
        guard k == t.count, digits <= 15, exp10 >= -22 else { return nil }
        let m = Double(mantissa)
        let v = exp10 == 0 ? m : m / powersOf10[-exp10]
        return negative ? -v : v
    }

    /// A JSON string; escapes are decoded (a `\u` escape must form valid UTF-16).
    private mutating func string(_ what: @autoclosure () -> String) throws(StateError) -> String {
        guard peek == UInt8(ascii: "\"") else { throw StateError("expected \(what()) (a string) at byte \(i)") }
        i += 1
        let start = i
        while i < p.count, p[i] != UInt8(ascii: "\""), p[i] != UInt8(ascii: "\\"), p[i] >= 0x20 { i += 1 }
        if i < p.count, p[i] == UInt8(ascii: "\"") {
            defer { i += 1 }
            return String(decoding: UnsafeRawBufferPointer(rebasing: p[start..<i]), as: UTF8.self)
        }
        var bytes = Array(UnsafeRawBufferPointer(rebasing: p[start..<i]))
        while true {
            guard i < p.count else { throw StateError("unterminated string (\(what()))") }
            let c = p[i]
            if c == UInt8(ascii: "\"") { i += 1; return String(decoding: bytes, as: UTF8.self) }
            if c < 0x20 { throw StateError("control character in a string (\(what())) at byte \(i)") }
            if c != UInt8(ascii: "\\") { bytes.append(c); i += 1; continue }
            i += 1
            guard i < p.count else { throw StateError("unterminated escape (\(what()))") }
            let e = p[i]; i += 1
            switch e {
            case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): bytes.append(e)
            case UInt8(ascii: "b"): bytes.append(0x08)
            case UInt8(ascii: "f"): bytes.append(0x0C)
            case UInt8(ascii: "n"): bytes.append(0x0A)
            case UInt8(ascii: "r"): bytes.append(0x0D)
            case UInt8(ascii: "t"): bytes.append(0x09)
            case UInt8(ascii: "u"):
                var scalar = try hex4(what())
                if (0xD800..<0xDC00).contains(scalar) {
                    guard word("\\u") else { throw StateError("unpaired surrogate in a string (\(what()))") }
                    let low = try hex4(what())
                    guard (0xDC00..<0xE000).contains(low) else { throw StateError("unpaired surrogate in a string (\(what()))") }
                    scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                } else if (0xDC00..<0xE000).contains(scalar) {
                    throw StateError("unpaired surrogate in a string (\(what()))")
                }
                guard let u = Unicode.Scalar(scalar) else { throw StateError("bad \\u escape (\(what()))") }
                bytes.append(contentsOf: Array(String(Character(u)).utf8))
            default: throw StateError("bad escape '\\\(Character(Unicode.Scalar(e)))' in a string (\(what()))")
            }
        }
    }

    private mutating func hex4(_ what: String) throws(StateError) -> UInt32 {
        guard i + 4 <= p.count else { throw StateError("short \\u escape (\(what))") }
        guard let v = Hex.quad(p[i..<(i + 4)]) else { throw StateError("bad \\u escape (\(what))") }
        i += 4
        return v
    }

    /// Skips one JSON value (keys the state does not use), bounded in depth.
    private mutating func skipValue(depth: Int) throws(StateError) {
        guard depth < 32 else { throw StateError("state nested deeper than 32 levels") }
        ws()
        switch peek {
        case UInt8(ascii: "\""): _ = try string("a string")
        case UInt8(ascii: "{"), UInt8(ascii: "["):
            let close = peek == UInt8(ascii: "{") ? UInt8(ascii: "}") : UInt8(ascii: "]")
            let isObject = peek == UInt8(ascii: "{")
            i += 1; ws()
            if peek == close { i += 1; return }
            while true {
                if isObject { ws(); _ = try string("a key"); ws(); try expect(UInt8(ascii: ":"), "':'") }
                try skipValue(depth: depth + 1)
                ws()
                if peek == close { i += 1; return }
                try expect(UInt8(ascii: ","), "',' or '\(Character(Unicode.Scalar(close)))'")
            }
        case UInt8(ascii: "t"): guard word("true") else { throw StateError("bad literal at byte \(i)") }
        case UInt8(ascii: "f"): guard word("false") else { throw StateError("bad literal at byte \(i)") }
        case UInt8(ascii: "n"): guard word("null") else { throw StateError("bad literal at byte \(i)") }
        default:
            let start = i
            while i < p.count, isNumberByte(p[i]) { i += 1 }
            guard i > start, Self.double(UnsafeRawBufferPointer(rebasing: p[start..<i])) != nil else {
                throw StateError("expected a JSON value at byte \(start)")
            }
        }
    }
}

