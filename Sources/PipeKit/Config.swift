import Foundation

/// A configuration value as written in pipeline YAML (and carried as JSON in ASSIGN frames).
public indirect enum ConfigValue: Sendable, Hashable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case list([ConfigValue])
    /// Keys in source order.
    case map([ConfigEntry])

    public var typeName: String {
        switch self {
        case .null: return "null"; case .bool: return "boolean"; case .int: return "integer"
        case .double: return "number"; case .string: return "string"; case .list: return "list"; case .map: return "map"
        }
    }

    public subscript(key: String) -> ConfigValue? {
        if case .map(let entries) = self { return entries.first(where: { $0.key == key })?.value }
        return nil
    }

}

public struct ConfigEntry: Sendable, Hashable {
    public var key: String
    public var value: ConfigValue
    public init(key: String, value: ConfigValue) { self.key = key; self.value = value }
}

/// The type of a configuration field.
public indirect enum ConfigType: Sendable, Hashable, CustomStringConvertible {
    case bool
    case int(min: Int64? = nil, max: Int64? = nil)
    case double(min: Double? = nil, max: Double? = nil)
    case string
    case enumeration([String])
    case list(ConfigType)
    /// A map from string keys to values of one type.
    case map(ConfigType)
    /// Any scalar (used for payload templates).
    case any

    public var description: String {
        switch self {
        case .bool: return "boolean"
        case .int: return "integer"
        case .double: return "number"
        case .string: return "string"
        case .enumeration(let cases): return cases.joined(separator: "|")
        case .list(let t): return "list of \(t)"
        case .map(let t): return "map of \(t)"
        case .any: return "any"
        }
    }

    /// JSON Schema type fragment.
    public var jsonSchema: [String: Any] {
        switch self {
        case .bool: return ["type": "boolean"]
        case .int(let lo, let hi):
            var d: [String: Any] = ["type": "integer"]; if let lo { d["minimum"] = lo }; if let hi { d["maximum"] = hi }; return d
        case .double(let lo, let hi):
            var d: [String: Any] = ["type": "number"]; if let lo { d["minimum"] = lo }; if let hi { d["maximum"] = hi }; return d
        case .string: return ["type": "string"]
        case .enumeration(let c): return ["enum": c]
        case .list(let t): return ["type": "array", "items": t.jsonSchema]
        case .map(let t): return ["type": "object", "additionalProperties": t.jsonSchema]
        case .any: return [:]
        }
    }

    /// nil when `v` fits this type, else the reason.
    public func check(_ v: ConfigValue) -> String? {
        switch (self, v) {
        case (.any, _): return nil
        case (.bool, .bool): return nil
        case (.int(let lo, let hi), .int(let i)):
            if let lo, i < lo { return "must be >= \(lo), got \(i)" }
            if let hi, i > hi { return "must be <= \(hi), got \(i)" }
            return nil
        case (.double(let lo, let hi), .int(let i)): return ConfigType.double(min: lo, max: hi).check(.double(Double(i)))
        case (.double(let lo, let hi), .double(let d)):
            if !d.isFinite { return "must be a finite number" }
            if let lo, d < lo { return "must be >= \(lo), got \(d)" }
            if let hi, d > hi { return "must be <= \(hi), got \(d)" }
            return nil
        case (.string, .string): return nil
        case (.enumeration(let cases), .string(let s)):
            return cases.contains(s) ? nil : "must be one of \(cases.joined(separator: ", ")), got '\(s)'"
        case (.list(let t), .list(let items)):
            for (i, item) in items.enumerated() { if let e = t.check(item) { return "item \(i): \(e)" } }
            return nil
        case (.map(let t), .map(let entries)):
            for e in entries { if let err = t.check(e.value) { return "key '\(e.key)': \(err)" } }
            return nil
        default: return "expected \(self), got \(v.typeName)"
        }
    }
}

/// One configuration field of a stage: name, type, default and doc text.
public struct ConfigField: Sendable, Hashable {
    public var name: String
    public var type: ConfigType
    /// nil: the field is required unless `optional`.
    public var defaultValue: ConfigValue?
    public var optional: Bool
    public var doc: String
    public init(_ name: String, _ type: ConfigType, default defaultValue: ConfigValue? = nil, optional: Bool = false, doc: String) {
        self.name = name; self.type = type; self.defaultValue = defaultValue; self.optional = optional; self.doc = doc
    }
    public var required: Bool { defaultValue == nil && !optional }
}

/// A problem with a stage's configuration; `key` names the offending key (nil: the config itself).
public struct ConfigIssue: Sendable, Hashable {
    public var key: String?
    public var message: String
    public init(key: String?, message: String) { self.key = key; self.message = message }
}

/// Validates a config map against fields: unknown keys, missing required fields, wrong types.
/// Every problem is reported, not just the first.
public func validateConfig(_ value: ConfigValue?, fields: [ConfigField]) -> [ConfigIssue] {
    var issues: [ConfigIssue] = []
    let entries: [ConfigEntry]
    switch value {
    case nil, .null?: entries = []
    case .map(let e)?: entries = e
    case let v?: return [ConfigIssue(key: nil, message: "config must be a map, got \(v.typeName)")]
    }
    let known = Set(fields.map(\.name))
    for e in entries where !known.contains(e.key) {
        var msg = "unknown config key '\(e.key)'"
        if let s = didYouMean(e.key, among: fields.map(\.name)) { msg += " (did you mean '\(s)'?)" }
        if !fields.isEmpty { msg += "; known keys: \(fields.map(\.name).joined(separator: ", "))" }
        issues.append(ConfigIssue(key: e.key, message: msg))
    }
    for f in fields {
        if let e = entries.first(where: { $0.key == f.name }) {
            if let err = f.type.check(e.value) { issues.append(ConfigIssue(key: f.name, message: "config field '\(f.name)' \(err)")) }
        } else if f.required {
            issues.append(ConfigIssue(key: nil, message: "missing required config field '\(f.name)' (\(f.type)): \(f.doc)"))
        }
    }
    return issues
}

/// Typed access to a validated configuration, with defaults filled in from the fields.
public struct ConfigReader: Sendable {
    public let values: [String: ConfigValue]
    public let fields: [ConfigField]

    public init(_ value: ConfigValue?, fields: [ConfigField]) {
        var v: [String: ConfigValue] = [:]
        for f in fields { if let d = f.defaultValue { v[f.name] = d } }
        if case .map(let entries)? = value { for e in entries { v[e.key] = e.value } }
        self.values = v; self.fields = fields
    }

    public func value(_ key: String) -> ConfigValue? { values[key].flatMap { $0 == .null ? nil : $0 } }
    public func int(_ key: String) -> Int64? { if case .int(let i)? = value(key) { return i }; return nil }
    public func double(_ key: String) -> Double? {
        switch value(key) { case .double(let d)?: return d; case .int(let i)?: return Double(i); default: return nil }
    }
    public func string(_ key: String) -> String? { if case .string(let s)? = value(key) { return s }; return nil }
    public func bool(_ key: String) -> Bool? { if case .bool(let b)? = value(key) { return b }; return nil }
    public func strings(_ key: String) -> [String]? {
        guard case .list(let l)? = value(key) else { return nil }
        return l.compactMap { if case .string(let s) = $0 { return s }; return nil }
    }
}

/// Suggests the closest candidate by edit distance (at most a third of the word, min 2); failing
/// that, a candidate the word abbreviates: one of its `-`/`_` parts (`null` for `null-sink`), or
/// one sharing at least two thirds of the word as its start (`passthru` for `passthrough`).
public func didYouMean(_ word: String, among candidates: [String]) -> String? {
    if let close = closestByEdits(word, among: candidates) { return close }
    guard word.count >= 3 else { return nil }
    let w = Array(word.lowercased())
    var best: (name: String, score: Int)?
    for c in candidates {
        let lc = c.lowercased()
        let parts = lc.split(whereSeparator: { $0 == "-" || $0 == "_" || $0 == "." }).map(String.init)
        var score = 0
        if parts.count > 1 && parts.contains(String(w)) { score = w.count }
        let shared = zip(w, lc).prefix { $0 == $1 }.count
        if shared >= max(4, (2 * w.count + 2) / 3) { score = max(score, shared) }
        guard score > 0 else { continue }
        if let b = best, score < b.score || (score == b.score && c.count >= b.name.count) { continue }
        best = (c, score)
    }
    return best?.name
}

func closestByEdits(_ word: String, among candidates: [String]) -> String? {
    func distance(_ a: [Character], _ b: [Character]) -> Int {
        if a.isEmpty { return b.count }; if b.isEmpty { return a.count }
        var prev = Array(0...b.count), cur = [Int](repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            cur[0] = i
            for j in 1...b.count { cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)) }
            swap(&prev, &cur)
        }
        return prev[b.count]
    }
    let w = Array(word)
    let best = candidates.map { ($0, distance(w, Array($0))) }.min { $0.1 < $1.1 }
    guard let (name, d) = best, d <= max(2, word.count / 3), d < word.count else { return nil }
    return name
}
