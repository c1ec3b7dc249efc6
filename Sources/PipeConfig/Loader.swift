import Foundation
import PipeKit
import Yams

/// Reads pipeline YAML into a ``PipelineSpec``, collecting every problem with its position.
/// Structural problems are found here; references, kinds and configs in ``PipelineValidator``.
public struct PipelineLoader {
    public let file: String
    var diags: [Diagnostic] = []
    /// Variables for `${NAME}` in config strings: the environment, plus PIPELINE_DIR (the
    /// directory of the pipeline file).
    let variables: [String: String]

    public init(file: String) {
        self.file = file
        var v = ProcessInfo.processInfo.environment
        var dir = (file as NSString).deletingLastPathComponent
        if !dir.hasPrefix("/") { dir = FileManager.default.currentDirectoryPath + (dir.isEmpty ? "" : "/" + dir) }
        v["PIPELINE_DIR"] = dir
        variables = v
    }

    /// Loads and validates a file; returns the spec and every diagnostic (empty when valid).
    public static func load(path: String, registry: StageRegistry) -> (PipelineSpec?, [Diagnostic]) {
        guard let data = FileManager.default.contents(atPath: path) else {
            return (nil, [Diagnostic(file: path, pos: .start, message: "cannot read file (missing or not readable)")])
        }
        guard let text = String(data: data, encoding: .utf8) else {
            return (nil, [Diagnostic(file: path, pos: .start, message: "file is not UTF-8 text")])
        }
        return load(text: text, file: path, registry: registry)
    }

    public static func load(text: String, file: String, registry: StageRegistry) -> (PipelineSpec?, [Diagnostic]) {
        // A key given twice in one mapping stops YAML composition at the first such mapping: name
        // each repeat where it is, set it aside (renamed in place, so every position stays) and
        // go on, so that the rest of the file is still checked.
        var text = text
        var repeats: [Diagnostic] = [], placeholders: [String] = []
        while repeats.count < 64, case .duplicatedKeysInMapping(let keys, let ctx)? = Self.composeError(text) {
            // Lines split on any line break (a CRLF file too), joined back with LF: positions stay.
            var lines = text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).map(String.init)
            var moved = false
            for key in keys {
                guard let (first, at) = Self.repeatOf(key, mappingKeyAt: (ctx.mark.line, ctx.mark.column), in: lines) else { continue }
                repeats.append(Diagnostic(file: file, pos: SourcePos(line: at.line, column: at.column),
                                          message: "duplicate key '\(key)' (first at line \(first.line), column \(first.column))"))
                guard let ph = Self.placeholder(length: key.count, index: placeholders.count) else { continue }
                placeholders.append(ph)
                var chars = Array(lines[at.line - 1])
                chars.replaceSubrange((at.column - 1)..<(at.column - 1 + key.count), with: Array(ph))
                lines[at.line - 1] = String(chars)
                moved = true
            }
            if !moved { break }
            text = lines.joined(separator: "\n")
        }
        func keep(_ d: Diagnostic) -> Bool { !placeholders.contains { d.message.contains("'\($0)'") } }
        var l = PipelineLoader(file: file)
        let spec = l.parse(text)
        guard var spec else { return (nil, (repeats + l.diags.filter(keep)).sorted { $0.pos < $1.pos }) }
        var v = PipelineValidator(spec: spec, registry: registry)
        v.validate()
        spec = v.spec
        let all = (repeats + l.diags.filter(keep) + v.diags.filter(keep)).sorted { ($0.pos, $0.message) < ($1.pos, $1.message) }
        return (spec, all)
    }

    static func composeError(_ text: String) -> YamlError? {
        do { _ = try Yams.compose(yaml: text); return nil } catch let e as YamlError { return e } catch { return nil }
    }

    /// The first and the second place `key` is given in the mapping that has a key at `mark`
    /// (1-based; Yams names one duplicate key's first position): in a flow mapping on that line,
    /// the keys at its own brace depth; in a block mapping, the keys at that column from where the
    /// mapping starts to where it ends. Nil when not found.
    static func repeatOf(_ key: String, mappingKeyAt mark: (line: Int, column: Int), in lines: [String])
        -> (first: (line: Int, column: Int), second: (line: Int, column: Int))? {
        guard mark.line >= 1, mark.line <= lines.count, mark.column >= 1 else { return nil }
        let k = Array(key)
        func isKey(_ c: [Character], at i: Int) -> Bool {
            guard i >= 0, i + k.count <= c.count, Array(c[i..<(i + k.count)]) == k else { return false }
            if i > 0, c[i - 1].isLetter || c[i - 1].isNumber || c[i - 1] == "_" || c[i - 1] == "-" { return false }
            var j = i + k.count
            while j < c.count, c[j] == " " { j += 1 }
            return j < c.count && c[j] == ":"
        }
        let line = Array(lines[mark.line - 1])
        let col = min(mark.column - 1, line.count)
        // A flow mapping: an unclosed `{` before the mark on its line.
        var depth = 0, open = -1
        for i in stride(from: col - 1, through: 0, by: -1) {
            if line[i] == "}" { depth += 1 } else if line[i] == "{" { if depth == 0 { open = i; break }; depth -= 1 }
        }
        if open >= 0 {
            var found: [(line: Int, column: Int)] = []
            var d = 0, i = open + 1
            while i < line.count, d >= 0 {
                if line[i] == "{" || line[i] == "[" { d += 1 } else if line[i] == "}" || line[i] == "]" { d -= 1 }
                else if d == 0, isKey(line, at: i) { found.append((mark.line, i + 1)); if found.count == 2 { return (found[0], found[1]) } }
                i += 1
            }
            return nil
        }
        // A block mapping: its keys sit at the mark's column.
        func indent(_ c: [Character]) -> Int? {
            guard let s = c.firstIndex(where: { $0 != " " }), c[s] != "#" else { return nil }
            return s
        }
        var top = mark.line - 1
        while top > 0 {
            let c = Array(lines[top])
            if c.count > col, col >= 2, c[col - 2] == "-", c[..<(col - 2)].allSatisfy({ $0 == " " }) { break }  // `- key:` opens it
            guard let s = indent(Array(lines[top - 1])) else { top -= 1; continue }
            if s < col { break }
            top -= 1
        }
        var found: [(line: Int, column: Int)] = []
        for n in top..<lines.count {
            let c = Array(lines[n])
            guard let s = indent(c) else { continue }
            let opensHere = n == top && c.count > col && col >= 2 && c[col - 2] == "-"
            if s < col && !opensHere { if n > mark.line - 1 { break } else { continue } }
            if n > top, s == col - 2, c.count > s, c[s] == "-" { break }   // the next list item: another mapping
            if isKey(c, at: col) && (s == col || opensHere) {
                found.append((n + 1, col + 1))
                if found.count == 2 { return (found[0], found[1]) }
            }
        }
        return nil
    }

    /// A stand-in key of `length` characters, distinct for each `index`, that no stage uses and
    /// YAML reads as a plain string; nil when `length` leaves no more of them.
    static func placeholder(length: Int, index: Int) -> String? {
        guard length >= 1, length >= 64 || index < (1 << length) else { return nil }
        return String((0..<length).map { (index >> $0) & 1 == 0 ? Character("^") : Character("+") })
    }

    mutating func error(_ pos: SourcePos, _ m: String) { diags.append(Diagnostic(file: file, pos: pos, message: m)) }

    func pos(_ n: Node) -> SourcePos { n.mark.map { SourcePos(line: $0.line, column: $0.column) } ?? .start }

    /// The YAML text parsed to a node tree; syntax errors become diagnostics.
    mutating func parse(_ text: String) -> PipelineSpec? {
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch let e as YamlError {
            switch e {
            case .scanner(let ctx, let problem, let mark, _), .parser(let ctx, let problem, let mark, _), .composer(let ctx, let problem, let mark, _):
                var m = "YAML syntax error: \(problem)"
                if let ctx { m += " (\(ctx.text) at \(ctx.mark.line):\(ctx.mark.column))" }
                error(SourcePos(line: mark.line, column: mark.column), m)
            case .duplicatedKeysInMapping(let dups, let ctx):
                // (Only a repeat `load(text:)` could not find on the lines gets here.)
                error(SourcePos(line: ctx.mark.line, column: ctx.mark.column), "duplicate key(s) \(dups.joined(separator: ", ")) in mapping")
            case .reader(let problem, _, _, _):
                error(.start, "YAML reader error: \(problem)")
            default:
                error(.start, "YAML error: \(e)")
            }
            return nil
        } catch {
            self.error(.start, "YAML error: \(error)")
            return nil
        }
        guard let root, let top = root.mapping else {
            error(.start, "expected a mapping with a `stages` list at the top level")
            return nil
        }
        let stem = ((file as NSString).lastPathComponent as NSString).deletingPathExtension
        var spec = PipelineSpec(file: file, name: isValidName(stem) ? stem : "pipeline")
        var sawStages = false
        for (k, v) in top {
            guard let key = k.string else { error(pos(k), "expected a string key"); continue }
            switch key {
            case "pipeline", "name":
                if let s = scalarString(v), isValidName(s) { spec.name = s } else { error(pos(v), "pipeline name must match [a-z0-9_-]+") }
            case "version":
                if v.int != 1 { error(pos(v), "unsupported pipeline version (this host reads version 1)") }
            case "audit":
                if let m = v.mapping {
                    for (ak, av) in m {
                        switch ak.string {
                        case "level":
                            if let s = scalarString(av), let a = AuditLevel(rawValue: s) { spec.audit = a }
                            else { error(pos(av), "audit.level must be `all` or `decisions`") }
                        case "log":
                            if let s = scalarString(av), !s.isEmpty { spec.auditLog.path = s } else { error(pos(av), "audit.log must be a file path") }
                        case "key":
                            if let s = scalarString(av), !s.isEmpty { spec.auditLog.key = s; spec.auditLog.keyIsDefault = false }
                            else { error(pos(av), "audit.key must be the path of a `pipehost keygen` key file") }
                        case "checkpoint_every":
                            if let n = av.int, n >= 1, n <= 100_000_000 { spec.auditLog.checkpointEvery = n }
                            else { error(pos(av), "audit.checkpoint_every must be an integer from 1 to 100000000 (records)") }
                        case "checkpoint_interval_s":
                            if let d = av.float ?? av.int.map(Double.init), d > 0, d <= 86_400 { spec.auditLog.checkpointIntervalS = d }
                            else { error(pos(av), "audit.checkpoint_interval_s must be a number of seconds from 0 to 86400") }
                        default:
                            error(pos(ak), "unknown audit key '\(ak.string ?? "?")' (expected level, log, key, checkpoint_every, checkpoint_interval_s)")
                        }
                    }
                } else if let s = scalarString(v), let a = AuditLevel(rawValue: s) { spec.audit = a }
                else { error(pos(v), "audit must be `all` or `decisions`, or a mapping { level, log, key, checkpoint_every, checkpoint_interval_s }") }
            case "delivery":
                delivery(v, into: &spec.delivery)
            case "dead_letter":
                guard let m = v.mapping else { error(pos(v), "dead_letter must be a mapping like { path: dead-letters.jsonl }"); continue }
                for (dk, dv) in m {
                    if dk.string == "path", let p = scalarString(dv), !p.isEmpty { spec.deadLetterPath = p }
                    else { error(pos(dk), "unknown or invalid dead_letter key '\(dk.string ?? "?")' (expected path: FILE)") }
                }
            case "limits":
                guard let m = v.mapping else { error(pos(v), "limits must be a mapping"); continue }
                for (lk, lv) in m {
                    switch lk.string {
                    case "max_envelope_bytes":
                        if let n = lv.int, n >= 1024, n <= 64 << 20 { spec.limits.maxEnvelopeBytes = n }
                        else { error(pos(lv), "max_envelope_bytes must be an integer from 1024 to 67108864") }
                    case "max_batch_envelopes":
                        if let n = lv.int, n >= 1, n <= 65536 { spec.limits.maxBatchEnvelopes = n }
                        else { error(pos(lv), "max_batch_envelopes must be an integer from 1 to 65536") }
                    default: error(pos(lk), "unknown limits key '\(lk.string ?? "?")' (expected max_envelope_bytes, max_batch_envelopes)")
                    }
                }
            case "defaults":
                guard let m = v.mapping else { error(pos(v), "defaults must be a mapping"); continue }
                for (dk, dv) in m {
                    switch dk.string {
                    case "placement": if let p = placement(dv) { spec.defaultPlacement = p }
                    case "lane":
                        spec.defaultLane = laneSettings(dv, base: spec.defaultLane)
                        if let p = spec.defaultLane.problem { error(pos(dv), "defaults.lane: \(p)") }
                    default: error(pos(dk), "unknown defaults key '\(dk.string ?? "?")' (expected placement, lane)")
                    }
                }
            case "stages":
                sawStages = true
                guard let seq = v.sequence else { error(pos(v), "stages must be a list"); continue }
                for item in seq { if let s = stage(item) { spec.stages.append(s) } }
            case "metrics":
                guard let m = v.mapping else { error(pos(v), "metrics must be a mapping like { listen: 127.0.0.1:9464 }"); continue }
                for (mk, mv) in m {
                    guard mk.string == "listen" else { error(pos(mk), "unknown metrics key '\(mk.string ?? "?")' (expected listen)"); continue }
                    guard let s = mv.scalar?.string, let colon = s.lastIndex(of: ":"), let port = Int(s[s.index(after: colon)...]),
                          port >= 0, port <= 65535, !s[..<colon].isEmpty else {
                        error(pos(mv), "metrics.listen must be HOST:PORT, e.g. 127.0.0.1:9464"); continue
                    }
                    spec.metrics = MetricsSpec(listen: s, host: String(s[..<colon]), port: port)
                }
            case "remote":
                spec.remote = remote(v)
            case "lanes":
                guard let seq = v.sequence else { error(pos(v), "lanes must be a list of overrides"); continue }
                for item in seq { if let o = laneOverride(item) { spec.lanes.append(o) } }
            default:
                var m = "unknown top-level key '\(key)'"
                let known = ["pipeline", "version", "audit", "delivery", "dead_letter", "limits", "defaults", "stages", "lanes", "metrics", "remote"]
                if let s = didYouMean(key, among: known) { m += " (did you mean '\(s)'?)" }
                error(pos(k), m)
            }
        }
        if !sawStages { error(pos(root), "missing `stages` list") }
        return spec
    }

    func scalarString(_ n: Node) -> String? { n.scalar?.string }

    /// `delivery: at-least-once` or `{ mode, ack_timeout_ms, max_pending, max_attempts, dedup_window }`.
    mutating func delivery(_ v: Node, into d: inout DeliverySpec) {
        let modes = DeliverySpec.Mode.allCases.map(\.rawValue).joined(separator: " or ")
        if let s = scalarString(v) {
            if let m = DeliverySpec.Mode(rawValue: s) { d.mode = m } else { error(pos(v), "delivery must be \(modes), or a mapping { \(DeliverySpec.keys.joined(separator: ", ")) }, got '\(s)'") }
            return
        }
        guard let m = v.mapping else { error(pos(v), "delivery must be \(modes), or a mapping { \(DeliverySpec.keys.joined(separator: ", ")) }"); return }
        func count(_ v: Node, _ name: String, min lo: Int, max hi: Int) -> Int? {
            if let b = v.int, b >= lo, b <= hi { return b }
            error(pos(v), "\(name) must be an integer from \(lo) to \(hi)"); return nil
        }
        for (k, x) in m {
            switch k.string {
            case "mode":
                if let s = scalarString(x), let mode = DeliverySpec.Mode(rawValue: s) { d.mode = mode } else { error(pos(x), "delivery.mode must be \(modes)") }
            case "ack_timeout_ms": d.ackTimeoutMs = count(x, "delivery.ack_timeout_ms", min: 10, max: 86_400_000) ?? d.ackTimeoutMs
            case "max_pending": d.maxPending = count(x, "delivery.max_pending", min: 1, max: 10_000_000) ?? d.maxPending
            case "max_attempts": d.maxAttempts = count(x, "delivery.max_attempts", min: 1, max: 1_000_000) ?? d.maxAttempts
            case "dedup_window": d.dedupWindow = count(x, "delivery.dedup_window", min: 1, max: 100_000_000) ?? d.dedupWindow
            default:
                var msg = "unknown delivery key '\(k.string ?? "?")'"
                if let s = didYouMean(k.string ?? "", among: DeliverySpec.keys) { msg += " (did you mean '\(s)'?)" }
                error(pos(k), msg + " (expected \(DeliverySpec.keys.joined(separator: ", ")))")
            }
        }
    }

    /// `remote: { listen, advertise, key, insecure, worker_wait_s, down_after_ms, workers: { NAME: { key } } }`.
    mutating func remote(_ v: Node) -> RemoteSpec? {
        guard let m = v.mapping else { error(pos(v), "remote must be a mapping { \(RemoteSpec.keys.joined(separator: ", ")) }"); return nil }
        var r = RemoteSpec()
        r.pos = pos(v)
        var sawListen = false
        for (k, x) in m {
            switch k.string {
            case "listen":
                sawListen = true
                guard let s = scalarString(x), s.hasPrefix("tcp://"), let colon = s.lastIndex(of: ":"), colon > s.index(s.startIndex, offsetBy: 6),
                      let port = Int(s[s.index(after: colon)...]), port > 0, port <= 65535 else {
                    error(pos(x), "remote.listen must be tcp://HOST:PORT with a port from 1 to 65535, e.g. tcp://127.0.0.1:7800"); continue
                }
                r.listen = s; r.listenHost = String(s[s.index(s.startIndex, offsetBy: 6)..<colon]); r.listenPort = port
            case "advertise":
                if let s = scalarString(x), !s.isEmpty, !s.contains("/"), !s.contains(":"), s != "*" { r.advertise = s }
                else { error(pos(x), "remote.advertise must be a host name or IPv4 address workers can reach (no scheme, no port)") }
            case "key":
                if let s = scalarString(x), !s.isEmpty { r.key = s } else { error(pos(x), "remote.key must be the path of the host's curve.key (from `pipehost keygen`)") }
            case "insecure":
                if let b = x.bool { r.insecure = b } else { error(pos(x), "remote.insecure must be true or false") }
            case "worker_wait_s":
                if let d = x.float ?? x.int.map(Double.init), d > 0, d <= 86_400 { r.workerWaitSeconds = d }
                else { error(pos(x), "remote.worker_wait_s must be a number of seconds from 0 to 86400") }
            case "down_after_ms":
                if let n = x.int, n >= 200, n <= 600_000 { r.downAfterMs = n } else { error(pos(x), "remote.down_after_ms must be an integer from 200 to 600000") }
            case "workers":
                guard let wm = x.mapping else { error(pos(x), "remote.workers must be a mapping { NAME: { key: Z85 or FILE } }"); continue }
                for (wk, wv) in wm {
                    guard let name = wk.string, isValidName(name) else { error(pos(wk), "worker name must match [a-z0-9_-]+"); continue }
                    if r.workers.contains(where: { $0.name == name }) { error(pos(wk), "worker '\(name)' is listed twice"); continue }
                    var key: String?
                    if let s = scalarString(wv), !s.isEmpty { key = s }
                    else if let em = wv.mapping {
                        for (ek, ev) in em {
                            if ek.string == "key", let s = scalarString(ev), !s.isEmpty { key = s }
                            else { error(pos(ek), "unknown worker key '\(ek.string ?? "?")' (expected key: a Z85 public key or a curve.pub file)") }
                        }
                    }
                    r.workers.append(.init(name: name, key: key ?? "", pos: pos(wv)))
                }
            case "owners":
                let items = x.sequence.map(Array.init) ?? (scalarString(x) != nil ? [x] : [])
                if items.isEmpty { error(pos(x), "remote.owners must be a list of owner keys (hex Ed25519 public keys or signing.pub files)") }
                for it in items {
                    if let s = scalarString(it), !s.isEmpty { r.owners.append(s) } else { error(pos(it), "an owner must be a hex Ed25519 public key or the path of a signing.pub") }
                }
            case "control":
                if let c = scalarString(x), c.hasPrefix("tcp://"), let colon = c.lastIndex(of: ":"), Int(c[c.index(after: colon)...]).map({ $0 > 0 && $0 < 65536 }) == true {
                    r.control = c
                } else { error(pos(x), "remote.control must be tcp://HOST:PORT (where a remote pipectl connects)") }
            case "operators":
                guard let om = x.mapping else { error(pos(x), "remote.operators must be a mapping { NAME: Z85 key or curve.pub path }"); continue }
                for (ok, ov) in om {
                    guard let name = ok.string, isValidName(name), let key = scalarString(ov) ?? ov.mapping?.first(where: { $0.key.string == "key" }).flatMap({ scalarString($0.value) }), !key.isEmpty else {
                        error(pos(ok), "an operator is NAME: KEY (a Z85 CURVE public key or a curve.pub path), NAME matching [a-z0-9_-]+"); continue
                    }
                    r.operators.append(.init(name: name, key: key, pos: pos(ov)))
                }
            case "grant_epochs":
                if let s = scalarString(x), !s.isEmpty { r.grantEpochs = s } else { error(pos(x), "remote.grant_epochs must be a file path") }
            default:
                var msg = "unknown remote key '\(k.string ?? "?")'"
                if let s = didYouMean(k.string ?? "", among: RemoteSpec.keys) { msg += " (did you mean '\(s)'?)" }
                error(pos(k), msg + " (expected \(RemoteSpec.keys.joined(separator: ", ")))")
            }
        }
        if !sawListen { error(pos(v), "remote needs listen: tcp://HOST:PORT (where workers connect)") }
        for w in r.workers where w.key.isEmpty && r.owners.isEmpty {
            error(w.pos, "worker '\(w.name)' needs key: a Z85 CURVE public key or the path of its curve.pub (or list owners: whose grants admit it)")
        }
        if r.control != nil && r.operators.isEmpty && !r.insecure {
            error(pos(v), "remote.control needs operators: NAME: KEY (the pipectl client keys allowed to connect)")
        }
        if !r.owners.isEmpty && r.insecure { error(pos(v), "remote.owners needs CURVE: a grant is checked against the key of the authenticated connection, which plaintext tcp does not have") }
        if sawListen, r.advertise == nil, ["*", "0.0.0.0", ""].contains(r.listenHost) {
            error(pos(v), "remote.listen binds every address; say advertise: ADDRESS (the one workers reach this host at)")
        }
        if !r.insecure && r.key == nil { error(pos(v), "remote needs key: the host's curve.key (from `pipehost keygen`), or insecure: true for plaintext tcp") }
        return r
    }

    mutating func placement(_ n: Node) -> Placement? {
        if let s = n.scalar?.string {
            switch s {
            case "in-process": return .inProcess
            case "process": return .process
            default: error(pos(n), "placement must be `in-process`, `process` or { worker: NAME }, got '\(s)'"); return nil
            }
        }
        if let m = n.mapping, m.count == 1, let (k, v) = m.first, k.string == "worker", let name = v.scalar?.string {
            if isValidName(name) { return .worker(name) }
            error(pos(v), "worker name must match [a-z0-9_-]+"); return nil
        }
        error(pos(n), "placement must be `in-process`, `process` or { worker: NAME }")
        return nil
    }

    mutating func laneSettings(_ n: Node, base: LaneSettings) -> LaneSettings {
        base.applying(lanePatch(n, allowing: []))
    }

    /// Lane settings keys of a mapping (plus `extra` keys the caller reads itself).
    mutating func lanePatch(_ n: Node, allowing extra: [String]) -> LanePatch {
        var p = LanePatch()
        guard let m = n.mapping else { error(pos(n), "lane settings must be a mapping like { bound: 1024, when_full: block }"); return p }
        func count(_ v: Node, _ name: String, min lo: Int, max hi: Int) -> Int? {
            if let b = v.int, b >= lo, b <= hi { return b }
            error(pos(v), "\(name) must be an integer from \(lo) to \(hi)"); return nil
        }
        for (k, v) in m {
            switch k.string {
            case "bound": p.bound = count(v, "bound", min: 1, max: 1_000_000)
            case "when_full":
                if let w = v.scalar.flatMap({ WhenFull(rawValue: $0.string) }) { p.whenFull = w }
                else { error(pos(v), "when_full must be one of \(WhenFull.allCases.map(\.rawValue).joined(separator: ", "))") }
            case "bytes": p.bytes = count(v, "bytes", min: 1024, max: 1 << 40)
            case "low": p.low = count(v, "low", min: 0, max: 1_000_000)
            case "high": p.high = count(v, "high", min: 1, max: 1_000_000)
            case "release": p.release = count(v, "release", min: 0, max: 1_000_000)
            case let key? where extra.contains(key): continue
            default:
                let known = extra + LanePatch.keys
                var msg = "unknown lane key '\(k.string ?? "?")'"
                if let s = didYouMean(k.string ?? "", among: known) { msg += " (did you mean '\(s)'?)" }
                error(pos(k), msg + " (expected \(known.joined(separator: ", ")))")
            }
        }
        return p
    }

    mutating func stage(_ n: Node) -> StageSpec? {
        guard let m = n.mapping else { error(pos(n), "a stage must be a mapping with `id` and `kind`"); return nil }
        var s = StageSpec(id: "", kind: "", pos: pos(n), kindPos: pos(n), configPos: pos(n))
        var inputsNode: Node?
        for (k, v) in m {
            switch k.string {
            case "id":
                guard let id = v.scalar?.string else { error(pos(v), "stage id must be a string"); continue }
                if !isValidName(id) { error(pos(v), "stage id '\(id)' must match [a-z0-9_-]+ (no dots)") }
                s.id = id; s.pos = pos(v)
            case "kind":
                guard let kind = v.scalar?.string else { error(pos(v), "stage kind must be a string"); continue }
                s.kind = kind; s.kindPos = pos(v)
            case "config":
                s.configPos = pos(v)
                if v.scalar?.string == "" || v.null != nil { continue }
                s.config = expand(configValue(v), at: pos(v))
                if let cm = v.mapping { for (ck, _) in cm { if let name = ck.string { s.configKeyPos[name] = pos(ck) } } }
            case "inputs": inputsNode = v
            case "placement": s.placement = placement(v)
            case "replicas":
                if let r = v.int, r >= 1, r <= 64 { s.replicas = r } else { error(pos(v), "replicas must be an integer from 1 to 64") }
            default:
                var msg = "unknown stage key '\(k.string ?? "?")'"
                if let sug = didYouMean(k.string ?? "", among: ["id", "kind", "config", "inputs", "placement", "replicas"]) { msg += " (did you mean '\(sug)'?)" }
                error(pos(k), msg)
            }
        }
        if s.id.isEmpty { error(pos(n), "stage is missing `id`") }
        if s.kind.isEmpty { error(pos(n), "stage '\(s.id)' is missing `kind`") }
        if let inputsNode { s.inputs = inputs(inputsNode) }
        return s
    }

    /// `[ref, ...]` (the stage's first port) or `{ port: [ref, ...], ... }`. A ref is `stage[.output]`
    /// or `{ from: stage[.output], loop_back: { max_hops: N } }`.
    mutating func inputs(_ n: Node) -> [InputRef] {
        if let seq = n.sequence { return seq.compactMap { ref($0, port: "") } }
        if let m = n.mapping {
            var out: [InputRef] = []
            for (k, v) in m {
                guard let port = k.string else { continue }
                if let seq = v.sequence { out += seq.compactMap { ref($0, port: port, portPos: pos(k)) } }
                else if let r = ref(v, port: port, portPos: pos(k)) { out.append(r) }
            }
            return out
        }
        if n.scalar != nil, let r = ref(n, port: "") { return [r] }
        error(pos(n), "inputs must be a list of `stage` or `stage.output` references, or a map from port to such a list")
        return []
    }

    mutating func ref(_ n: Node, port: String, portPos: SourcePos? = nil) -> InputRef? {
        func split(_ s: String, at p: SourcePos) -> (String, String?)? {
            let parts = s.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
            guard parts.count <= 2, parts.allSatisfy(isValidName) else {
                error(p, "input reference '\(s)' must be `stage` or `stage.output` with names matching [a-z0-9_-]+"); return nil
            }
            return (parts[0], parts.count == 2 ? parts[1] : nil)
        }
        if let s = n.scalar?.string {
            guard let (st, out) = split(s, at: pos(n)) else { return nil }
            return InputRef(port: port, stage: st, output: out, pos: pos(n))
        }
        guard let m = n.mapping else { error(pos(n), "an input must be `stage[.output]` or { from: ..., loop_back: { max_hops: N } }"); return nil }
        var from: (String, String?)?, loop = false, hops: Int?, explicitPort = port
        for (k, v) in m {
            switch k.string {
            case "from":
                if let s = v.scalar?.string { from = split(s, at: pos(v)) } else { error(pos(v), "`from` must be `stage` or `stage.output`") }
            case "port":
                if let p = v.scalar?.string, isValidName(p) { explicitPort = p } else { error(pos(v), "`port` must be a port name") }
            case "loop_back":
                loop = true
                if let lm = v.mapping, let (lk, lv) = lm.first, lm.count == 1, lk.string == "max_hops" {
                    if let h = lv.int, h >= 1, h <= 1_000_000 { hops = h } else { error(pos(lv), "max_hops must be an integer from 1 to 1000000") }
                } else {
                    error(pos(v), "loop_back must be { max_hops: N } (a loop-back edge needs a hop limit)")
                }
            default: error(pos(k), "unknown input key '\(k.string ?? "?")' (expected from, port, loop_back)")
            }
        }
        guard let (st, out) = from else { error(pos(n), "input is missing `from`"); return nil }
        return InputRef(port: explicitPort, stage: st, output: out, loopBack: loop, maxHops: hops, pos: pos(n))
    }

    mutating func laneOverride(_ n: Node) -> LaneOverride? {
        guard let m = n.mapping else { error(pos(n), "a lane override must be a mapping { from, to, bound, when_full, ... }"); return nil }
        var o = LaneOverride(from: "", to: "", patch: lanePatch(n, allowing: ["from", "to"]), pos: pos(n))
        for (k, v) in m {
            switch k.string {
            case "from": o.from = v.scalar?.string ?? ""
            case "to": o.to = v.scalar?.string ?? ""
            default: continue
            }
        }
        if o.from.isEmpty || o.to.isEmpty { error(pos(n), "a lane override needs `from` (stage[.output]) and `to` (stage[.port])"); return nil }
        return o
    }

    /// Replaces `${NAME}` in every string of a config; an unknown name is a diagnostic.
    mutating func expand(_ v: ConfigValue, at p: SourcePos) -> ConfigValue {
        switch v {
        case .string(let s) where s.contains("${"):
            var out = "", rest = Substring(s)
            while let open = rest.range(of: "${") {
                out += rest[rest.startIndex..<open.lowerBound]
                let after = rest[open.upperBound...]
                guard let close = after.firstIndex(of: "}") else { error(p, "unterminated ${ in '\(s)'"); return v }
                let name = String(after[after.startIndex..<close])
                if let value = variables[name] { out += value } else { error(p, "unknown variable ${\(name)} in '\(s)' (set it in the environment; PIPELINE_DIR is built in)") }
                rest = after[after.index(after: close)...]
            }
            return .string(out + rest)
        case .list(let l): return .list(l.map { expand($0, at: p) })
        case .map(let m): return .map(m.map { ConfigEntry(key: $0.key, value: expand($0.value, at: p)) })
        default: return v
        }
    }

    /// YAML node -> ConfigValue, resolving plain scalars by YAML 1.1 core tags.
    func configValue(_ n: Node) -> ConfigValue { PipelineTestLoader.configValue(n) }
}
