import Foundation
import Glibc
import Logging
import Synchronization
import PipeKit
import PipeZMQ

/// Lanes between two remote stages, or a remote stage and a `placement: process` stage. Workers
/// only connect to the host, never to each other, and tcp lanes end in the host process (where
/// the ZAP handler is), so the host carries such a lane: the producer's worker sends DATA, EOS and HEARTBEAT frames to
/// one host port and the consumer's worker takes them from another; CREDIT, ACK and HEARTBEAT
/// frames come back the same way. Frames are forwarded unchanged and in order (zero-copy), so
/// sequence numbers, credit epochs and the tcp loss rules of docs/wire-format.md work end to end
/// as if the two runners were joined directly (a `process` stage's end is an ipc socket, its
/// lane marked `lossy` in its ASSIGN so that it keeps the tcp rules). Each frame's header is checked first (the
/// protocol, this lane, a type that may travel this way) and so is its sender (the
/// authenticated worker that owns this end, not revoked or cut off); anything else is refused,
/// counted and reported to the host, which audits it and cuts off a worker that keeps at it.
final class LaneRelay: @unchecked Sendable {
    // @unchecked: the sockets and hops are touched only by the relay thread once it started
    // (libzmq allows moving a socket between threads with a memory barrier, which Thread.start is);
    // what other threads read sits behind `shared`.

    /// One direction of one lane: frames taken on `from` (a PULL the sender connects to) go out
    /// on `to` (a PUSH the receiver connects to).
    struct Hop {
        let lane: UInt32
        let from: ZMQSocket
        let to: ZMQSocket
        /// The worker that alone may send on `from` (nil: plaintext, no authenticated name).
        let sender: String?
        let types: Set<UInt8>
        let direction: String
        /// A frame that found no room (the receiver absent or slow): sent before anything else is taken.
        var held: ZMQMessage?
        /// Dropping the rest of a refused multipart message.
        var skipping = false
        var forwarded: UInt64 = 0
        var refused: UInt64 = 0
    }

    typealias Refusal = FrameRefusal
    /// One relayed lane as seen from outside: frames forwarded each way, refused, and whether a
    /// frame is held for want of room (the receiving end absent or slow) on either path.
    struct LaneStats: Sendable {
        var data: UInt64 = 0, back: UInt64 = 0, refused: UInt64 = 0
        var dataHeld = false, backHeld = false
    }
    struct Shared {
        var refusals: [Refusal] = []
        var dropped = 0
        var stats: [UInt32: LaneStats] = [:]
    }

    private var hops: [Hop] = []
    private let runDir: String
    private let stopFlag = Atomic<Bool>(false)
    private let finished = Atomic<Bool>(false)
    private let shared = Mutex(Shared())
    private var thread: Thread?
    private let context: ZMQContext
    /// The relay's tcp ports, whose failed handshakes its thread watches (``HandshakeWatch``).
    private var tcpBound: [(ZMQSocket, String)] = []
    private var handshakes: HandshakeWatch
    private let log = Logger(label: "pipehost.relay")

    /// The data frames of a lane go producer -> consumer, the return frames the other way.
    static let dataTypes: Set<UInt8> = [FrameType.data.rawValue, FrameType.endOfStream.rawValue, FrameType.heartbeat.rawValue]
    static let returnTypes: Set<UInt8> = [FrameType.credit.rawValue, FrameType.ack.rawValue]

    /// Opens the sockets of every relayed lane of `layout`: a tcp port per remote end (CURVE
    /// servers in their own ZAP domains, as every host-side tcp socket is), an ipc socket per
    /// `process` end. Throws, closing what it made, when one cannot bind.
    init(context: ZMQContext, plan: PipelinePlan, layout: RemoteLayout, runDir: String) throws {
        self.runDir = runDir
        self.context = context
        handshakes = HandshakeWatch(run: runDir)
        var tcpBound: [(ZMQSocket, String)] = []
        let links = TCPLinks(security: layout.security, clientKeys: nil)
        let limits = WireLimits(maxEnvelopeBytes: plan.spec.limits.maxEnvelopeBytes, maxBatchEnvelopes: plan.spec.limits.maxBatchEnvelopes)
        var made: [ZMQSocket] = []
        mkdir(runDir + "/sock", 0o700)  // the relay's own ipc sockets go in sock/relay/
        /// A relay socket: bound on a host tcp port, or, for a `process` stage's end, an ipc
        /// socket (bound by the relay on the way in, connected to the stage's own on the way out).
        func socket(_ kind: ZMQSocket.Kind, port: Int?, ipc: String, bind: Bool, maxBytes: Int64) throws -> ZMQSocket {
            let s = try context.socket(kind)
            made.append(s)
            try s.setLinger(ms: 0)
            // Small queues: what waits in the relay is bounded by these, not by ZeroMQ's default
            // 1000 frames. A full queue is backpressure (the sender's frames wait on its side; the
            // relay never drops one).
            try s.setSendHWM(16); try s.setReceiveHWM(16)
            if kind == .pull { try s.setMaxMessageSize(maxBytes) }
            if let port {
                try links.bind(s, layout.bind(port))
                tcpBound.append((s, layout.bind(port)))
            } else if bind { try links.bind(s, ipc) } else { try links.connect(s, ipc) }
            return s
        }
        do {
            for l in plan.lanes where layout.relayed.contains(l.id) {
                let producer = layout.security.curve ? plan.stage(l.from)?.placement.workerName : nil
                let consumer = layout.security.curve ? plan.stage(l.to)?.placement.workerName : nil
                let dataMax = Int64(limits.maxFrameBytes)
                let retMax = Int64(65_536 + 16 * Swift.max(4096, limits.maxBatchEnvelopes))
                let dataIn = try socket(.pull, port: layout.relayIn[l.id], ipc: RemoteLayout.relayEndpoint(lane: l.id, "in", runDir: runDir), bind: true, maxBytes: dataMax)
                let dataOut = try socket(.push, port: layout.laneData[l.id], ipc: plan.inputEndpoint(l.to, transport: "ipc", runTag: "", runDir: runDir), bind: false, maxBytes: 0)
                let retIn = try socket(.pull, port: layout.relayRet[l.id], ipc: RemoteLayout.relayEndpoint(lane: l.id, "ret", runDir: runDir), bind: true, maxBytes: retMax)
                let retOut = try socket(.push, port: layout.laneRet[l.id], ipc: plan.returnEndpoint(l.from, transport: "ipc", runTag: "", runDir: runDir), bind: false, maxBytes: 0)
                hops.append(Hop(lane: l.id, from: dataIn, to: dataOut, sender: producer, types: Self.dataTypes, direction: "data"))
                hops.append(Hop(lane: l.id, from: retIn, to: retOut, sender: consumer, types: Self.returnTypes, direction: "return"))
            }
        } catch {
            for s in made { s.close() }
            throw error
        }
        self.tcpBound = tcpBound
    }

    func start() {
        guard !hops.isEmpty else { finished.store(true, ordering: .sequentiallyConsistent); return }
        let t = Thread { [self] in run() }
        t.name = "lane-relay"
        thread = t
        t.start()
    }

    /// Stops forwarding and closes the sockets; waits up to a second for the thread. Returns
    /// whether the sockets are closed (if not, the caller keeps the ZAP handler: a CURVE listener
    /// without one would let every client in).
    @discardableResult
    func stop() -> Bool {
        guard thread != nil else {
            for h in hops { h.from.close(); h.to.close() }
            hops.removeAll()
            return true
        }
        stopFlag.store(true, ordering: .sequentiallyConsistent)
        let deadline = monotonicNs() + 1_000_000_000
        while !finished.load(ordering: .sequentiallyConsistent) && monotonicNs() < deadline { usleep(2_000) }
        return finished.load(ordering: .sequentiallyConsistent)
    }

    /// Refusals since the last call (the host audits them and counts them against their workers),
    /// and how many more were dropped beyond the bounded list.
    func takeRefusals() -> (list: [Refusal], dropped: Int) {
        shared.withLock { s in
            defer { s.refusals.removeAll(keepingCapacity: true); s.dropped = 0 }
            return (s.refusals, s.dropped)
        }
    }

    /// Per relayed lane: frames forwarded each way, frames refused, frames held.
    func stats() -> [UInt32: LaneStats] { shared.withLock { $0.stats } }

    /// Why `m` may not be forwarded on `hop` (and whether it is garbage), or nil when it may.
    func check(_ m: ZMQMessage, _ hop: Hop) -> (why: String, garbage: Bool)? {
        if let w = hop.sender {
            let user = m.property("User-Id") ?? ""
            if user != w { return ("a frame from '\(user)' on the \(hop.direction) path of lane \(hop.lane), which only '\(w)' may send on", true) }
            if RemoteBans.shared.isBanned(w, in: runDir) { return ("worker '\(w)' is revoked or cut off; its frame on lane \(hop.lane) is refused", false) }
        }
        let why = m.withBytes { b -> String? in
            guard b.count >= FrameHeader.size, b[0] == FrameHeader.magic.0, b[1] == FrameHeader.magic.1 else {
                return "a \(b.count)-byte message on lane \(hop.lane) that is not a frame of the lane protocol"
            }
            guard b[2] == FrameHeader.version else { return "a frame of protocol version \(b[2]) on lane \(hop.lane)" }
            let lane = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
            guard lane == hop.lane else { return "a frame for lane \(lane) on the port of lane \(hop.lane)" }
            guard hop.types.contains(b[3]) else {
                return "a frame of type \(FrameType(rawValue: b[3]).map { "\($0)" } ?? "0x" + String(b[3], radix: 16)) on the \(hop.direction) path of lane \(hop.lane)"
            }
            return nil
        }
        return why.map { ($0, true) }
    }

    private func run() {
        defer {
            handshakes.stop()
            for h in hops { h.from.close(); h.to.close() }
            hops.removeAll()
            finished.store(true, ordering: .sequentiallyConsistent)
        }
        var poller = ZMQPoller()
        for h in hops { poller.add(h.from, events: .readable); poller.add(h.to, events: []) }
        handshakes.watch(tcpBound, context: context, tag: "relay/\(ObjectIdentifier(self).hashValue)", poller: &poller, log: log)
        var refusals: [Refusal] = []
        while !stopFlag.load(ordering: .relaxed) {
            for (i, h) in hops.enumerated() {
                poller.setEvents(2 * i, h.held == nil ? .readable : [])
                poller.setEvents(2 * i + 1, h.held == nil ? [] : .writable)
            }
            _ = try? poller.poll(timeoutMs: 100)
            handshakes.take(poller)
            var moved = false
            for i in hops.indices { moved = pump(i, &refusals) || moved }
            if moved || !refusals.isEmpty {
                var st: [UInt32: LaneStats] = [:]
                for h in hops {
                    var e = st[h.lane] ?? LaneStats()
                    if h.direction == "data" { e.data = h.forwarded; e.dataHeld = h.held != nil } else { e.back = h.forwarded; e.backHeld = h.held != nil }
                    e.refused += h.refused
                    st[h.lane] = e
                }
                let taken = refusals
                refusals.removeAll(keepingCapacity: true)
                shared.withLock { s in
                    s.stats = st
                    for r in taken {
                        if s.refusals.count < 200 { s.refusals.append(r) } else { s.dropped += 1 }
                    }
                }
            }
        }
    }

    /// Forwards what one hop holds and has waiting (at most 256 frames a turn, so that one busy
    /// lane does not starve the others). Returns whether anything moved.
    private func pump(_ i: Int, _ refusals: inout [Refusal]) -> Bool {
        var moved = false
        if let m = hops[i].held {
            guard (try? hops[i].to.send(m, dontWait: true)) == true else { return false }
            hops[i].held = nil
            hops[i].forwarded &+= 1
            moved = true
        }
        var n = 0
        while n < 256, hops[i].held == nil, let m = try? hops[i].from.receiveMessage(dontWait: true) {
            n += 1
            moved = true
            if hops[i].skipping { hops[i].skipping = m.hasMore; continue }
            var why = check(m, hops[i])
            if why == nil && m.hasMore { why = ("a multipart message on lane \(hops[i].lane) (frames are single messages)", true) }
            if let why {
                hops[i].skipping = m.hasMore
                hops[i].refused &+= 1
                let user = m.property("User-Id") ?? ""
                refusals.append(Refusal(worker: user.isEmpty ? hops[i].sender : user, why: why.why, garbage: why.garbage))
                continue
            }
            if (try? hops[i].to.send(m, dontWait: true)) == true { hops[i].forwarded &+= 1 } else { hops[i].held = m }
        }
        return moved
    }
}
