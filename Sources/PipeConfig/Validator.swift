import PipeKit

/// One resolved lane of the graph: a stage output to a stage input port.
public struct Edge: Sendable, Hashable {
    public var from: String
    public var output: String
    public var to: String
    public var port: String
    public var loopBack: Bool
    public var maxHops: Int?
    public var pos: SourcePos
    public var fromRef: String { "\(from).\(output)" }
    public var toRef: String { "\(to).\(port)" }
    public init(from: String, output: String, to: String, port: String, loopBack: Bool, maxHops: Int?, pos: SourcePos) {
        self.from = from; self.output = output; self.to = to; self.port = port; self.loopBack = loopBack; self.maxHops = maxHops; self.pos = pos
    }
}

/// Checks references, kinds, configs and cycles of a parsed spec; fills in default ports and
/// outputs. Reports every problem, each with the position of the offending text.
public struct PipelineValidator {
    public private(set) var spec: PipelineSpec
    public private(set) var diags: [Diagnostic] = []
    let registry: StageRegistry

    public init(spec: PipelineSpec, registry: StageRegistry) { self.spec = spec; self.registry = registry }

    mutating func error(_ p: SourcePos, _ m: String) { diags.append(Diagnostic(file: spec.file, pos: p, message: m)) }

    public mutating func validate() {
        var seen: [String: SourcePos] = [:]
        var outputsOf: [String: [String]] = [:]
        for s in spec.stages where !s.id.isEmpty {
            if let first = seen[s.id] {
                error(s.pos, "duplicate stage id '\(s.id)' (first defined at line \(first.line))")
            } else { seen[s.id] = s.pos }
            guard !s.kind.isEmpty else { continue }
            guard let d = registry[s.kind] else {
                var m = "unknown stage kind '\(s.kind)'"
                if let sug = didYouMean(s.kind, among: registry.kinds) { m += " (did you mean '\(sug)'?)" }
                m += "; `pipectl stages` lists the kinds"
                error(s.kindPos, m)
                continue
            }
            if s.replicas > 1 && d.role != .transform {
                error(s.pos, "stage '\(s.id)': replicas > 1 is for transform stages; a \(d.role.rawValue) instance would duplicate or interleave its output")
            }
            let issues = validateConfig(s.config, fields: d.fields)
            for i in issues { error(i.key.flatMap { s.configKeyPos[$0] } ?? s.configPos, "stage '\(s.id)': \(i.message)") }
            let reader = ConfigReader(s.config, fields: d.fields)
            if issues.isEmpty {
                for i in d.check(reader) { error(i.key.flatMap { s.configKeyPos[$0] } ?? s.configPos, "stage '\(s.id)': \(i.message)") }
                // A journal is only emptied by acknowledgements: without them it would grow forever.
                if reader.bool("durable") == true && spec.delivery.mode != .atLeastOnce {
                    error(s.configKeyPos["durable"] ?? s.configPos,
                          "stage '\(s.id)': `durable: true` needs `delivery: at-least-once` (without acknowledgements nothing would ever leave the journal; docs/delivery.md)")
                }
            }
            if outputsOf[s.id] == nil { outputsOf[s.id] = d.allOutputs(reader) }
            if d.remoteOnly && !(s.placement ?? spec.defaultPlacement).isRemote {
                error(s.pos, "stage '\(s.id)' (\(s.kind)) runs only on a remote worker that implements it: give it placement: { worker: NAME }")
            }
            if case .worker(let name) = s.placement ?? spec.defaultPlacement {
                if let r = spec.remote {
                    if !r.workers.contains(where: { $0.name == name }) {
                        var m = "stage '\(s.id)': placement on worker '\(name)', which remote.workers does not list"
                        if let sug = didYouMean(name, among: r.workers.map(\.name)) { m += " (did you mean '\(sug)'?)" }
                        error(s.pos, m)
                    }
                } else {
                    error(s.pos, "stage '\(s.id)': placement { worker: \(name) } needs a `remote:` section (listen, key, workers)")
                }
            }
        }
        // Inputs.
        for si in spec.stages.indices {
            let s = spec.stages[si]
            guard let d = registry[s.kind] else {
                // Unknown kind (reported above): its ports are unknown, but the stages it names are not.
                for r in s.inputs where seen[r.stage] == nil {
                    var m = "stage '\(s.id)' references unknown stage '\(r.stage)'"
                    if let sug = didYouMean(r.stage, among: Array(seen.keys)) { m += " (did you mean '\(sug)'?)" }
                    error(r.pos, m)
                }
                continue
            }
            if d.role == .source && !s.inputs.isEmpty {
                error(s.inputs[0].pos, "stage '\(s.id)' is a source (\(s.kind)) and takes no inputs")
                continue
            }
            if d.role != .source && s.inputs.isEmpty {
                error(s.pos, "stage '\(s.id)' (\(s.kind)) has no inputs; give it `inputs: [stage]`")
            }
            for ri in s.inputs.indices {
                var r = s.inputs[ri]
                if r.port.isEmpty { r.port = d.inputs.first?.name ?? "in" }
                guard let port = d.inputs.first(where: { $0.name == r.port }) else {
                    error(r.pos, "stage '\(s.id)' (\(s.kind)) has no input port '\(r.port)'; its ports: \(d.inputs.map(\.name).joined(separator: ", "))")
                    continue
                }
                if r.loopBack && !port.acceptsLoopBack { error(r.pos, "input port '\(s.id).\(r.port)' does not accept a loop-back edge") }
                guard let outs = outputsOf[r.stage] else {
                    if seen[r.stage] == nil {
                        var m = "stage '\(s.id)' references unknown stage '\(r.stage)'"
                        if let sug = didYouMean(r.stage, among: Array(seen.keys)) { m += " (did you mean '\(sug)'?)" }
                        error(r.pos, m)
                    }
                    continue
                }
                let real = outs.filter { $0 != deadLetterOutput }
                if let o = r.output {
                    if !outs.contains(o) {
                        var m = "stage '\(r.stage)' has no output '\(o)'"
                        m += real.isEmpty ? " (it is a sink; only `dead_letter`)" : "; its outputs: \((outs).joined(separator: ", "))"
                        if let sug = didYouMean(o, among: outs) { m += " (did you mean '\(sug)'?)" }
                        error(r.pos, m)
                    }
                } else if let first = real.first {
                    r.output = first
                } else {
                    error(r.pos, "stage '\(r.stage)' is a sink and has no outputs to read from (only `\(r.stage).dead_letter`)")
                }
                spec.stages[si].inputs[ri] = r
            }
        }
        checkCycles()
        checkLaneOverrides()
    }

    /// The resolved lanes (only meaningful when there are no diagnostics).
    public var edges: [Edge] {
        spec.stages.flatMap { s in
            s.inputs.compactMap { r in
                guard let o = r.output else { return nil }
                return Edge(from: r.stage, output: o, to: s.id, port: r.port, loopBack: r.loopBack, maxHops: r.maxHops, pos: r.pos)
            }
        }
    }

    /// A cycle is legal only when one of its edges is a declared loop-back with a hop limit.
    mutating func checkCycles() {
        let ids = spec.stages.map(\.id)
        var adj: [String: [(String, SourcePos)]] = [:]
        for e in edges where !e.loopBack { adj[e.from, default: []].append((e.to, e.pos)) }
        var color: [String: Int] = [:]  // 0 white, 1 grey, 2 black
        var reported = Set<String>()
        // Iterative DFS (no recursion: graphs of any size cost constant stack).
        for start in ids where color[start, default: 0] == 0 {
            var stack: [(node: String, next: Int)] = [(start, 0)]
            var path: [String] = [start]
            color[start] = 1
            while !stack.isEmpty {
                let (node, i) = stack[stack.count - 1]
                let succ = adj[node] ?? []
                if i < succ.count {
                    stack[stack.count - 1].next += 1
                    let (to, p) = succ[i]
                    switch color[to, default: 0] {
                    case 0: color[to] = 1; stack.append((to, 0)); path.append(to)
                    case 1:
                        if let at = path.firstIndex(of: to) {
                            let cyc = Array(path[at...]) + [to]
                            let key = Set(cyc).sorted().joined(separator: ",")
                            if reported.insert(key).inserted {
                                error(p, "cycle \(cyc.joined(separator: " -> ")) has no loop-back edge; declare one of its inputs as { from: ..., loop_back: { max_hops: N } }")
                            }
                        }
                    default: break
                    }
                } else {
                    color[node] = 2; stack.removeLast(); path.removeLast()
                }
            }
        }
    }

    mutating func checkLaneOverrides() {
        let all = edges
        for o in spec.lanes {
            let matches = all.filter { Self.matches(o, $0) }
            if matches.isEmpty {
                var m = "lane override from '\(o.from)' to '\(o.to)' matches no lane"
                let ids = spec.stages.map(\.id)
                let fromStage = String(o.from.split(separator: ".").first ?? ""), toStage = String(o.to.split(separator: ".").first ?? "")
                if !ids.contains(fromStage), let sug = didYouMean(fromStage, among: ids) { m += " (no stage '\(fromStage)'; did you mean '\(sug)'?)" }
                else if !ids.contains(toStage), let sug = didYouMean(toStage, among: ids) { m += " (no stage '\(toStage)'; did you mean '\(sug)'?)" }
                else if ids.contains(toStage) {
                    let into = all.filter { $0.to == toStage }.map(\.fromRef)
                    m += into.isEmpty ? " ('\(toStage)' reads no lane)" : " (lanes into '\(toStage)' come from \(into.joined(separator: ", ")))"
                }
                error(o.pos, m)
                // Its own settings can still be wrong: say so now, not after the lane is fixed.
                if let p = spec.defaultLane.applying(o.patch).problem { error(o.pos, "lane override from '\(o.from)' to '\(o.to)': \(p)") }
            }
            for e in matches {
                if let p = Self.settings(for: e, in: spec).problem { error(o.pos, "lane \(e.fromRef) -> \(e.toRef): \(p)") ; break }
            }
        }
    }

    /// The settings of the lane along `e`: the defaults, then every matching override in order.
    public static func settings(for e: Edge, in spec: PipelineSpec) -> LaneSettings {
        var s = spec.defaultLane
        for o in spec.lanes where matches(o, e) { s = s.applying(o.patch) }
        return s
    }

    /// Whether a `lanes:` override applies to an edge (`from`: stage or stage.output; `to`: stage or stage.port).
    public static func matches(_ o: LaneOverride, _ e: Edge) -> Bool {
        (o.from == e.from || o.from == e.fromRef) && (o.to == e.to || o.to == e.toRef)
    }
}
