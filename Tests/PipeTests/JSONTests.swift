import Testing
import PipeKit

@Suite("JSON and JSONL")
struct JSONTests {
    @Test func parse_handlesEscapesNumbersAndNesting() throws {
        let v = try JSON.parse(#"{"a":[1,-2,3.5,true,false,null],"s":"x\"\\\n\u00e9\ud83d\ude00","o":{}}"#)
        #expect(v["a"] == .list([.int(1), .int(-2), .double(3.5), .bool(true), .bool(false), .null]))
        #expect(v["s"] == .string("x\"\\\n\u{e9}\u{1F600}"))
        #expect(v["o"] == .map([]))
    }

    @Test func parse_rejectsBadInputWithAnOffset() {
        for bad in ["", "{", "[1,]", "{\"a\" 1}", "tru", "\"\\ud800\"", "1 2", "{\"a\":\"\u{01}\"}", String(repeating: "[", count: 100)] {
            #expect(throws: JSON.ParseError.self, "\(bad)") { try JSON.parse(bad) }
        }
    }

    @Test func serialize_roundTrips() throws {
        let v = ConfigValue.object([("b", .list([.int(1), .string("q\"\n")])), ("a", .double(0.5)), ("n", .null)])
        #expect(try JSON.parse(JSON.serialize(v)) == v)
    }

    @Test func jsonl_roundTripsEveryHeaderField() throws {
        var e = vectorEnvelope()
        e.clock = ["a": 3]
        e.attrs = ["s": .string("x"), "d": .double(1.25), "b": .bool(false), "i": .int(7)]
        e.sig = EnvelopeSignature(keyID: Array(repeating: 9, count: 8), signature: Array(repeating: 8, count: 64))
        e.payload = Array(#"{"k":[1,2]}"#.utf8)
        let line = String(decoding: EnvelopeJSONL.encode(e), as: UTF8.self)
        #expect(line.contains(#""payload":{"k":[1,2]}"#))
        #expect(try EnvelopeJSONL.decode(line) == e)
    }

    @Test func jsonl_binaryPayloadUsesBase64() throws {
        var e = vectorEnvelope(); e.payload = [0, 1, 2, 255]
        let line = String(decoding: EnvelopeJSONL.encode(e), as: UTF8.self)
        #expect(line.contains(#""payload_b64":"AAEC/w==""#))
        #expect(try EnvelopeJSONL.decode(line).payload == [0, 1, 2, 255])
    }

    @Test func jsonl_namesTheBadField() {
        #expect(throws: EnvelopeJSONL.FormatError.self) { try EnvelopeJSONL.decode(#"{"id":"zz"}"#) }
        do { _ = try EnvelopeJSONL.decode(#"{"rank":-1}"#); Issue.record("accepted a negative rank") }
        catch { #expect(error.message.contains("rank")) }
        do { _ = try EnvelopeJSONL.decode(#"{"colour":1}"#); Issue.record("accepted an unknown field") }
        catch { #expect(error.message == "unknown field 'colour'") }
        do { _ = try EnvelopeJSONL.decode(#"{"payload":1,"payload_b64":"AA=="}"#); Issue.record("accepted two payloads") }
        catch { #expect(error.message.contains("both")) }
    }
    @Test func auditRecord_directWriter_matchesTheTreeSerializer() {
        let records = [
            AuditRecord(decision: "block", envelope: EnvelopeID(hi: 1, lo: 2), actor: "op \"q\"", parents: [EnvelopeID(hi: 3, lo: 4), EnvelopeID(hi: 5, lo: 6)],
                        stage: "guard", location: "host:1", timeNs: 42, intent: "x.y", reason: "line\nbreak; tab\t",
                        details: ["b": .bool(true), "a": .double(503), "c": .int(-7), "d": .string("é\u{1}")]),
            AuditRecord(decision: "allow"),
        ]
        for r in records {
            var out = [UInt8]()
            r.writeJSON(into: &out)
            #expect(String(decoding: out, as: UTF8.self) == JSON.serialize(r.json))
            #expect(AuditRecord(json: (try? JSON.parse(bytes: out)) ?? .null) == r)
        }
    }
}
