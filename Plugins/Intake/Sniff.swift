import PipeKit

/// The intake classes of CONCEPTS.md ("The continuity intake"), in rule order.
public enum IntakeClass: String, Sendable, CaseIterable {
    case staging
    case empty
    case executable
    case sealedTBZ = "sealed-tbz"
    case sealedTBZNoExt = "sealed-tbz-no-ext"
    case disguised
    case pdf
    case jsonText = "json-text"
    case unknown

    /// What the intake does with this class.
    public var disposition: Disposition {
        switch self {
        case .staging: return .ignore
        case .empty, .pdf: return .reject
        case .executable, .unknown: return .quarantine
        case .sealedTBZ, .sealedTBZNoExt: return .trustedCandidate
        case .disguised: return .triageDisguised
        case .jsonText: return .resealCandidate
        }
    }

    var index: Int {
        switch self {
        case .staging: 0; case .empty: 1; case .executable: 2; case .sealedTBZ: 3; case .sealedTBZNoExt: 4
        case .disguised: 5; case .pdf: 6; case .jsonText: 7; case .unknown: 8
        }
    }

    /// Police severity of a file of this class lingering somewhere (CONCEPTS.md, "police").
    public var severity: Severity {
        switch self {
        case .disguised: return .alert
        case .executable: return .critical
        case .jsonText, .pdf, .unknown: return .warn
        default: return .info
        }
    }
}

/// Where a classified envelope goes: one sniffer output per disposition.
public enum Disposition: String, Sendable, CaseIterable {
    case ignore
    case reject
    case quarantine
    case trustedCandidate = "trusted-candidate"
    case triageDisguised = "triage-disguised"
    case resealCandidate = "reseal-candidate"

    var index: Int {
        switch self {
        case .ignore: 0; case .reject: 1; case .quarantine: 2; case .trustedCandidate: 3; case .triageDisguised: 4; case .resealCandidate: 5
        }
    }
}

/// Police severities, lowest first.
public enum Severity: String, Sendable, CaseIterable, Comparable {
    case info = "INFO", warn = "WARN", alert = "ALERT", critical = "CRITICAL"
    var rank: Int { switch self { case .info: 0; case .warn: 1; case .alert: 2; case .critical: 3 } }
    public static func < (a: Severity, b: Severity) -> Bool { a.rank < b.rank }
}

/// A TBZ header as the sniffer reads it: version 2 (`TBZ 02 00 flags 00`, or with one SSM
/// routing byte before the `02`), 1 (anything else starting `TBZ`) or 0 (no `TBZ`).
public struct TBZHeader: Sendable, Equatable {
    public var version: Int
    public var flags: Int?
    public var ssm: Int?

    public static let flagNames: [(Int, String)] = [(0x01, "ssm"), (0x02, "encrypted"), (0x04, "receiver"), (0x08, "compressed")]

    /// Reads the header from the first bytes of content.
    public static func read(_ b: UnsafeRawBufferPointer) -> TBZHeader {
        guard b.count >= 3, b[0] == 0x54, b[1] == 0x42, b[2] == 0x5A else { return TBZHeader(version: 0) }
        if b.count >= 7, b[3] == 0x02, b[4] == 0x00, b[6] == 0x00 { return TBZHeader(version: 2, flags: Int(b[5])) }
        if b.count >= 8, b[4] == 0x02, b[5] == 0x00, b[7] == 0x00 { return TBZHeader(version: 2, flags: Int(b[6]), ssm: Int(b[3])) }
        return TBZHeader(version: 1)
    }

    /// The flag names set, comma-separated (e.g. `ssm,encrypted`).
    public var flagList: String {
        guard let f = flags else { return "" }
        return Self.flagNames.filter { f & $0.0 != 0 }.map(\.1).joined(separator: ",")
    }
}

/// The sniffer's verdict on one piece of content.
public struct SniffResult: Sendable, Equatable {
    public var intakeClass: IntakeClass
    public var disposition: Disposition { intakeClass.disposition }
    /// Lower-cased extension of the name (after the last dot), "" when none.
    public var extensionName: String
    public var tbz: TBZHeader
}

/// The nine rules of CONCEPTS.md in order, first match wins, on our own magic table. Content
/// beats name: executables are caught before any name rule. Reads at most the first 16 bytes.
public enum Sniff {
    public static let stagingSuffixes = [".part", ".tmp", ".writing", ".inflight"]
    public static let sealedExtensions: Set<String> = ["tza", "claude", "gemini", "gpt", "kit", "iddrop", "parentattest", "capsule"]

    /// The lower-cased extension of a file name ("" for none, or for a leading-dot-only name).
    public static func extensionOf(_ name: String) -> String {
        var name = name
        return name.withUTF8 { u -> String in
            var i = u.count - 1
            while i >= 0, u[i] != 0x2E, u[i] != 0x2F { i -= 1 }
            // No dot, a dot in a directory part, or a leading dot of the base name: no extension.
            guard i > 0, u[i] == 0x2E, u[i - 1] != 0x2F else { return "" }
            let ext = UnsafeBufferPointer(rebasing: u[(i + 1)...])
            if !ext.contains(where: { $0 >= 0x41 && $0 <= 0x5A }) { return String(decoding: ext, as: UTF8.self) }
            return String(decoding: ext.map { $0 >= 0x41 && $0 <= 0x5A ? $0 | 0x20 : $0 }, as: UTF8.self)
        }
    }

    static let stagingSuffixBytes: [[UInt8]] = stagingSuffixes.map { Array($0.utf8) }

    /// Whether the name ends with a staging suffix (ASCII case-insensitive).
    public static func isStaging(_ name: String) -> Bool {
        var name = name
        return name.withUTF8 { u in
            for suffix in stagingSuffixBytes where u.count >= suffix.count {
                var match = true
                for (i, b) in suffix.enumerated() {
                    let c = u[u.count - suffix.count + i]
                    if (c >= 0x41 && c <= 0x5A ? c | 0x20 : c) != b { match = false; break }
                }
                if match { return true }
            }
            return false
        }
    }

    /// Whether the first bytes are an executable: ELF, PE (`MZ`), Mach-O (thin or fat), `#!`.
    public static func isExecutable(_ b: UnsafeRawBufferPointer) -> Bool {
        if b.count >= 2 {
            if b[0] == 0x4D && b[1] == 0x5A { return true }          // MZ
            if b[0] == 0x23 && b[1] == 0x21 { return true }          // #!
        }
        guard b.count >= 4 else { return false }
        let m = UInt32(b[0]) << 24 | UInt32(b[1]) << 16 | UInt32(b[2]) << 8 | UInt32(b[3])
        switch m {
        case 0x7F45_4C46: return true                                 // ELF
        case 0xFEED_FACE, 0xFEED_FACF, 0xCEFA_EDFE, 0xCFFA_EDFE, 0xCAFE_BABE: return true  // Mach-O, fat
        default: return false
        }
    }

    /// Whether `{` or `[` comes first after leading whitespace within the first 16 bytes.
    public static func looksLikeJSON(_ b: UnsafeRawBufferPointer) -> Bool {
        for i in 0..<min(16, b.count) {
            switch b[i] {
            case 0x20, 0x09, 0x0A, 0x0D: continue
            case 0x7B, 0x5B: return true
            default: return false
            }
        }
        return false
    }

    /// Classifies content by the rules in order. `size` is the full content size (the buffer may
    /// hold only the first bytes).
    public static func classify(name: String, head b: UnsafeRawBufferPointer, size: Int) -> SniffResult {
        let ext = extensionOf(name)
        let tbz = TBZHeader.read(b)
        let cls: IntakeClass
        if isStaging(name) { cls = .staging }
        else if size == 0 { cls = .empty }
        else if isExecutable(b) { cls = .executable }
        else if tbz.version > 0 { cls = sealedExtensions.contains(ext) ? .sealedTBZ : .sealedTBZNoExt }
        else if sealedExtensions.contains(ext) { cls = .disguised }
        else if b.count >= 4, b[0] == 0x25, b[1] == 0x50, b[2] == 0x44, b[3] == 0x46 { cls = .pdf }
        else if looksLikeJSON(b) { cls = .jsonText }
        else { cls = .unknown }
        return SniffResult(intakeClass: cls, extensionName: ext, tbz: tbz)
    }

    public static func classify(name: String, bytes: [UInt8]) -> SniffResult {
        bytes.withUnsafeBytes { classify(name: name, head: UnsafeRawBufferPointer(rebasing: $0.prefix(16)), size: bytes.count) }
    }
}
