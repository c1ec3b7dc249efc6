import PipeKit

/// `external`: a stage written in another language, run by a worker that speaks the wire
/// protocol (docs/wire-format.md) and connects in as a remote worker. The host plans its lanes
/// from this descriptor (its outputs come from `outputs`); the worker receives the whole config
/// in its ASSIGN and runs `program`. `Tools/ref_worker.py` is the reference (Python, pyzmq).
public final class ExternalStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "external",
        summary: "A stage in another language, run by a worker that speaks the wire protocol (placement { worker: NAME } only; Tools/ref_worker.py).",
        role: .transform,
        inputs: [InputPort("in", doc: "envelopes for the external program")],
        outputs: { $0.strings("outputs") ?? ["out"] }, outputsDoc: "the names in `outputs` (default out)",
        fields: [
            ConfigField("program", .string, doc: "What the external worker runs (the reference worker knows `upper` and `tag`)."),
            ConfigField("outputs", .list(.string), default: .list([.string("out")]), doc: "The stage's output names."),
            ConfigField("settings", .map(.string), optional: true, doc: "Strings passed to the program as they are."),
        ],
        remoteOnly: true,
        check: { r in
            var issues: [ConfigIssue] = []
            let outs = r.strings("outputs") ?? []
            if outs.isEmpty { issues.append(ConfigIssue(key: "outputs", message: "outputs must name at least one output")) }
            for o in outs where o.isEmpty || o == deadLetterOutput || !o.utf8.allSatisfy({ (97...122).contains($0) || (48...57).contains($0) || $0 == 95 || $0 == 45 }) {
                issues.append(ConfigIssue(key: "outputs", message: "output '\(o)' must match [a-z0-9_-]+ and not be dead_letter"))
            }
            if Set(outs).count != outs.count { issues.append(ConfigIssue(key: "outputs", message: "outputs are listed twice")) }
            return issues
        },
        make: { r in ExternalStage(program: r.string("program") ?? "") })

    let program: String
    init(program: String) { self.program = program }
    public func start(context: any StageContext) throws {
        throw StageError.halt("an external stage (program '\(program)') runs on a worker that implements it, placed with { worker: NAME }; this runner has no code for it")
    }
    public func process(_ envelope: consuming Envelope, from arrival: Arrival, context: any StageContext) throws {}
}
