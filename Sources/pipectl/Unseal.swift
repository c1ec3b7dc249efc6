import ArgumentParser
import Foundation
import PipeKit
import PipeSeal

struct Unseal: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify a sealed container (docs/sealed-container.md) and unpack it.",
        discussion: """
            Every signature (manifest and each block) is checked before anything is written. With --pub the signer must be \
            one of the given keys; without it, signatures are checked against the key the manifest names (integrity, not trust). \
            Exit 0: valid (and unpacked with -o); 1: invalid; 64: usage.
            """)
    @Argument(help: "The container file.") var file: String
    @Flag(help: "Check the container and print its manifest.") var verify = false
    @Option(name: .shortAndLong, help: "Unpack into this directory (created; existing files are never overwritten).") var output: String?
    @Option(name: .customLong("pub"), help: "A trusted signer: 64 hex digits or a .pub file (repeatable).") var pubs: [String] = []
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        if !verify && output == nil { throw ValidationError("nothing to do: pass --verify, -o DIR, or both") }
    }

    func run() throws {
        guard let data = FileManager.default.contents(atPath: file) else { fail("pipectl unseal: cannot read \(file)") }
        var keys: [[UInt8]] = []
        for p in pubs {
            do { keys.append(try KeyFiles.loadPublicKey(p)) } catch { fail("pipectl unseal: --pub \(p): \(error)", code: 64) }
        }
        let opened: SealedContainer.Opened
        do { opened = try SealedContainer.open([UInt8](data), trusted: keys) } catch {
            if json { printJSON(ConfigValue.object([("file", .string(file)), ("valid", .bool(false)), ("reason", .string(error.message))])) }
            else { print("\(file): INVALID: \(error.message)") }
            throw ExitCode(1)
        }
        let m = opened.manifest
        var written: [String] = []
        if let dir = output {
            do { written = try SealedContainer.unpack(opened, into: dir) } catch { fail("pipectl unseal: \(error)") }
        }
        if json {
            printJSON(ConfigValue.object([
                ("file", .string(file)), ("valid", .bool(true)), ("signer", .string(Hex.encode(m.signer))),
                ("signer_trusted", .bool(!keys.isEmpty)), ("surface", .string(m.surfaceName)), ("profile", .string(m.profile)),
                ("created_ns", .int(Int64(clamping: m.createdNs))), ("blocks", .int(Int64(m.blockCount))),
                ("entries", .list(m.entries.map { ConfigValue.object([("path", .string($0.path)), ("size", .int(Int64($0.size)))]) })),
                ("written", .list(written.map { .string($0) })),
            ]))
            return
        }
        let trust = keys.isEmpty ? "signer \(m.signerID) (not checked against a trusted key; pass --pub)" : "signed by trusted key \(m.signerID)"
        print("\(file): valid, \(trust)")
        print("  surface: \(m.surfaceName) (profile \(m.profile)), \(m.blockCount) block(s)")
        for e in m.entries { print("  \(e.path)  \(e.size) bytes") }
        for w in written { print("  wrote \(w)") }
    }
}
