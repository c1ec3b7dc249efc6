/// An industry profile: how far a physical state and its twin may drift apart, and whether a
/// check that cannot be evaluated blocks (safety-critical) or is recorded as a warning.
public struct TwinProfile: Sendable, Hashable {
    public let name: String
    public let sector: String
    public let maxDriftMs: Int64
    public let safetyCritical: Bool
    public let examples: String

    /// The profiles of CONCEPTS.md ("The twin comparator"), from the sketch's table.
    public static let all: [TwinProfile] = [
        TwinProfile(name: "port", sector: "maritime", maxDriftMs: 200, safetyCritical: true, examples: "container cranes, AGVs"),
        TwinProfile(name: "manufacturing", sector: "factory", maxDriftMs: 100, safetyCritical: true, examples: "CNC, robot arms"),
        TwinProfile(name: "energy", sector: "power grid", maxDriftMs: 500, safetyCritical: true, examples: "wind turbines, substations"),
        TwinProfile(name: "steel", sector: "heavy industry", maxDriftMs: 300, safetyCritical: true, examples: "blast furnaces, hot strip mills"),
        TwinProfile(name: "semiconductor", sector: "chip fab", maxDriftMs: 50, safetyCritical: true, examples: "EUV, etch tools"),
        TwinProfile(name: "building", sector: "smart building", maxDriftMs: 5000, safetyCritical: false, examples: "HVAC, fire detection"),
    ]
    public static let names = all.map(\.name)
    public static func named(_ name: String) -> TwinProfile? { all.first { $0.name == name } }
}
