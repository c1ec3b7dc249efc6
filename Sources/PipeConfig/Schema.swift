import PipeKit

/// A JSON Schema (draft 2020-12) of the pipeline format, every stage's `config` included, from the
/// one registry that validation uses (`pipectl schema`). Editors use it for completion and checks;
/// `pipectl validate` stays the authority (cycles, references and positions are beyond a schema).
public enum PipelineSchema {
    static func obj(_ pairs: [(String, ConfigValue)]) -> ConfigValue { .object(pairs) }
    static let name: ConfigValue = obj([("type", .string("string")), ("pattern", .string("^[a-z0-9_-]+$"))])

    /// A configuration type as a schema fragment.
    public static func fragment(_ t: ConfigType) -> ConfigValue {
        switch t {
        case .bool: return obj([("type", .string("boolean"))])
        case .int(let lo, let hi):
            var p: [(String, ConfigValue)] = [("type", .string("integer"))]
            if let lo { p.append(("minimum", .int(lo))) }; if let hi { p.append(("maximum", .int(hi))) }
            return obj(p)
        case .double(let lo, let hi):
            var p: [(String, ConfigValue)] = [("type", .string("number"))]
            if let lo { p.append(("minimum", .double(lo))) }; if let hi { p.append(("maximum", .double(hi))) }
            return obj(p)
        case .string: return obj([("type", .string("string"))])
        case .enumeration(let c): return obj([("enum", .list(c.map(ConfigValue.string)))])
        case .list(let t): return obj([("type", .string("array")), ("items", fragment(t))])
        case .map(let t): return obj([("type", .string("object")), ("additionalProperties", fragment(t))])
        case .any: return obj([])
        }
    }

    static func config(_ d: StageDescriptor) -> ConfigValue {
        var props: [(String, ConfigValue)] = []
        for f in d.fields {
            var p: [(String, ConfigValue)] = []
            if case .map(let entries) = fragment(f.type) { p = entries.map { ($0.key, $0.value) } }
            p.append(("description", .string(f.doc)))
            if let dv = f.defaultValue { p.append(("default", dv)) }
            props.append((f.name, obj(p)))
        }
        let required = d.fields.filter(\.required).map { ConfigValue.string($0.name) }
        var o: [(String, ConfigValue)] = [("type", .string("object")), ("description", .string(d.summary)),
                                          ("properties", obj(props)), ("additionalProperties", .bool(false))]
        if !required.isEmpty { o.append(("required", .list(required))) }
        return obj(o)
    }

    static let lane: ConfigValue = obj([
        ("type", .string("object")), ("additionalProperties", .bool(false)),
        ("properties", obj([
            ("bound", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(1_000_000)), ("description", .string("Most envelopes in flight on the lane (credits)."))])),
            ("when_full", obj([("enum", .list(WhenFull.allCases.map { .string($0.rawValue) })), ("description", .string("What a full lane does to its producer."))])),
            ("bytes", obj([("type", .string("integer")), ("minimum", .int(1024)), ("description", .string("Most bytes of encoded envelopes in flight."))])),
            ("low", obj([("type", .string("integer")), ("minimum", .int(0)), ("description", .string("Depth at which the lane enters pressure-rising (default 50% of bound)."))])),
            ("high", obj([("type", .string("integer")), ("minimum", .int(1)), ("description", .string("Depth at which the lane is overloaded (default 80% of bound)."))])),
            ("release", obj([("type", .string("integer")), ("minimum", .int(0)), ("description", .string("Depth below which an overloaded lane starts recovering (default midway)."))])),
        ])),
    ])

    public static func json(registry: StageRegistry) -> ConfigValue {
        let placement: ConfigValue = obj([("oneOf", .list([
            obj([("enum", .list([.string("in-process"), .string("process")]))]),
            obj([("type", .string("object")), ("required", .list([.string("worker")])), ("additionalProperties", .bool(false)),
                 ("properties", obj([("worker", name)]))]),
        ]))])
        let input: ConfigValue = obj([("oneOf", .list([
            obj([("type", .string("string")), ("description", .string("`stage` (its default output) or `stage.output`"))]),
            obj([("type", .string("object")), ("required", .list([.string("from")])), ("additionalProperties", .bool(false)),
                 ("properties", obj([("from", obj([("type", .string("string"))])), ("port", name),
                                     ("loop_back", obj([("type", .string("object")), ("required", .list([.string("max_hops")])),
                                                        ("properties", obj([("max_hops", obj([("type", .string("integer")), ("minimum", .int(1))]))]))]))]))]),
        ]))])
        let inputsSchema: ConfigValue = obj([("oneOf", .list([
            obj([("type", .string("array")), ("items", obj([("$ref", .string("#/$defs/input"))]))]),
            obj([("type", .string("object")), ("description", .string("port -> list of inputs")),
                 ("additionalProperties", obj([("oneOf", .list([
                     obj([("type", .string("array")), ("items", obj([("$ref", .string("#/$defs/input"))]))]),
                     obj([("$ref", .string("#/$defs/input"))]),
                 ]))]))]),
            obj([("type", .string("string"))]),
        ]))])
        let kinds = registry.descriptors.map(\.kind)
        var conditions: [ConfigValue] = []
        var defs: [(String, ConfigValue)] = [("placement", placement), ("lane", lane), ("input", input)]
        for d in registry.descriptors {
            defs.append(("config-\(d.kind)", config(d)))
            conditions.append(obj([
                ("if", obj([("properties", obj([("kind", obj([("const", .string(d.kind))]))])), ("required", .list([.string("kind")]))])),
                ("then", obj([("properties", obj([("config", obj([("$ref", .string("#/$defs/config-\(d.kind)"))]))]))])),
            ]))
        }
        let stage: ConfigValue = obj([
            ("type", .string("object")), ("required", .list([.string("id"), .string("kind")])), ("additionalProperties", .bool(false)),
            ("properties", obj([
                ("id", name), ("kind", obj([("enum", .list(kinds.map(ConfigValue.string)))])),
                ("config", obj([("type", .string("object"))])), ("inputs", inputsSchema),
                ("placement", obj([("$ref", .string("#/$defs/placement"))])),
                ("replicas", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(64))])),
            ])),
            ("allOf", .list(conditions)),
        ])
        defs.append(("stage", stage))
        var override: [(String, ConfigValue)] = [("from", obj([("type", .string("string"))])), ("to", obj([("type", .string("string"))]))]
        if case .map(let props)? = lane["properties"] { override += props.map { ($0.key, $0.value) } }
        return obj([
            ("$schema", .string("https://json-schema.org/draft/2020-12/schema")),
            ("title", .string("pipeline")),
            ("description", .string("A pipehost pipeline file (docs/pipeline-reference.md).")),
            ("type", .string("object")), ("required", .list([.string("stages")])), ("additionalProperties", .bool(false)),
            ("properties", obj([
                ("pipeline", name), ("name", name), ("version", obj([("const", .int(1))])),
                ("audit", obj([("oneOf", .list([
                    obj([("enum", .list([.string("decisions"), .string("all")]))]),
                    obj([("type", .string("object")), ("additionalProperties", .bool(false)), ("properties", obj([
                        ("level", obj([("enum", .list([.string("decisions"), .string("all")]))])),
                        ("log", obj([("type", .string("string"))])), ("key", obj([("type", .string("string"))])),
                        ("checkpoint_every", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(100_000_000))])),
                        ("checkpoint_interval_s", obj([("type", .string("number")), ("exclusiveMinimum", .int(0)), ("maximum", .int(86_400))])),
                    ]))]),
                ]))])),
                ("delivery", obj([("oneOf", .list([
                    obj([("enum", .list(DeliverySpec.Mode.allCases.map { .string($0.rawValue) }))]),
                    obj([("type", .string("object")), ("additionalProperties", .bool(false)), ("properties", obj([
                        ("mode", obj([("enum", .list(DeliverySpec.Mode.allCases.map { .string($0.rawValue) }))])),
                        ("ack_timeout_ms", obj([("type", .string("integer")), ("minimum", .int(10)), ("maximum", .int(86_400_000))])),
                        ("max_pending", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(10_000_000))])),
                        ("max_attempts", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(1_000_000))])),
                        ("dedup_window", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(100_000_000))])),
                    ]))]),
                ])), ("description", .string("at-least-once: end-to-end acknowledgements, redelivery, sink deduplication (docs/delivery.md)"))])),
                ("dead_letter", obj([("type", .string("object")), ("additionalProperties", .bool(false)),
                                     ("properties", obj([("path", obj([("type", .string("string"))]))]))])),
                ("limits", obj([("type", .string("object")), ("additionalProperties", .bool(false)), ("properties", obj([
                    ("max_envelope_bytes", obj([("type", .string("integer")), ("minimum", .int(1024)), ("maximum", .int(64 << 20))])),
                    ("max_batch_envelopes", obj([("type", .string("integer")), ("minimum", .int(1)), ("maximum", .int(65536))])),
                ]))])),
                ("defaults", obj([("type", .string("object")), ("additionalProperties", .bool(false)), ("properties", obj([
                    ("placement", obj([("$ref", .string("#/$defs/placement"))])), ("lane", obj([("$ref", .string("#/$defs/lane"))])),
                ]))])),
                ("metrics", obj([("type", .string("object")), ("additionalProperties", .bool(false)), ("required", .list([.string("listen")])),
                                 ("properties", obj([("listen", obj([("type", .string("string")), ("pattern", .string("^.+:[0-9]{1,5}$")),
                                                                     ("description", .string("HOST:PORT of the Prometheus endpoint"))]))]))])),
                ("remote", obj([("type", .string("object")), ("additionalProperties", .bool(false)), ("required", .list([.string("listen")])),
                                ("description", .string("Remote workers: where they connect, how they are authenticated (docs/operations.md, Remote workers)")),
                                ("properties", obj([
                    ("listen", obj([("type", .string("string")), ("pattern", .string("^tcp://.+:[0-9]{1,5}$"))])),
                    ("advertise", obj([("type", .string("string"))])),
                    ("key", obj([("type", .string("string")), ("description", .string("the host's curve.key"))])),
                    ("insecure", obj([("type", .string("boolean"))])),
                    ("worker_wait_s", obj([("type", .string("number")), ("exclusiveMinimum", .int(0)), ("maximum", .int(86_400))])),
                    ("down_after_ms", obj([("type", .string("integer")), ("minimum", .int(200)), ("maximum", .int(600_000))])),
                    ("owners", obj([("type", .string("array")), ("items", obj([("type", .string("string"))])),
                                    ("description", .string("owner keys whose grants admit workers"))])),
                    ("grant_epochs", obj([("type", .string("string"))])),
                    ("control", obj([("type", .string("string")), ("pattern", .string("^tcp://.+:[0-9]{1,5}$"))])),
                    ("operators", obj([("type", .string("object")), ("additionalProperties", obj([("type", .string("string"))]))])),
                    ("workers", obj([("type", .string("object")), ("additionalProperties", obj([("oneOf", .list([
                        obj([("type", .string("string"))]),
                        obj([("type", .string("object")), ("additionalProperties", .bool(false)),
                             ("properties", obj([("key", obj([("type", .string("string")),
                                                             ("description", .string("Z85 CURVE public key, or the path of the worker's curve.pub"))]))]))]),
                    ]))]))])),
                ]))])),
                ("stages", obj([("type", .string("array")), ("items", obj([("$ref", .string("#/$defs/stage"))]))])),
                ("lanes", obj([("type", .string("array")), ("items", obj([("type", .string("object")), ("additionalProperties", .bool(false)),
                                                                          ("required", .list([.string("from"), .string("to")])),
                                                                          ("properties", obj(override))]))])),
            ])),
            ("$defs", obj(defs)),
        ])
    }
}
