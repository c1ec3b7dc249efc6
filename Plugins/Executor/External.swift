import Foundation
import PipeKit
import PipeZMQ

/// The `external` executor: each cap is performed by a service in another process (any
/// language) reached over ZeroMQ (docs/cap-pipeline.md, "The external executor"). One request
/// per cap, answered within `timeout_ms` or the cap is rejected as timed out; a late answer is
/// recognised by its request id and dropped.
///
/// Request (DEALER, two parts): `pipehost-exec-v1`, then JSON
/// `{"id": N, "cap": HEX, "intent": S, "actor": S, "hops": N, "attrs": {...}, "payload_b64": S}`.
/// Reply (two parts): `pipehost-exec-v1`, then JSON
/// `{"id": N, "outcome": "executed"|"rejected", "output": S, "reason": S, "exit_status": N?}`.
final class ExternalExecutor {
    static let proto = Array("pipehost-exec-v1".utf8)
    let endpoint: String
    let context: ZMQContext
    let socket: ZMQSocket
    var nextID: Int64 = 1

    init(endpoint: String, keys: (publicKey: String, secretKey: String, serverKey: String)?) throws {
        self.endpoint = endpoint
        context = try ZMQContext()
        socket = try context.socket(.dealer)
        try socket.setMaxMessageSize(4 << 20)
        if let k = keys { try socket.makeCurveClient(publicKey: k.publicKey, secretKey: k.secretKey, serverKey: k.serverKey) }
        try socket.connect(endpoint)
    }

    deinit { socket.close(); context.terminate() }

    struct Answer { var outcome: String; var output: [UInt8]; var reason: String; var exitStatus: Int32? }

    func perform(_ cap: Envelope, timeoutNs: UInt64, now: () -> UInt64) -> Answer {
        let id = nextID
        nextID += 1
        var attrs: [(String, ConfigValue)] = []
        for (k, v) in cap.attrs.sorted(by: { $0.key < $1.key }) {
            switch v {
            case .string(let s): attrs.append((k, .string(s)))
            case .int(let i): attrs.append((k, .int(i)))
            case .double(let d): attrs.append((k, .double(d)))
            case .bool(let b): attrs.append((k, .bool(b)))
            }
        }
        let req = ConfigValue.object([("id", .int(id)), ("cap", .string(cap.id.description)), ("intent", .string(cap.intent)),
                                      ("actor", .string(cap.actor)), ("hops", .int(Int64(cap.hops))), ("attrs", .object(attrs)),
                                      ("payload_b64", .string(Data(cap.payload).base64EncodedString()))])
        guard (try? socket.send(parts: [Self.proto, Array(JSON.serialize(req).utf8)], dontWait: true)) == true else {
            return Answer(outcome: "rejected", output: [], reason: "external executor at \(endpoint): cannot queue the request", exitStatus: nil)
        }
        let deadline = now() + timeoutNs
        var poller = ZMQPoller()
        poller.add(socket)
        while now() < deadline {
            let left = Int((deadline - now()) / 1_000_000) + 1
            guard (try? poller.poll(timeoutMs: left)) ?? 0 > 0, let parts = try? socket.receiveParts(dontWait: true) else { continue }
            guard parts.count == 2, parts[0] == Self.proto, let v = try? JSON.parse(bytes: parts[1]) else {
                return Answer(outcome: "rejected", output: [], reason: "external executor at \(endpoint): malformed reply", exitStatus: nil)
            }
            // A late answer to a request that already timed out.
            guard v["id"]?.intValue == id else { continue }
            let outcome = v["outcome"]?.stringValue ?? ""
            guard outcome == "executed" || outcome == "rejected" else {
                return Answer(outcome: "rejected", output: [], reason: "external executor at \(endpoint): outcome must be executed or rejected, got '\(outcome)'", exitStatus: nil)
            }
            return Answer(outcome: outcome, output: Array((v["output"]?.stringValue ?? "").utf8), reason: v["reason"]?.stringValue ?? "",
                          exitStatus: v["exit_status"]?.intValue.map { Int32(clamping: $0) })
        }
        return Answer(outcome: "rejected", output: [], reason: "timed out after \(timeoutNs / 1_000_000) ms (no answer from the external executor at \(endpoint))", exitStatus: nil)
    }
}
