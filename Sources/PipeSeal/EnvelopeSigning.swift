import CSodium
import PipeKit

extension SigningKey {
    /// A key pair from a 32-byte seed (deterministic; for tests and reproducible fixtures).
    public init(seed: [UInt8]) throws(SealError) {
        guard seed.count == Int(crypto_sign_SEEDBYTES) else { throw SealError(message: "an Ed25519 seed is 32 bytes, got \(seed.count)") }
        try Self.ensureSodium()
        var pk = [UInt8](repeating: 0, count: Int(crypto_sign_PUBLICKEYBYTES))
        var sk = [UInt8](repeating: 0, count: Int(crypto_sign_SECRETKEYBYTES))
        guard crypto_sign_seed_keypair(&pk, &sk, seed) == 0 else { throw SealError(message: "crypto_sign_seed_keypair failed") }
        self.init(publicKey: pk, secretKey: sk)
    }

    /// Signs the envelope's covered fields (``Envelope/signingBytes``) and sets `sig`.
    public func sign(_ envelope: inout Envelope) {
        envelope.sig = EnvelopeSignature(keyID: keyID, signature: sign(envelope.signingBytes))
    }
}

/// Why an envelope's signature does not verify against a key.
public enum SignatureCheck: Sendable, Equatable, CustomStringConvertible {
    case valid
    case unsigned
    /// Signed by another key (the key id names it).
    case wrongKey(keyID: String)
    /// The key id matches but the signature does not verify: the covered fields were changed.
    case invalid

    public var description: String {
        switch self {
        case .valid: return "valid"
        case .unsigned: return "unsigned"
        case .wrongKey(let k): return "signed by key \(k), not the configured key"
        case .invalid: return "signature does not verify"
        }
    }
}

extension Envelope {
    /// Checks `sig` against an Ed25519 public key (32 bytes).
    public func verifySignature(publicKey: [UInt8]) -> SignatureCheck {
        guard let s = sig else { return .unsigned }
        guard publicKey.count == 32, s.keyID == Array(publicKey.prefix(8)) else { return .wrongKey(keyID: Hex.encode(s.keyID)) }
        return SigningKey.verify(s.signature, message: signingBytes, publicKey: publicKey) ? .valid : .invalid
    }
}
