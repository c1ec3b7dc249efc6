import PipeConfig
import PipeKit

/// The host's plan for one run: every stage instance, every lane with its id, transport and
/// bound, and the endpoints each stage binds. Built from a validated spec.
///
/// ```
///  generator ──lane 1──> passthrough ──lane 2──> file-sink
///      │ dead_letter          │ dead_letter          │ dead_letter
///      └──────lane 3──────────┴──────lane 4──────────┴──lane 5──> _dead_letters (file-sink)
/// ```
public struct PipelinePlan: Sendable {
    public struct PlannedStage: Sendable {
        public var id: String
        public var kind: String
        public var role: StageRole
        public var config: ConfigValue?
        public var placement: Placement
        public var ports: [String]
        public var outputs: [String]
        public var usesStore: Bool
        /// Whether this stage is the implicit dead-letter sink.
        public var implicit: Bool
        /// The stage id in the file (instances of `replicas: N` are `<spec>.0` ... `<spec>.N-1`).
        public var spec: String
    }
    public struct PlannedLane: Sendable {
        public var id: UInt32
        public var from: String
        public var output: String
        public var to: String
        public var port: String
        public var portIndex: Int
        public var laneIndex: Int
        public var loopBack: Bool
        public var maxHops: Int?
        public var settings: LaneSettings
        public var transport: String
        /// Lanes of one output with the same group share its envelopes round-robin (the replicas
        /// of one consuming stage); different groups each get every envelope (fan-out).
        public var group: Int
        public var fromRef: String { "\(from).\(output)" }
        public var toRef: String { "\(to).\(port)" }
    }

    public static let deadLetterStage = "_dead_letters"

    public var spec: PipelineSpec
    public var stages: [PlannedStage]
    public var lanes: [PlannedLane]
    /// Strongly connected component id of each stage (stages on a loop share one).
    public var component: [String: Int]

    public func stage(_ id: String) -> PlannedStage? { stages.first { $0.id == id } }

    /// Builds the plan, or explains why this spec cannot run yet.
    public static func make(spec: PipelineSpec, edges: [Edge], registry: StageRegistry) throws(RuntimeError) -> PipelinePlan {
        var stages: [PlannedStage] = []
        var instances: [String: [String]] = [:]
        for s in spec.stages {
            guard let d = registry[s.kind] else { throw .plan("unknown stage kind '\(s.kind)'") }
            let placement = s.placement ?? spec.defaultPlacement
            if case .worker(let name) = placement, spec.remote?.workers.contains(where: { $0.name == name }) != true {
                throw .plan("stage '\(s.id)': placement on worker '\(name)', which the `remote:` section does not list")
            }
            let reader = ConfigReader(s.config, fields: d.fields)
            let ids = s.replicas > 1 ? (0..<s.replicas).map { "\(s.id).\($0)" } : [s.id]
            instances[s.id] = ids
            for id in ids {
                stages.append(PlannedStage(id: id, kind: s.kind, role: d.role, config: s.config, placement: placement,
                                           ports: d.inputs.map(\.name), outputs: d.allOutputs(reader), usesStore: d.usesStore, implicit: false,
                                           spec: s.id))
            }
        }
        // Expand every edge between stages into lanes between their instances.
        var allEdges: [(edge: Edge, from: String, to: String)] = []
        for e in edges {
            for f in instances[e.from] ?? [e.from] { for t in instances[e.to] ?? [e.to] { allEdges.append((e, f, t)) } }
        }
        // Every dead_letter output nobody reads goes to the implicit dead-letter sink.
        let consumedDL = Set(edges.filter { $0.output == deadLetterOutput }.map(\.from))
        let needsDL = stages.filter { !consumedDL.contains($0.spec) }.map(\.id)
        if !needsDL.isEmpty {
            stages.append(PlannedStage(id: deadLetterStage, kind: "file-sink", role: .sink,
                                       config: .object([("path", .string(spec.deadLetterPath)), ("append", .bool(true))]),
                                       placement: .inProcess, ports: ["in"], outputs: [deadLetterOutput], usesStore: false, implicit: true,
                                       spec: deadLetterStage))
            for id in needsDL {
                let e = Edge(from: id, output: deadLetterOutput, to: deadLetterStage, port: "in", loopBack: false, maxHops: nil, pos: .start)
                allEdges.append((e, id, deadLetterStage))
            }
        }
        let placementOf = Dictionary(uniqueKeysWithValues: stages.map { ($0.id, $0.placement) })
        var lanes: [PlannedLane] = []
        var perPort: [String: Int] = [:]
        var groups: [String: Int] = [:]  // "<producer instance>.<output>|<consumer spec>.<port>" -> group
        var nextGroup: [String: Int] = [:]
        for (i, x) in allEdges.enumerated() {
            let e = x.edge
            guard let target = stages.first(where: { $0.id == x.to }) else { continue }
            let settings = PipelineValidator.settings(for: e, in: spec)
            let same = placementOf[x.from] == .inProcess && placementOf[x.to] == .inProcess
            let remoteFrom = placementOf[x.from]?.isRemote == true, remoteTo = placementOf[x.to]?.isRemote == true
            let key = "\(x.to).\(e.port)"
            let li = perPort[key, default: 0]
            perPort[key] = li + 1
            let out = "\(x.from).\(e.output)"
            let gkey = "\(out)|\(e.to).\(e.port)"
            let group: Int
            if let g = groups[gkey] { group = g } else { group = nextGroup[out, default: 0]; nextGroup[out] = group + 1; groups[gkey] = group }
            lanes.append(PlannedLane(id: UInt32(i + 1), from: x.from, output: e.output, to: x.to, port: e.port,
                                     portIndex: target.ports.firstIndex(of: e.port) ?? 0, laneIndex: li, loopBack: e.loopBack,
                                     maxHops: e.maxHops, settings: settings,
                                     transport: remoteFrom || remoteTo ? "tcp" : same ? "inproc" : "ipc", group: group))
        }
        let component = Self.components(stages.map(\.id), lanes)
        // A loop closes when every lane inside it balances (sent == received); a frame lost with a
        // dropped tcp connection would keep it open forever.
        if let l = lanes.first(where: { $0.transport == "tcp" && component[$0.from] == component[$0.to] }) {
            throw .plan("the lane \(l.fromRef) -> \(l.toRef) is inside a loop and crosses to a remote worker; loops must run on this host for now (a frame lost on a dropped connection would keep the loop from closing)")
        }
        return PipelinePlan(spec: spec, stages: stages, lanes: lanes, component: component)
    }

    /// Tarjan's SCC, iterative.
    static func components(_ ids: [String], _ lanes: [PlannedLane]) -> [String: Int] {
        var adj: [String: [String]] = [:]
        for l in lanes { adj[l.from, default: []].append(l.to) }
        var index: [String: Int] = [:], low: [String: Int] = [:], onStack = Set<String>(), stack: [String] = []
        var comp: [String: Int] = [:]
        var next = 0, compID = 0
        for root in ids where index[root] == nil {
            var work: [(String, Int)] = [(root, 0)]
            while let (v, i) = work.last {
                if i == 0 { index[v] = next; low[v] = next; next += 1; stack.append(v); onStack.insert(v) }
                let succ = adj[v] ?? []
                if i < succ.count {
                    work[work.count - 1].1 += 1
                    let w = succ[i]
                    if index[w] == nil { work.append((w, 0)) }
                    else if onStack.contains(w) { low[v] = min(low[v] ?? 0, index[w] ?? 0) }
                } else {
                    work.removeLast()
                    if let (parent, _) = work.last { low[parent] = min(low[parent] ?? 0, low[v] ?? 0) }
                    if low[v] == index[v] {
                        while let w = stack.popLast() { onStack.remove(w); comp[w] = compID; if w == v { break } }
                        compID += 1
                    }
                }
            }
        }
        return comp
    }
}

/// Errors of the runtime, each a one-line message that says what to do.
public enum RuntimeError: Error, Sendable, CustomStringConvertible {
    case plan(String)
    case io(String)
    case protocolError(String)
    public var description: String {
        switch self {
        case .plan(let m): return m
        case .io(let m): return m
        case .protocolError(let m): return "protocol error: \(m)"
        }
    }
}
