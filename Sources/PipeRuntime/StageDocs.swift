import Foundation
import PipeKit

/// Renders stage descriptors from the registry (for `pipectl stages` and docs/pipeline-reference.md).
public enum StageDocs {
    static func valueText(_ v: ConfigValue?) -> String { v.map { JSON.serialize($0) } ?? "-" }

    public static func json(_ d: StageDescriptor) -> ConfigValue {
        let outputs = d.allOutputs(ConfigReader(nil, fields: d.fields))
        return .object([
            ("kind", .string(d.kind)), ("summary", .string(d.summary)), ("role", .string(d.role.rawValue)),
            ("inputs", .list(d.inputs.map { .object([("name", .string($0.name)), ("doc", .string($0.doc)), ("accepts_loop_back", .bool($0.acceptsLoopBack))]) })),
            ("outputs", .list(outputs.map(ConfigValue.string))), ("outputs_doc", .string(d.outputsDoc)),
            ("config", .list(d.fields.map { f in
                .object([("name", .string(f.name)), ("type", .string(f.type.description)), ("required", .bool(f.required)),
                         ("default", f.defaultValue ?? .null), ("doc", .string(f.doc))])
            })),
        ])
    }

    public static func text(_ d: StageDescriptor) -> String {
        let outputs = d.allOutputs(ConfigReader(nil, fields: d.fields))
        var s = "\(d.kind) (\(d.role.rawValue)): \(d.summary)\n"
        s += "  inputs:  " + (d.inputs.isEmpty ? "(none)" : d.inputs.map { $0.name + ($0.acceptsLoopBack ? " [loop-back ok]" : "") }.joined(separator: ", ")) + "\n"
        let shown = outputs.filter { $0 != deadLetterOutput }.joined(separator: ", ")
        s += "  outputs: " + outputs.joined(separator: ", ") + (d.role != .sink && d.outputsDoc != shown ? "  (\(d.outputsDoc))" : "") + "\n"
        if d.fields.isEmpty { s += "  config:  (none)\n" } else {
            s += "  config:\n"
            for f in d.fields {
                s += "    \(f.name): \(f.type)" + (f.required ? ", required" : f.defaultValue != nil ? ", default \(valueText(f.defaultValue))" : ", optional") + "\n"
                s += "      \(f.doc)\n"
            }
        }
        return s
    }

    /// docs/pipeline-reference.md's stage section, generated from the registry.
    public static func markdown(_ registry: StageRegistry) -> String {
        var s = ""
        for d in registry.descriptors {
            let outputs = d.allOutputs(ConfigReader(nil, fields: d.fields))
            s += "### `\(d.kind)` (\(d.role.rawValue))\n\n\(d.summary)\n\n"
            s += "- inputs: " + (d.inputs.isEmpty ? "none" : d.inputs.map { "`\($0.name)` (\($0.doc)\($0.acceptsLoopBack ? "; accepts a loop-back" : ""))" }.joined(separator: ", ")) + "\n"
            s += "- outputs: " + outputs.map { "`\($0)`" }.joined(separator: ", ") + "\n\n"
            if !d.fields.isEmpty {
                s += "| field | type | default | doc |\n|---|---|---|---|\n"
                for f in d.fields {
                    s += "| `\(f.name)` | \(f.type.description.replacingOccurrences(of: "|", with: "\\|")) | \(f.required ? "required" : f.defaultValue.map { "`\(JSON.serialize($0))`" } ?? "optional") | \(f.doc) |\n"
                }
                s += "\n"
            }
        }
        return s
    }
}
