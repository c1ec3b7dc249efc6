/// The one list of stage kinds: the single source for `pipectl stages`, validation, the JSON
/// Schema and the docs. What is listed is what can run.
public struct StageRegistry: Sendable {
    public let descriptors: [StageDescriptor]
    private let byKind: [String: Int]

    public init(_ descriptors: [StageDescriptor]) {
        self.descriptors = descriptors.sorted { $0.kind < $1.kind }
        var m: [String: Int] = [:]
        for (i, d) in self.descriptors.enumerated() { m[d.kind] = i }
        byKind = m
    }

    public subscript(kind: String) -> StageDescriptor? { byKind[kind].map { descriptors[$0] } }
    public var kinds: [String] { descriptors.map(\.kind) }
}
