import Testing
import Foundation
import PipeKit
import PipeSeal
import PipeSniff
import PipeStore

@Suite("Store, seal and sniff")
struct CapabilityTests {
    @Test func keyValueStore_survivesReopen() throws {
        let dir = Paths.tempDir("kv")
        let path = dir + "/kv.sqlite"
        do {
            let kv = try SQLiteKeyValueStore(path: path)
            try kv.put("slot:a", [1, 2, 3])
            try kv.put("slot:b", [4])
            try kv.put("other", [5])
            try kv.put("slot:a", [9])
            try kv.delete("slot:b")
        }
        let kv = try SQLiteKeyValueStore(path: path)
        #expect(try kv.get("slot:a") == [9])
        #expect(try kv.get("slot:b") == nil)
        #expect(try kv.keys(prefix: "slot:") == ["slot:a"])
    }

    @Test func ed25519_signsAndVerifies() throws {
        let k = try SigningKey.generate()
        let msg = Array("receipt".utf8)
        let sig = k.sign(msg)
        #expect(SigningKey.verify(sig, message: msg, publicKey: k.publicKey))
        #expect(!SigningKey.verify(sig, message: Array("receipT".utf8), publicKey: k.publicKey))
        let reloaded = try SigningKey(secretKey: Hex.decode(KeyFiles.hex(of: k)) ?? [])
        #expect(reloaded.publicKey == k.publicKey)
    }

    /// The vector of docs/wire-format.md ("Envelope signature"), produced with Python's `cryptography`.
    @Test func envelopeSignature_matchesDocumentedVector() throws {
        let key = try SigningKey(seed: Array(0..<32))
        #expect(Hex.encode(key.publicKey) == "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
        var e = Envelope(id: try #require(EnvelopeID(hex: "00112233445566778899aabbccddeeff")),
                         parent: EnvelopeID(hex: "0102030405060708090a0b0c0d0e0f10"),
                         actor: "crane-01", intent: "twin.state", payload: Array(#"{"a":1}"#.utf8))
        #expect(Hex.encode(e.signingBytes) == "706970652e7369672e763100112233445566778899aabbccddeeff010102030405060708090a0b0c0d0e0f10080000006372616e652d30310a0000007477696e2e737461746500000000070000007b2261223a317d")
        key.sign(&e)
        #expect(Hex.encode(try #require(e.sig).signature) == "4ad60d2c38259246857d787317a1f3fe431baf9d752de8a1b4892669d01c261c1393d359cf9cf33416fe22212d8638935d0fe26ab69d3365900863e0db4ecf04")
        #expect(e.verifySignature(publicKey: key.publicKey) == .valid)
        // Uncovered fields may change on the way; covered ones may not.
        var routed = e; routed.lane = "fast"; routed.hops = 3; routed.attrs["x"] = .int(1)
        #expect(routed.verifySignature(publicKey: key.publicKey) == .valid)
        var tampered = e; tampered.payload = Array(#"{"a":2}"#.utf8)
        #expect(tampered.verifySignature(publicKey: key.publicKey) == .invalid)
        let other = try SigningKey.generate()
        #expect(e.verifySignature(publicKey: other.publicKey) == .wrongKey(keyID: "03a107bff3ce10be"))
        var unsigned = e; unsigned.sig = nil
        #expect(unsigned.verifySignature(publicKey: key.publicKey) == .unsigned)
    }

    @Test func libmagic_classifiesContent() throws {
        let m = try MagicDetector()
        #expect(m.describe(Array("%PDF-1.4\n".utf8)) == "application/pdf")
        #expect(m.describe([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0] + Array(repeating: 0, count: 56))?.contains("elf") == true
                || m.describe([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0] + Array(repeating: 0, count: 56))?.contains("octet") == true)
        #expect(m.describe(Array("plain words here\n".utf8)) == "text/plain")
    }
}
