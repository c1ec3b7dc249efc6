import Testing
import PipeKit

@Suite("Wire format")
struct WireFormatTests {
    // The vectors below are the ones printed in docs/wire-format.md; a change to either breaks this test.
    static let envelopeHex =
        "01" + "01" +                                   // version 1, flags: parent
        "00112233445566778899aabbccddeeff" +            // id
        "0102030405060708090a0b0c0d0e0f10" +            // parent
        "0500000000000000" + "01000000" + "01000000" +  // rank 5, hops 1, attempt 1
        "8877665544332211" +                            // ingest_ns
        "02006169" + "0300782e79" + "0000" + "01006c" + // actor "ai", intent "x.y", authority "", lane "l"
        "0100" + "01006b" + "02" + "ffffffffffffffff" + // 1 attr: "k" int -1
        "02000000" + "6869"                             // payload "hi"

    @Test func envelope_encodesToTheDocumentedBytes() {
        #expect(Hex.encode(EnvelopeCodec.encode(vectorEnvelope())) == Self.envelopeHex)
    }

    @Test func envelope_decodesTheDocumentedBytes() throws {
        let bytes = try #require(Hex.decode(Self.envelopeHex))
        #expect(try EnvelopeCodec.decode(bytes) == vectorEnvelope())
    }

    @Test func dataFrame_hasTheDocumentedHeaderAndLayout() throws {
        var b = DataFrameBuilder(lane: 7, seq: 2, sentNs: 0x1122334455667788)
        b.append(vectorEnvelope())
        let frame = b.finish()
        let expected = "504c" + "01" + "01" + "07000000" + "0200000000000000" + "8877665544332211" + "01000000" +
            String(format: "%02x000000", Self.envelopeHex.count / 2) + Self.envelopeHex
        #expect(Hex.encode(frame) == expected)
        var got: [Envelope] = []
        let header = try withFrame(frame) { f in
            try f.forEachEnvelope(limits: .standard) { r, _ in if case .success(let e) = r { got.append(e) } }
            return f.header
        }
        #expect(header == FrameHeader(type: .data, lane: 7, seq: 2))
        #expect(got == [vectorEnvelope()])
        #expect(try withFrame(frame) { $0.dataSentNs } == 0x1122334455667788)
        #expect(try withFrame(frame) { $0.dataDeclaredCount } == 1)
    }

    @Test func controlFrames_matchTheDocumentedVectors() throws {
        #expect(Hex.encode(FrameEncoder.endOfStream(lane: 3, seq: 9, total: 1000)) == "504c010203000000" + "0900000000000000" + "e803000000000000")
        #expect(Hex.encode(FrameEncoder.credit(lane: 3, seq: 1, epoch: 2, limit: 64)) == "504c010303000000" + "0100000000000000" + "02000000" + "4000000000000000")
        #expect(Hex.encode(FrameEncoder.heartbeat(lane: 0, seq: 1, timeNs: 1)) == "504c010500000000" + "0100000000000000" + "0100000000000000")
        #expect(Hex.encode(FrameEncoder.command(seq: 4, RunnerCommand(code: .stop))) == "504c010a00000000" + "0400000000000000" + "02" + "0000000000000000")
        let ack = FrameEncoder.ack(lane: 1, seq: 1, ids: [EnvelopeID(hi: 1, lo: 2)])
        #expect(Hex.encode(ack) == "504c010401000000" + "0100000000000000" + "01000000" + "00000000000000010000000000000002")
        let hello = Hello(pid: 0x10, worker: "w").encode(seq: 1)
        #expect(Hex.encode(hello) == "504c010800000000" + "0100000000000000" + "0200" + "10000000" + "010077" + "00000000")
    }

    @Test func controlFrames_roundTrip() throws {
        let c = try withFrame(FrameEncoder.credit(lane: 3, seq: 1, epoch: 9, limit: 77)) { try $0.credit() }
        #expect(c.epoch == 9 && c.limit == 77)
        #expect(try withFrame(Hello(pid: 42, worker: "pass", grant: [1, 2, 3]).encode(seq: 1)) { try Hello.decode($0) } == Hello(pid: 42, worker: "pass", grant: [1, 2, 3]))
        let stats = StatsReport(stage: "s", timeNs: 5, flags: [.idle, .finished], received: 1, emitted: 2, deadLettered: 3, errors: 4, held: 5,
                                lanes: [LaneEndStats(lane: 1, role: .consumer, count: 10, credits: 3, queued: 0, endOfStream: true, blockedNs: 7, epoch: 9, countInEpoch: 4)],
                                status: [("k", .string("v")), ("n", .double(1.5))])
        #expect(try withFrame(stats.encode(seq: 3)) { try StatsReport.decode($0) } == stats)
        #expect(try withFrame(FrameEncoder.ack(lane: 1, seq: 1, ids: [EnvelopeID(hi: 5, lo: 6)])) { try $0.ackIDs() } == [EnvelopeID(hi: 5, lo: 6)])
    }

    @Test func envelope_withEveryFieldRoundTrips() throws {
        var e = vectorEnvelope()
        e.clock = ["a": 1, "b": 2]
        e.attrs = ["s": .string("x"), "d": .double(0.25), "b": .bool(true), "i": .int(9)]
        e.sig = EnvelopeSignature(keyID: Array(repeating: 1, count: 8), signature: Array(repeating: 2, count: 64))
        e.payload = Array(repeating: 0xAB, count: 5000)
        #expect(try EnvelopeCodec.decode(EnvelopeCodec.encode(e)) == e)
    }

    @Test func decoder_refusesTruncationAtEveryLength() {
        let full = EnvelopeCodec.encode(vectorEnvelope())
        for n in 0..<full.count {
            #expect(throws: DecodeError.self) { try EnvelopeCodec.decode(Array(full.prefix(n))) }
        }
    }

    @Test func decoder_refusesOversizedEnvelopesAndLyingLengths() throws {
        var limits = WireLimits.standard
        limits.maxEnvelopeBytes = 64
        var e = vectorEnvelope(); e.payload = Array(repeating: 1, count: 100)
        #expect(throws: DecodeError.tooLarge(field: "envelope", size: EnvelopeCodec.encode(e).count, limit: 64)) {
            try EnvelopeCodec.decode(EnvelopeCodec.encode(e), limits: limits)
        }
        // A DATA frame whose count claims more envelopes than the body can hold.
        var w = ByteWriter()
        FrameHeader(type: .data, lane: 1, seq: 1).write(into: &w)
        w.u64(0); w.u32(1_000_000)
        #expect(throws: DecodeError.self) { try withFrame(w.buffer) { try $0.forEachEnvelope(limits: .standard) { _, _ in } } }
        // An envelope length larger than the rest of the frame.
        var w2 = ByteWriter()
        FrameHeader(type: .data, lane: 1, seq: 1).write(into: &w2)
        w2.u64(0); w2.u32(1); w2.u32(0xFFFF_FFF0)
        #expect(throws: DecodeError.self) { try withFrame(w2.buffer) { try $0.forEachEnvelope(limits: .standard) { _, _ in } } }
    }

    @Test func dataFrame_badEnvelopeIsReportedAndTheRestOfTheBatchSurvives() throws {
        var b = DataFrameBuilder(lane: 1, seq: 1)
        b.append(vectorEnvelope())
        b.append(encoded: [0x01, 0x80])  // version 1, unknown flag bit
        b.append(vectorEnvelope())
        let frame = b.finish()
        var ok = 0, bad: [DecodeError] = []
        try withFrame(frame) { f in
            try f.forEachEnvelope(limits: .standard) { r, _ in
                switch r { case .success: ok += 1; case .failure(let e): bad.append(e) }
            }
        }
        #expect(ok == 2)
        #expect(bad.count == 1)
    }

    @Test func header_rejectsBadMagicVersionAndType() {
        let good = FrameEncoder.heartbeat(lane: 0, seq: 1, timeNs: 1)
        var m = good; m[0] = 0x51
        #expect(headerError(m) == .badMagic)
        var v = good; v[2] = 9
        #expect(headerError(v) == .unsupportedVersion(9))
        var t = good; t[3] = 0x7F
        #expect(headerError(t) == .unknownFrameType(0x7F))
        #expect(headerError(Array(good.prefix(10))) == .truncated(field: "frame.header", need: 16, have: 10))
        #expect(headerError(good) == nil)
    }

    /// 200,000 random and mutated frames: decoding returns a value or a typed error, never traps.
    @Test func decoder_neverCrashesOnRandomOrMutatedFrames() throws {
        var rng = SystemRandomNumberGenerator()
        var b = DataFrameBuilder(lane: 1, seq: 1)
        var e = vectorEnvelope(); e.clock = ["a": 1]; e.attrs["s"] = .string("abc")
        e.sig = EnvelopeSignature(keyID: Array(repeating: 1, count: 8), signature: Array(repeating: 2, count: 64))
        b.append(e); b.append(vectorEnvelope())
        let seeds: [[UInt8]] = [b.finish(), FrameEncoder.credit(lane: 1, seq: 1, epoch: 1, limit: 2),
                                StatsReport(stage: "s", timeNs: 1, flags: [], received: 1, emitted: 1, deadLettered: 0, errors: 0, held: 0,
                                            lanes: [LaneEndStats(lane: 1, role: .producer, count: 1, credits: 1, queued: 0, endOfStream: false)],
                                            status: [("a", .int(1))]).encode(seq: 1),
                                Hello(pid: 1, worker: "w", grant: [1]).encode(seq: 1)]
        var decodedSomething = 0, errors = 0
        for i in 0..<200_000 {
            var f: [UInt8]
            if i % 4 == 0 {
                f = (0..<Int.random(in: 0..<96, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                if f.count >= 4 && i % 8 == 0 { f[0] = 0x50; f[1] = 0x4C; f[2] = 1; f[3] = UInt8.random(in: 1...10, using: &rng) }
            } else {
                f = seeds[i % seeds.count]
                for _ in 0..<Int.random(in: 1...4, using: &rng) {
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0 where !f.isEmpty: f[Int.random(in: 0..<f.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                    case 1 where f.count > 1: f.removeLast(Int.random(in: 1..<f.count, using: &rng))
                    default: f.append(UInt8.random(in: 0...255, using: &rng))
                    }
                }
            }
            do {
                try withFrame(f) { v in
                    switch v.header.type {
                    case .data: try v.forEachEnvelope(limits: .standard) { r, _ in if case .success = r { decodedSomething += 1 } else { errors += 1 } }
                    case .stats: _ = try StatsReport.decode(v); decodedSomething += 1
                    case .hello: _ = try Hello.decode(v); decodedSomething += 1
                    case .credit: _ = try v.credit(); decodedSomething += 1
                    case .ack: _ = try v.ackIDs(); decodedSomething += 1
                    case .command: _ = try v.command(); decodedSomething += 1
                    case .endOfStream: _ = try v.endOfStreamTotal(); decodedSomething += 1
                    case .heartbeat: _ = try v.heartbeatTime(); decodedSomething += 1
                    case .handoff: _ = try v.handoff(); decodedSomething += 1
                    case .assign, .audit: _ = try v.utf8Body(); decodedSomething += 1
                    }
                }
            } catch { errors += 1 }
        }
        #expect(decodedSomething > 0)
        #expect(errors > 100_000)
    }

    @Test func derivedIDs_areDeterministicAndDistinct() {
        let p = EnvelopeID(hi: 1, lo: 2)
        #expect(EnvelopeID.derived(from: p, output: "out", index: 0) == EnvelopeID.derived(from: p, output: "out", index: 0))
        #expect(EnvelopeID.derived(from: p, output: "out", index: 0) != EnvelopeID.derived(from: p, output: "out", index: 1))
        #expect(EnvelopeID.derived(from: p, output: "out", index: 0) != EnvelopeID.derived(from: p, output: "again", index: 0))
        // Documented vector (docs/wire-format.md).
        #expect(EnvelopeID.derived(from: p, output: "out", index: 0).description == Self.derivedVector)
    }
    static let derivedVector = "7e5a1c0293d94d0d8d51d927f64c6a2e"  // checked with Python hashlib

    @Test func sha256_matchesFIPSVectors() {
        #expect(Hex.encode(SHA256.hash([])) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        #expect(Hex.encode(SHA256.hash(Array("abc".utf8))) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        #expect(Hex.encode(SHA256.hash(Array("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq".utf8)))
                == "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1")
    }
}

@Suite("Envelope value semantics")
struct EnvelopeValueTests {
    @Test func decodedPayload_isCopyOnWriteAndEqualToItsArrayForm() throws {
        var e = vectorEnvelope(); e.payload = Array(repeating: 7, count: 300)
        let decoded = try EnvelopeCodec.decode(EnvelopeCodec.encode(e))
        #expect(decoded == e)
        #expect(decoded.payloadCount == 300)
        var copy = decoded
        copy.payload[0] = 9                      // mutating the copy leaves the original alone
        #expect(decoded.payload[0] == 7 && copy.payload[0] == 9)
        #expect(copy != decoded)
        var header = decoded
        header.rank = 99                          // a header change keeps the raw payload intact
        #expect(header.payload == decoded.payload && decoded.rank == 5)
        #expect(try EnvelopeCodec.decode(EnvelopeCodec.encode(header)).payload == e.payload)
        #expect(try EnvelopeCodec.decode(EnvelopeCodec.encode(header)).rank == 99)   // not the stale wire bytes
        // Unchanged since decoding: forwarded byte for byte.
        #expect(EnvelopeCodec.encode(decoded) == EnvelopeCodec.encode(e))
        var attrs = decoded; attrs.attrs["x"] = .bool(true)
        #expect(try EnvelopeCodec.decode(EnvelopeCodec.encode(attrs)).attrs["x"] == .bool(true))
        var hop = decoded; hop.hops += 1
        #expect(try EnvelopeCodec.decode(EnvelopeCodec.encode(hop)).hops == 2)
        #expect(try EnvelopeCodec.decode(EnvelopeCodec.encode(decoded.derived(output: "o", index: 0))).parent == e.id)
        let empty = try EnvelopeCodec.decode(EnvelopeCodec.encode(Envelope(id: EnvelopeID(hi: 1, lo: 1))))
        #expect(empty.payload.isEmpty && empty.payloadCount == 0)
    }
}
