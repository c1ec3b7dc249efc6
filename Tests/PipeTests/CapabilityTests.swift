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

    @Test func libmagic_classifiesContent() throws {
        let m = try MagicDetector()
        #expect(m.describe(Array("%PDF-1.4\n".utf8)) == "application/pdf")
        #expect(m.describe([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0] + Array(repeating: 0, count: 56))?.contains("elf") == true
                || m.describe([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1, 0] + Array(repeating: 0, count: 56))?.contains("octet") == true)
        #expect(m.describe(Array("plain words here\n".utf8)) == "text/plain")
    }
}
