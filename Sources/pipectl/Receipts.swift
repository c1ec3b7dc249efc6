import ArgumentParser
import ExecutorStages
import GatewayStages
import Foundation
import PipeKit
import PipeSeal

struct ReceiptsCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receipts",
        abstract: "Check executor receipts (docs/cap-pipeline.md, \"Receipts\").",
        subcommands: [ReceiptsVerify.self])
}

struct ReceiptsVerify: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Verify every receipt in a JSONL file against the executor's public key.",
        discussion: """
            Each line is a receipt envelope as a file-sink writes it (the receipt in its `payload`) or a receipt payload \
            itself ({"receipt": ..., "proof": ...}). A receipt verifies alone: its canonical JSON hashes, through its proof \
            path, to the batch root, and the batch signature verifies. Exit 0: all valid; 1: any invalid or unsigned; 64: usage.
            """)
    @Argument(help: "The receipts file (JSONL).") var file: String
    @Option(name: .customLong("pub"), help: "The executor's public key: 64 hex digits or a .pub file.") var pub: String
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        let key: [UInt8]
        do { key = try KeyFiles.loadPublicKey(pub) } catch { fail("pipectl receipts verify: --pub \(pub): \(error)", code: 64) }
        guard let data = FileManager.default.contents(atPath: file) else { fail("pipectl receipts verify: cannot read \(file)") }
        var results: [(line: Int, cap: String, problem: String?)] = []
        for (i, raw) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty { continue }
            guard let v = try? JSON.parse(line) else { results.append((i + 1, "", "not JSON")); continue }
            let payload = v["payload"] ?? v
            let cap = payload["receipt"]?["cap"]?.stringValue ?? ""
            results.append((i + 1, cap, Receipts.verify(payload, publicKey: key)))
        }
        let bad = results.filter { $0.problem != nil }
        if json {
            printJSON(.object([
                ("file", .string(file)), ("receipts", .int(Int64(results.count))), ("invalid", .int(Int64(bad.count))),
                ("problems", .list(bad.map { .object([("line", .int(Int64($0.line))), ("cap", .string($0.cap)), ("reason", .string($0.problem ?? ""))]) })),
            ]))
        } else {
            for b in bad { print("\(file):\(b.line): INVALID receipt\(b.cap.isEmpty ? "" : " for cap \(b.cap)"): \(b.problem ?? "")") }
            print("\(results.count - bad.count) of \(results.count) receipt(s) valid" + (bad.isEmpty ? "" : "; \(bad.count) invalid"))
        }
        if bad.count > 0 || results.isEmpty { throw ExitCode(1) }
    }
}

struct EventsCmd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "events",
        abstract: "Check gateway-event.v1 files (docs/cap-pipeline.md, \"gateway-event.v1\").",
        subcommands: [EventsValidate.self])
}

struct EventsValidate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "validate",
        abstract: "Check every record of a gateway-event.v1 JSONL file against the contract.",
        discussion: "Names each bad record by line and each bad field: a missing or unknown key, an empty required field, a wrong type, a value outside its set. Exit 0: all valid; 1: any invalid; 64: usage.")
    @Argument(help: "The JSONL file.") var file: String
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        guard let data = FileManager.default.contents(atPath: file) else { fail("pipectl events validate: cannot read \(file)") }
        var total = 0
        var bad: [(line: Int, problems: [String])] = []
        for (i, raw) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            if raw.trimmingCharacters(in: .whitespaces).isEmpty { continue }
            total += 1
            guard let v = try? JSON.parse(String(raw)) else { bad.append((i + 1, ["not JSON"])); continue }
            let p = GatewayEvent.validate(v)
            if !p.isEmpty { bad.append((i + 1, p)) }
        }
        if json {
            printJSON(.object([("file", .string(file)), ("records", .int(Int64(total))), ("invalid", .int(Int64(bad.count))),
                               ("problems", .list(bad.map { b in .object([("line", .int(Int64(b.line))), ("fields", .list(b.problems.map { .string($0) }))]) }))]))
        } else {
            for b in bad { for p in b.problems { print("\(file):\(b.line): \(p)") } }
            print("\(total - bad.count) of \(total) record(s) valid" + (bad.isEmpty ? "" : "; \(bad.count) invalid"))
        }
        if !bad.isEmpty || total == 0 { throw ExitCode(1) }
    }
}
