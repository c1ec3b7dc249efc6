/// RFC 3339 date-times with a required UTC offset (`Z` or `±hh:mm`), to Unix nanoseconds.
/// An offset-less time is refused: compared with an offset time it has no defined order.
public enum RFC3339 {
    public struct Failure: Error, Sendable { public let message: String }

    public static func parse(_ s: UnsafeRawBufferPointer) throws(Failure) -> Int64 {
        var k = 0
        func num(_ n: Int, _ field: String) throws(Failure) -> Int64 {
            guard k + n <= s.count else { throw Failure(message: "too short (expected YYYY-MM-DDThh:mm:ss[.frac](Z|±hh:mm))") }
            var v: Int64 = 0
            for _ in 0..<n {
                let c = s[k]
                guard c >= 0x30, c <= 0x39 else { throw Failure(message: "bad \(field) at character \(k + 1)") }
                v = v * 10 + Int64(c - 0x30); k += 1
            }
            return v
        }
        func sep(_ a: UInt8, _ b: UInt8 = 0, _ c: UInt8 = 0, what: StaticString) throws(Failure) {
            guard k < s.count, s[k] == a || (b != 0 && s[k] == b) || (c != 0 && s[k] == c) else {
                throw Failure(message: "expected \(what) at character \(k + 1)")
            }
            k += 1
        }
        let year = try num(4, "year"); try sep(0x2D, what: "'-'")
        let month = try num(2, "month"); try sep(0x2D, what: "'-'")
        let day = try num(2, "day"); try sep(0x54, 0x74, 0x20, what: "'T'")
        let hour = try num(2, "hour"); try sep(0x3A, what: "':'")
        let minute = try num(2, "minute"); try sep(0x3A, what: "':'")
        let second = try num(2, "second")
        guard (1...12).contains(month) else { throw Failure(message: "month \(month) out of range") }
        guard day >= 1, day <= daysIn(month: month, year: year) else { throw Failure(message: "day \(day) out of range") }
        guard hour <= 23, minute <= 59, second <= 60 else { throw Failure(message: "time of day out of range") }
        var nanos: Int64 = 0
        if k < s.count, s[k] == UInt8(ascii: ".") {
            k += 1
            var digits = 0
            while k < s.count, s[k] >= 0x30, s[k] <= 0x39 {
                if digits < 9 { nanos = nanos * 10 + Int64(s[k] - 0x30) }
                digits += 1; k += 1
            }
            guard digits > 0 else { throw Failure(message: "empty fraction of a second") }
            for _ in digits..<max(digits, 9) { nanos *= 10 }
        }
        guard k < s.count else { throw Failure(message: "has no UTC offset (RFC 3339 needs Z or ±hh:mm; offset-less times are refused)") }
        var offsetSeconds: Int64 = 0
        switch s[k] {
        case UInt8(ascii: "Z"), UInt8(ascii: "z"): k += 1
        case UInt8(ascii: "+"), UInt8(ascii: "-"):
            let sign: Int64 = s[k] == UInt8(ascii: "-") ? -1 : 1
            k += 1
            let oh = try num(2, "offset hour"); try sep(0x3A, what: "':' in the offset")
            let om = try num(2, "offset minute")
            guard oh <= 23, om <= 59 else { throw Failure(message: "offset out of range") }
            offsetSeconds = sign * (oh * 3600 + om * 60)
        default: throw Failure(message: "expected Z or ±hh:mm at character \(k + 1)")
        }
        guard k == s.count else { throw Failure(message: "unexpected text after the offset") }
        let days = daysFromCivil(year: year, month: month, day: day)
        let seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offsetSeconds
        guard seconds >= 0, seconds < Int64.max / 1_000_000_000 - 1 else { throw Failure(message: "outside the range of Unix nanoseconds") }
        return seconds * 1_000_000_000 + nanos
    }

    /// The same, from text.
    public static func parse(_ s: String) throws(Failure) -> Int64 {
        var s = s
        let r: Result<Int64, Failure> = s.withUTF8 { u in
            do throws(Failure) { return .success(try parse(UnsafeRawBufferPointer(u))) } catch { return .failure(error) }
        }
        return try r.get()
    }

    static func daysIn(month: Int64, year: Int64) -> Int64 {
        switch month {
        case 2: return (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 ? 29 : 28
        case 4, 6, 9, 11: return 30
        default: return 31
        }
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil).
    static func daysFromCivil(year: Int64, month: Int64, day: Int64) -> Int64 {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let mp = (month + 9) % 12
        let doy = (153 * mp + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }

    /// Unix nanoseconds as RFC 3339 UTC with milliseconds (for simulators and messages).
    public static func format(ns: Int64) -> String {
        var out: [UInt8] = []
        append(ns: ns, into: &out)
        return String(decoding: out, as: UTF8.self)
    }

    /// Appends `YYYY-MM-DDThh:mm:ss.mmmZ` (H. Hinnant's civil_from_days), without allocating.
    public static func append(ns: Int64, into out: inout [UInt8]) {
        let ms = ns / 1_000_000
        var secs = ms / 1000
        let milli = ms % 1000
        let days = secs / 86_400; secs %= 86_400
        let z = days + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        let y = yoe + era * 400 + (m <= 2 ? 1 : 0)
        func digits(_ v: Int64, _ n: Int) {
            var div: Int64 = 1
            for _ in 1..<n { div *= 10 }
            var v = v
            for _ in 0..<n { out.append(UInt8(0x30 + (v / div) % 10)); v %= div; div /= 10 }
        }
        digits(y, 4); out.append(0x2D); digits(m, 2); out.append(0x2D); digits(d, 2); out.append(0x54)
        digits(secs / 3600, 2); out.append(0x3A); digits(secs / 60 % 60, 2); out.append(0x3A); digits(secs % 60, 2)
        out.append(0x2E); digits(milli, 3); out.append(0x5A)
    }
}
