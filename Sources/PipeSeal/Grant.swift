import PipeKit

/// An authority grant (docs/operations.md, "Grants"): an owner's Ed25519 signature saying that
/// the worker with a given CURVE public key may run exactly the listed stages, under a name,
/// until a time, at an epoch. A revocation is a grant of a higher epoch with no stages.
///
/// The signature covers these UTF-8 lines, each ending in `\n`, in this order:
/// `pipehost-grant-v1`, `worker=<Z85 key>`, `name=<name>`, `stages=<ids, sorted, comma-separated>`,
/// `expires=<Unix seconds>`, `epoch=<integer>`, `owner=<hex Ed25519 public key>`.
/// The file is JSON: those fields (`stages` a list, plus `expires_at` in RFC 3339 for people)
/// and `signature` in hex.
public struct Grant: Sendable, Equatable {
    public var worker: String
    public var name: String
    public var stages: [String]
    public var expires: Int64
    public var epoch: UInt64
    public var owner: [UInt8]
    public var signature: [UInt8]

    public var isRevocation: Bool { stages.isEmpty }

    public var signedBytes: [UInt8] {
        Array(("pipehost-grant-v1\nworker=\(worker)\nname=\(name)\nstages=\(stages.sorted().joined(separator: ","))\n"
               + "expires=\(expires)\nepoch=\(epoch)\nowner=\(Hex.encode(owner))\n").utf8)
    }

    /// A new grant signed by `owner`.
    public static func issue(owner: SigningKey, worker: String, name: String, stages: [String], expires: Int64, epoch: UInt64) -> Grant {
        var g = Grant(worker: worker, name: name, stages: stages.sorted(), expires: expires, epoch: epoch, owner: owner.publicKey, signature: [])
        g.signature = owner.sign(g.signedBytes)
        return g
    }

    public var json: ConfigValue {
        .object([("v", .int(1)), ("worker", .string(worker)), ("name", .string(name)), ("stages", .list(stages.map(ConfigValue.string))),
                 ("expires", .int(expires)), ("expires_at", .string(RFC3339.format(ns: expires.multipliedReportingOverflow(by: 1_000_000_000).overflow ? Int64.max : expires * 1_000_000_000))),
                 ("epoch", .int(Int64(clamping: epoch))), ("owner", .string(Hex.encode(owner))), ("signature", .string(Hex.encode(signature)))])
    }

    public var text: String { JSON.serialize(json) + "\n" }

    /// Parses a grant file's bytes (at most 64 KiB); the signature is checked by ``verify(owners:)``.
    public static func parse(_ bytes: [UInt8]) throws(SealError) -> Grant {
        guard bytes.count <= 65536 else { throw SealError(message: "grant: over 64 KiB") }
        let v: ConfigValue
        do { v = try JSON.parse(bytes: bytes) } catch { throw SealError(message: "grant: not JSON (\(error))") }
        guard v["v"]?.intValue == 1 else { throw SealError(message: "grant: unsupported version (this host reads v 1)") }
        guard let worker = v["worker"]?.stringValue, let name = v["name"]?.stringValue, let stages = v["stages"]?.listValue,
              let expires = v["expires"]?.intValue, let epoch = v["epoch"]?.intValue, epoch >= 0,
              let owner = v["owner"]?.stringValue.flatMap(Hex.decode), owner.count == 32,
              let sig = v["signature"]?.stringValue.flatMap(Hex.decode), sig.count == 64 else {
            throw SealError(message: "grant: missing or malformed field (worker, name, stages, expires, epoch, owner, signature)")
        }
        let ids = stages.compactMap(\.stringValue)
        guard ids.count == stages.count, ids.count <= 1024 else { throw SealError(message: "grant: stages must be a list of stage ids") }
        return Grant(worker: worker, name: name, stages: ids.sorted(), expires: expires, epoch: UInt64(epoch), owner: owner, signature: sig)
    }

    /// Whether an owner in `owners` (32-byte Ed25519 public keys) signed this grant.
    public func verify(owners: [[UInt8]]) -> Bool {
        owners.contains(owner) && SigningKey.verify(signature, message: signedBytes, publicKey: owner)
    }
}
