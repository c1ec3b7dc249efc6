import Foundation
import PipeKit

/// `police`: periodically scans directories where files linger (quarantine, triage, the inbox)
/// and reports each finding once: severity by content class (disguised ALERT, executable
/// CRITICAL, json-text/pdf/unknown WARN, others INFO; INFO older than `age_alert_s` becomes WARN).
/// A finding is re-reported only when its severity rises. Each finding is an audit record and an
/// envelope on `out`.
public final class PoliceStage: SourceStage {
    public static let descriptor = StageDescriptor(
        kind: "police",
        summary: "Periodically scans quarantine, triage and inbox directories and reports lingering files by severity.",
        role: .source,
        fields: [
            ConfigField("dirs", .list(.string), default: .list([.string("quarantine"), .string("triage"), .string("inbox")]),
                        doc: "Directories to scan (not recursive); relative to the run directory. Missing ones are skipped."),
            ConfigField("interval_ms", .int(min: 10), default: .int(60_000), doc: "Time between scans (the first is at start)."),
            ConfigField("age_alert_s", .double(min: 0), default: .double(3600), doc: "An INFO finding older than this (by mtime) becomes WARN."),
            ConfigField("scans", .int(min: 0), default: .int(0), doc: "Stop after this many scans (0: scan until stopped)."),
        ],
        make: { PoliceStage(config: $0) })

    let dirSpecs: [String]
    let intervalNs: UInt64
    let ageAlertNs: UInt64
    let maxScans: Int
    var dirs: [String] = []
    var nextScan: UInt64 = 0
    var scans = 0
    var out = OutputHandle(index: 0, name: "out")
    var stopped = false
    /// dir/name/inode -> severity reported.
    var reported: [String: Severity] = [:]
    var queue: [Envelope] = []
    var queueHead = 0
    var bySeverity: [Severity: Int] = [:]

    init(config c: ConfigReader) {
        dirSpecs = c.strings("dirs") ?? ["quarantine", "triage", "inbox"]
        intervalNs = UInt64(c.int("interval_ms") ?? 60_000) * 1_000_000
        ageAlertNs = UInt64((c.double("age_alert_s") ?? 3600) * 1e9)
        maxScans = Int(c.int("scans") ?? 0)
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out")
        dirs = dirSpecs.map { context.resolvePath($0) }
        nextScan = context.now
    }
    public func requestStop() { stopped = true }

    public func produce(budget: Int, context: any StageContext) throws -> SourceProgress {
        if stopped { return .exhausted }
        if queueHead == queue.count {
            queue.removeAll(keepingCapacity: true); queueHead = 0
            if maxScans > 0 && scans >= maxScans { return .exhausted }
            let now = context.now
            guard now >= nextScan else { return .idle(afterNs: nextScan - now) }
            scan(context: context)
            nextScan = now + intervalNs
        }
        var n = 0
        while n < budget, queueHead < queue.count, context.isWritable(out) {
            context.emit(queue[queueHead], to: out); queueHead += 1; n += 1
        }
        return .active
    }

    func scan(context: any StageContext) {
        scans += 1
        let wall = context.wallClockNs
        var seen = Set<String>()
        var head = [UInt8](repeating: 0, count: 16)
        for dir in dirs {
            guard let names = FS.list(dir) else { continue }
            for n in names.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
                let p = FS.join(dir, n)
                var st = stat()
                guard lstat(p, &st) == 0, st.st_mode & S_IFMT == S_IFREG else { continue }
                let name = String(decoding: n, as: UTF8.self)
                let fd = open(p, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
                var got = 0
                if fd >= 0 { got = max(0, head.withUnsafeMutableBytes { read(fd, $0.baseAddress, 16) }); close(fd) }
                // Content first: a lingering file is judged by what it is, even under a staging name.
                let judged = Sniff.isStaging(name) ? String(name[..<(name.lastIndex(of: ".") ?? name.endIndex)]) : name
                let sniffed = head.withUnsafeBytes { Sniff.classify(name: judged, head: UnsafeRawBufferPointer(rebasing: $0.prefix(got)), size: Int(st.st_size)) }
                let mtime = UInt64(max(0, FS.ns(st.st_mtim)))
                let age = wall > mtime ? wall - mtime : 0
                var sev = sniffed.intakeClass.severity
                if sev == .info && age > ageAlertNs { sev = .warn }
                let key = "\(dir)/\(Hex.encode(n))/\(st.st_ino)"
                seen.insert(key)
                if let prev = reported[key], prev >= sev { continue }
                reported[key] = sev
                bySeverity[sev, default: 0] += 1
                let attrs: [String: AttrValue] = [
                    "severity": .string(sev.rawValue), "dir": .string(dir), "filename": .string(name),
                    "intake_class": .string(sniffed.intakeClass.rawValue), "age_s": .double(Double(age) / 1e9),
                    "size_bytes": .int(Int64(st.st_size)),
                ]
                let e = Envelope(actor: "police", intent: "intake.police.finding", ingestNs: wall, attrs: attrs, payload: [])
                context.audit(.about(e, decision: "police-finding",
                                     reason: "\(sev.rawValue): \(sniffed.intakeClass.rawValue) file '\(name)' lingering in \(dir) for \(Int(Double(age) / 1e9)) s",
                                     details: attrs))
                queue.append(e)
            }
        }
        // Forget files that are gone, so the memory stays bounded by what lingers.
        reported = reported.filter { seen.contains($0.key) }
        context.report("scans", .int(Int64(scans)))
        context.report("lingering", .int(Int64(reported.count)))
        for (s, c) in bySeverity { context.report(s.rawValue.lowercased(), .int(Int64(c))) }
    }
}
