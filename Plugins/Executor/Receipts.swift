import PipeKit
import PipeSeal

/// Batch-signed receipts (docs/cap-pipeline.md, "Receipts"). A receipt's leaf is
/// `sha256(0x00 || canonical JSON of the receipt object)` (keys sorted, no white space, values
/// strings, integers, booleans or null); inner nodes are `sha256(0x01 || left || right)`; an odd
/// node at the end of a level is carried up unchanged. The executor signs
/// `"pipeline-receipt-batch/1" 0x00 || u32 count || root` once per batch, and every receipt carries its
/// index, the batch size, the sibling path, the root, the signature and the key id, so any one
/// receipt verifies on its own.
public enum Receipts {
    public static let domain = Array("pipeline-receipt-batch/1\0".utf8)
    /// The largest batch an executor makes (its `batch_size` maximum).
    public static let maxBatch = 65536

    /// What the batch signature covers: domain, `u32` batch size (LE), root. Signing the size
    /// fixes how many receipts the root stands for.
    public static func signedMessage(count: Int, root: [UInt8]) -> [UInt8] {
        let c = UInt32(clamping: count)
        return domain + [UInt8(c & 0xFF), UInt8(c >> 8 & 0xFF), UInt8(c >> 16 & 0xFF), UInt8(c >> 24)] + root
    }

    public static func canonical(_ receipt: ConfigValue) -> [UInt8] { Array(JSON.serialize(receipt, sortKeys: true).utf8) }

    public static func leaf(_ receipt: ConfigValue) -> [UInt8] { leaf(canonical: canonical(receipt)) }
    public static func leaf(canonical: [UInt8]) -> [UInt8] { Digest.sha256(tag: 0, canonical) }

    static func node(_ l: [UInt8], _ r: [UInt8]) -> [UInt8] { Digest.sha256(tag: 1, l, r) }

    /// The root and, for each leaf, its sibling path (bottom up).
    public static func tree(_ leaves: [[UInt8]]) -> (root: [UInt8], paths: [[[UInt8]]]) {
        guard !leaves.isEmpty else { return ([], []) }
        var paths = [[[UInt8]]](repeating: [], count: leaves.count)
        // positions[i]: leaf i's index in the current level.
        var positions = Array(0..<leaves.count)
        var level = leaves
        while level.count > 1 {
            var next: [[UInt8]] = []
            next.reserveCapacity((level.count + 1) / 2)
            var i = 0
            while i < level.count {
                if i + 1 < level.count { next.append(node(level[i], level[i + 1])) } else { next.append(level[i]) }
                i += 2
            }
            for leafIndex in 0..<leaves.count {
                let p = positions[leafIndex]
                let sibling = p ^ 1
                if sibling < level.count { paths[leafIndex].append(level[sibling]) }
                positions[leafIndex] = p / 2
            }
            level = next
        }
        return (level[0], paths)
    }

    /// The root a leaf at `index` of a batch of `count` reaches through `path`, or nil when the
    /// path has the wrong length for that position.
    public static func root(leaf: [UInt8], index: Int, count: Int, path: [[UInt8]]) -> [UInt8]? {
        guard count >= 1, count <= maxBatch, index >= 0, index < count, path.count <= 64 else { return nil }
        var h = leaf, p = index, n = count, k = 0
        while n > 1 {
            let sibling = p ^ 1
            if sibling < n {
                guard k < path.count, path[k].count == 32 else { return nil }
                h = p & 1 == 1 ? node(path[k], h) : node(h, path[k])
                k += 1
            }
            p /= 2; n = n - n / 2
        }
        return k == path.count ? h : nil
    }

    /// Checks one receipt payload (`{"receipt": {...}, "proof": {...}}`) against `publicKey`:
    /// nil when it verifies, else why not.
    public static func verify(_ payload: ConfigValue, publicKey: [UInt8]) -> String? {
        guard let receipt = payload["receipt"], case .map = receipt else { return "no `receipt` object" }
        guard let proof = payload["proof"] else { return "unsigned receipt (no `proof`)" }
        guard let rootHex = proof["batch_root"]?.stringValue, let root = Hex.decode(rootHex), root.count == 32,
              let index = proof["index"]?.intValue, let count = proof["count"]?.intValue,
              let pathList = proof["path"]?.listValue, let sigHex = proof["batch_sig"]?.stringValue, let sig = Hex.decode(sigHex) else {
            return "malformed `proof` (needs batch_root, index, count, path, batch_sig)"
        }
        var path: [[UInt8]] = []
        for p in pathList {
            guard let h = p.stringValue.flatMap(Hex.decode), h.count == 32 else { return "malformed proof path entry" }
            path.append(h)
        }
        if let kid = proof["key_id"]?.stringValue, kid != Hex.encode(Array(publicKey.prefix(8))) {
            return "signed by key id \(kid), not \(Hex.encode(Array(publicKey.prefix(8))))"
        }
        guard let reached = Receipts.root(leaf: leaf(receipt), index: Int(index), count: Int(count), path: path) else {
            return "proof path does not fit index \(index) of \(count)"
        }
        guard reached == root else { return "the receipt does not hash to its batch root (altered)" }
        guard SigningKey.verify(sig, message: signedMessage(count: Int(count), root: root), publicKey: publicKey) else { return "batch signature does not verify" }
        return nil
    }
}
