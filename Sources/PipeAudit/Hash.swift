import CCrypto

/// SHA-256 through OpenSSL's libcrypto, whose x86-64 code uses the CPU's SHA extensions when the
/// CPU has them (`bench --audit` prints the rate next to PipeKit's portable SHA256).
public enum ChainHash {
    public static let genesis = [UInt8](repeating: 0, count: 32)

    /// `sha256(canonical || prev)` into `out` (32 bytes).
    @inline(__always)
    public static func link(_ canonical: UnsafeRawBufferPointer, prev: UnsafeRawBufferPointer, into out: UnsafeMutableRawPointer) {
        var ctx = SHA256_CTX()
        SHA256_Init(&ctx)
        SHA256_Update(&ctx, canonical.baseAddress, canonical.count)
        SHA256_Update(&ctx, prev.baseAddress, prev.count)
        SHA256_Final(out.assumingMemoryBound(to: UInt8.self), &ctx)
    }

    public static func link(_ canonical: [UInt8], prev: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        canonical.withUnsafeBytes { c in prev.withUnsafeBytes { p in out.withUnsafeMutableBytes { o in if let ob = o.baseAddress { link(c, prev: p, into: ob) } } } }
        return out
    }

    /// The plain digest of `data`.
    public static func digest(_ data: UnsafeRawBufferPointer) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        out.withUnsafeMutableBytes { o in
            guard let ob = o.baseAddress else { return }
            _ = SHA256(data.baseAddress?.assumingMemoryBound(to: UInt8.self), data.count, ob.assumingMemoryBound(to: UInt8.self))
        }
        return out
    }
}
