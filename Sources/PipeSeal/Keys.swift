import CSodium
import Foundation
import PipeKit

/// A libsodium or key-file error.
public struct SealError: Error, Sendable, CustomStringConvertible {
    public let message: String
    public init(message: String) { self.message = message }
    public var description: String { message }
}

/// An Ed25519 signing key pair (libsodium). The key id is the first 8 bytes of the public key.
public struct SigningKey: Sendable {
    public let publicKey: [UInt8]   // 32 bytes
    let secretKey: [UInt8]          // 64 bytes

    static func ensureSodium() throws(SealError) {
        if sodium_init() < 0 { throw SealError(message: "libsodium failed to initialise") }
    }

    public static func generate() throws(SealError) -> SigningKey {
        try ensureSodium()
        var pk = [UInt8](repeating: 0, count: Int(crypto_sign_PUBLICKEYBYTES))
        var sk = [UInt8](repeating: 0, count: Int(crypto_sign_SECRETKEYBYTES))
        guard crypto_sign_keypair(&pk, &sk) == 0 else { throw SealError(message: "crypto_sign_keypair failed") }
        return SigningKey(publicKey: pk, secretKey: sk)
    }

    public init(secretKey: [UInt8]) throws(SealError) {
        guard secretKey.count == Int(crypto_sign_SECRETKEYBYTES) else { throw SealError(message: "an Ed25519 secret key is 64 bytes, got \(secretKey.count)") }
        try Self.ensureSodium()
        var pk = [UInt8](repeating: 0, count: 32)
        crypto_sign_ed25519_sk_to_pk(&pk, secretKey)
        self.publicKey = pk; self.secretKey = secretKey
    }
    init(publicKey: [UInt8], secretKey: [UInt8]) { self.publicKey = publicKey; self.secretKey = secretKey }

    public var keyID: [UInt8] { Array(publicKey.prefix(8)) }

    public func sign(_ message: [UInt8]) -> [UInt8] {
        var sig = [UInt8](repeating: 0, count: Int(crypto_sign_BYTES))
        var len: UInt64 = 0
        crypto_sign_detached(&sig, &len, message, UInt64(message.count), secretKey)
        return sig
    }

    public static func verify(_ signature: [UInt8], message: [UInt8], publicKey: [UInt8]) -> Bool {
        guard signature.count == 64, publicKey.count == 32, sodium_init() >= 0 else { return false }
        return crypto_sign_verify_detached(signature, message, UInt64(message.count), publicKey) == 0
    }
}

/// Key files: one line of lower-case hex (or Z85 for CURVE), written with mode 0600.
public enum KeyFiles {
    /// Writes `text` + newline to `path` with mode 0600, refusing to follow a symlink.
    public static func writeSecret(_ text: String, to path: String) throws(SealError) {
        unlink(path)
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SealError(message: "cannot create \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        fchmod(fd, 0o600)
        let bytes = Array((text + "\n").utf8)
        let n = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard n == bytes.count else { throw SealError(message: "cannot write \(path): \(String(cString: strerror(errno)))") }
    }

    public static func read(_ path: String) throws(SealError) -> String {
        guard let f = fopen(path, "r") else { throw SealError(message: "cannot read \(path): \(String(cString: strerror(errno)))") }
        defer { fclose(f) }
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = fread(&buf, 1, buf.count, f)
        return String(decoding: buf.prefix(n), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// Loads an Ed25519 secret key file written by `pipehost keygen`.
    public static func loadSigningKey(_ path: String) throws(SealError) -> SigningKey {
        let text = try read(path)
        guard let sk = Hex.decode(text) else { throw SealError(message: "\(path): not a hex Ed25519 secret key") }
        return try SigningKey(secretKey: sk)
    }

    /// Loads the signing key at `path`; when it does not exist and `create` is set, generates one
    /// (mode 0600, its directory created 0700) with the public key beside it (`x.key` -> `x.pub`).
    /// Returns whether it was created.
    public static func loadOrCreateSigningKey(_ path: String, create: Bool) throws(SealError) -> (key: SigningKey, created: Bool) {
        if create && access(path, F_OK) != 0 {
            let dir = (path as NSString).deletingLastPathComponent
            if !dir.isEmpty {
                do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) }
                catch { throw SealError(message: "cannot create \(dir): \(error.localizedDescription)") }
            }
            let k = try SigningKey.generate()
            try writeSecret(hex(of: k), to: path)
            try writeSecret(Hex.encode(k.publicKey), to: path.hasSuffix(".key") ? String(path.dropLast(4)) + ".pub" : path + ".pub")
            return (k, true)
        }
        return (try loadSigningKey(path), false)
    }

    /// The secret key as hex (the file format).
    public static func hex(of key: SigningKey) -> String { Hex.encode(key.secretKey) }
}

/// SHA-256 through libsodium (for receipts' Merkle trees and other small digests).
public enum Digest {
    public static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        _ = sodium_init()
        crypto_hash_sha256(&out, bytes, UInt64(bytes.count))
        return out
    }

    /// `sha256(tag || a || b)` without concatenating.
    public static func sha256(tag: UInt8, _ a: [UInt8], _ b: [UInt8] = []) -> [UInt8] {
        var st = crypto_hash_sha256_state()
        crypto_hash_sha256_init(&st)
        var t = tag
        crypto_hash_sha256_update(&st, &t, 1)
        crypto_hash_sha256_update(&st, a, UInt64(a.count))
        if !b.isEmpty { crypto_hash_sha256_update(&st, b, UInt64(b.count)) }
        var out = [UInt8](repeating: 0, count: 32)
        crypto_hash_sha256_final(&st, &out)
        return out
    }
}
