// swift-tools-version:6.0
import PackageDescription

// The envelope hot path (codec, lanes, runner) reads class-backed storage per field; dynamic
// exclusivity checks there cost ~18% of CPU (perf, docs/decisions.md). Static checks remain.
let hotPath: [SwiftSetting] = [.unsafeFlags(["-enforce-exclusivity=unchecked"])]

// Layering (see docs/architecture.md): C shims are imported by exactly one wrapper module each;
// plugins import PipeKit plus capability modules, never a shim and never PipeRuntime.
let package = Package(
    name: "pipeline",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "pipehost", targets: ["pipehost"]),
        .executable(name: "pipectl", targets: ["pipectl"]),
        .executable(name: "bench", targets: ["bench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/jpsim/Yams", from: "6.2.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        // System-library shims (module maps only).
        .systemLibrary(name: "CZeroMQ", path: "Sources/CZeroMQ"),
        .systemLibrary(name: "CSodium", path: "Sources/CSodium"),
        .systemLibrary(name: "CMagic", path: "Sources/CMagic"),
        .systemLibrary(name: "CSQLite", path: "Sources/CSQLite"),
        .systemLibrary(name: "CCrypto", path: "Sources/CCrypto"),

        // The stage SDK.
        .target(name: "PipeKit", dependencies: [.product(name: "Logging", package: "swift-log")], swiftSettings: hotPath),
        .target(name: "PipeKitTesting", dependencies: ["PipeKit"]),

        // Capability wrappers, one per C library.
        .target(name: "PipeZMQ", dependencies: ["CZeroMQ"]),
        .target(name: "PipeStore", dependencies: ["CSQLite", "PipeKit"]),
        .target(name: "PipeSeal", dependencies: ["CSodium", "PipeKit"]),
        .target(name: "PipeSniff", dependencies: ["CMagic", "PipeKit"]),
        .target(name: "PipeConfig", dependencies: ["PipeKit", "Yams"]),
        // The hash-chained audit log: SQLite through PipeStore, checkpoints through PipeSeal,
        // SHA-256 through libcrypto (the one module that imports CCrypto).
        .target(name: "PipeAudit", dependencies: ["CCrypto", "PipeKit", "PipeStore", "PipeSeal"]),

        // Stage plugins: PipeKit + capability modules only.
        .target(name: "CoreStages", dependencies: ["PipeKit"], path: "Plugins/Core", swiftSettings: hotPath),
        .target(name: "TwinStages", dependencies: ["PipeKit", "PipeSeal"], path: "Plugins/Twin"),
        .target(name: "IntakeStages", dependencies: ["PipeKit", "PipeSniff", "PipeSeal", "PipeZMQ"], path: "Plugins/Intake"),
        // The cap pipeline, one target per stage family.
        .target(name: "CausalStages", dependencies: ["PipeKit"], path: "Plugins/Causal"),
        .target(name: "MuxStages", dependencies: ["PipeKit"], path: "Plugins/Mux"),
        .target(name: "AlignerStages", dependencies: ["PipeKit"], path: "Plugins/Aligner"),
        .target(name: "SlotStages", dependencies: ["PipeKit"], path: "Plugins/Slots"),
        .target(name: "ExecutorStages", dependencies: ["PipeKit", "PipeSeal", "PipeZMQ"], path: "Plugins/Executor"),
        .target(name: "GatewayStages", dependencies: ["PipeKit", "PipeSeal", "ExecutorStages"], path: "Plugins/Gateway"),

        // The one stage registry.
        .target(name: "PipeRegistry", dependencies: ["PipeKit", "CoreStages", "TwinStages", "IntakeStages", "CausalStages", "MuxStages", "AlignerStages", "SlotStages", "ExecutorStages", "GatewayStages"]),

        .target(name: "PipeRuntime", dependencies: [
            "PipeKit", "PipeZMQ", "PipeConfig", "PipeStore", "PipeSeal", "PipeAudit", "PipeRegistry",
            .product(name: "Logging", package: "swift-log"),
        ], swiftSettings: hotPath),

        .executableTarget(name: "pipehost", dependencies: [
            "PipeRuntime", "PipeConfig", "PipeRegistry", "PipeSeal",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "pipectl", dependencies: [
            "PipeRuntime", "PipeConfig", "PipeRegistry", "PipeKit", "PipeKitTesting", "PipeZMQ", "PipeSeal", "PipeAudit", "PipeStore", "ExecutorStages", "GatewayStages",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .executableTarget(name: "bench", dependencies: ["PipeRuntime", "PipeZMQ", "PipeConfig", "PipeRegistry", "PipeKit", "PipeKitTesting", "PipeSeal", "PipeSniff", "PipeAudit", "PipeStore", "TwinStages", "IntakeStages", "CausalStages", "MuxStages", "AlignerStages", "SlotStages", "ExecutorStages", "GatewayStages"],
                          path: "Tools/bench"),

        .testTarget(name: "PipeTests", dependencies: [
            "PipeKit", "PipeKitTesting", "PipeZMQ", "PipeConfig", "PipeStore", "PipeSeal", "PipeSniff", "PipeAudit",
            "PipeRuntime", "PipeRegistry", "CoreStages", "TwinStages", "IntakeStages", "CausalStages", "MuxStages", "AlignerStages", "SlotStages", "ExecutorStages", "GatewayStages",
            .product(name: "Yams", package: "Yams"),
        ], exclude: ["Fixtures"]),
    ],
    swiftLanguageModes: [.v6]
)
