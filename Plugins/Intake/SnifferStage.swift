import PipeKit
import PipeSniff

/// How far the intake acts on what it sees (CONCEPTS.md, "modes").
public enum IntakeMode: String, Sendable, CaseIterable {
    /// Classify and audit; nothing moves (everything goes to `observed`).
    case passive
    /// Also verify sealed content, reseal forward state, move files.
    case active
    /// As active, and what is not a sealed candidate and would not be rejected is quarantined.
    case strict
}

/// When the sniffer asks libmagic for the MIME type.
public enum MimeLookup: String, Sendable, CaseIterable {
    case always
    case whenNeeded = "when-needed"
    case off
}

/// `sniffer`: classifies envelopes (usually files from `inbox`) by content with our magic table,
/// then routes each to the output of its disposition. Name is hint, content is truth.
public final class SnifferStage: Stage {
    public static let observedOutput = "observed"
    public static let descriptor = StageDescriptor(
        kind: "sniffer",
        summary: "Classifies content by the intake rules (our magic table first, libmagic for MIME) and routes it by disposition.",
        role: .transform,
        inputs: [InputPort("in", doc: "content to classify (payload = file bytes; the `filename` attribute is the name hint)")],
        outputs: { _ in Disposition.allCases.map(\.rawValue) + [observedOutput] },
        outputsDoc: "one per disposition: `ignore`, `reject`, `quarantine`, `trusted-candidate`, `triage-disguised`, `reseal-candidate`; and `observed` (everything, in passive mode)",
        fields: [
            ConfigField("mode", .enumeration(IntakeMode.allCases.map(\.rawValue)), default: .string("active"),
                        doc: "`passive`: classify and audit, emit everything on `observed`, move nothing. `active`: route by disposition. `strict`: as active, and `triage-disguised` and `reseal-candidate` go to `quarantine`."),
            ConfigField("mime", .enumeration(MimeLookup.allCases.map(\.rawValue)), default: .string("when-needed"),
                        doc: "libmagic MIME lookup: on `always` every envelope, `when-needed` only envelopes our table classes `unknown`, or `off`."),
            ConfigField("name_attr", .string, default: .string("filename"), doc: "Attribute holding the name hint."),
        ],
        make: { SnifferStage(config: $0) })

    let mode: IntakeMode
    let mime: MimeLookup
    let nameAttr: String
    var magic: MagicDetector?
    var outs: [OutputHandle] = []
    var observed = OutputHandle(index: 0, name: observedOutput)
    var counts = [Int](repeating: 0, count: IntakeClass.allCases.count)
    var mimeCalls = 0

    init(config c: ConfigReader) {
        mode = IntakeMode(rawValue: c.string("mode") ?? "active") ?? .active
        mime = MimeLookup(rawValue: c.string("mime") ?? "when-needed") ?? .whenNeeded
        nameAttr = c.string("name_attr") ?? "filename"
    }

    public func start(context: any StageContext) throws {
        outs = try Disposition.allCases.map { d throws(StageError) in try context.output(d.rawValue) }
        observed = try context.output(Self.observedOutput)
        if mime != .off {
            do { magic = try MagicDetector() } catch { throw StageError.halt("libmagic: \(error)") }
        }
    }

    static let hexDigits = Array("0123456789abcdef".utf8)
    /// "class -> disposition", made once (audit reasons are written per envelope).
    static let reasons: [[String]] = IntakeClass.allCases.map { c in Disposition.allCases.map { "\(c.rawValue) -> \($0.rawValue)" } }

    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {
        var e = envelope
        let name = e.attrs[nameAttr]?.stringValue ?? ""
        let size = e.payloadCount
        var mimeType: String?
        let (result, prefix) = e.withPayloadBytes { p -> (SniffResult, String) in
            let head = UnsafeRawBufferPointer(rebasing: p.prefix(16))
            let r = Sniff.classify(name: name, head: head, size: size)
            if let m = magic, mime == .always || (mime == .whenNeeded && r.intakeClass == .unknown) {
                // libmagic needs only the start of the content for a MIME type.
                mimeType = m.describe(UnsafeRawBufferPointer(rebasing: p.prefix(64 * 1024)))
            }
            let head8 = UnsafeRawBufferPointer(rebasing: p.prefix(8))
            let hex = String(unsafeUninitializedCapacity: head8.count * 2) { out in
                for (i, b) in head8.enumerated() {
                    out[2 * i] = Self.hexDigits[Int(b >> 4)]; out[2 * i + 1] = Self.hexDigits[Int(b & 0xF)]
                }
                return head8.count * 2
            }
            return (r, hex)
        }
        if mimeType != nil { mimeCalls += 1 }
        var disposition = result.disposition
        let strictFrom: Disposition? = mode == .strict && (disposition == .triageDisguised || disposition == .resealCandidate) ? disposition : nil
        if strictFrom != nil { disposition = .quarantine }
        let cls = result.intakeClass
        e.attrs.reserveCapacity(e.attrs.count + 10)
        if let f = strictFrom { e.attrs["strict_from"] = .string(f.rawValue) }
        e.attrs["intake_class"] = .string(cls.rawValue)
        e.attrs["disposition"] = .string(disposition.rawValue)
        e.attrs["extension"] = .string(result.extensionName)
        e.attrs["size_bytes"] = .int(Int64(size))
        e.attrs["magic_prefix_hex"] = .string(prefix)
        e.attrs["tbz_version"] = .int(Int64(result.tbz.version))
        if let f = result.tbz.flags { e.attrs["tbz_flags"] = .int(Int64(f)) }
        if let s = result.tbz.ssm { e.attrs["ssm"] = .int(Int64(s)) }
        if let m = mimeType { e.attrs["mime"] = .string(m) }
        counts[cls.index] += 1
        var details: [String: AttrValue] = ["filename": .string(name), "intake_class": .string(cls.rawValue), "disposition": .string(disposition.rawValue)]
        if let m = mimeType { details["mime"] = .string(m) }
        // How the file arrived, and how many inotify events the inbox coalesced into this arrival.
        if let n = e.attrs["arrival_events"] { details["arrival_events"] = n }
        if let a = e.attrs["arrival"] { details["arrival"] = a }
        context.audit(.about(e, decision: "classify", reason: Self.reasons[cls.index][disposition.index], details: details))
        if mode == .passive {
            context.emit(e, to: observed)
        } else {
            context.emit(e, to: outs[disposition.index])
        }
    }

    public var tickInterval: UInt64? { 1_000_000_000 }
    public func tick(context: any StageContext) throws { reportCounts(context) }
    public func drain(context: any StageContext) throws { reportCounts(context) }
    func reportCounts(_ context: any StageContext) {
        for c in IntakeClass.allCases where counts[c.index] > 0 { context.report(c.rawValue, .int(Int64(counts[c.index]))) }
        context.report("mime_calls", .int(Int64(mimeCalls)))
        context.report("mode", .string(mode.rawValue))
    }
}
