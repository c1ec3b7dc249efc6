import CZeroMQ
import Glibc

/// A libzmq error: the errno and libzmq's text for it.
public struct ZMQError: Error, Sendable, CustomStringConvertible, Equatable {
    public let code: Int32
    public let operation: String
    public var description: String { "\(operation): \(String(cString: zmq_strerror(code)))" }
    public var isAgain: Bool { code == EAGAIN }
    public var isInterrupted: Bool { code == EINTR }
    /// The context was terminated (ETERM).
    public var isTerminated: Bool { code == ETERM }
    static func last(_ op: String) -> ZMQError { ZMQError(code: zmq_errno(), operation: op) }
}

/// A ZeroMQ context. Thread-safe per libzmq; closing it waits for every socket to be closed.
public final class ZMQContext: @unchecked Sendable {
    // @unchecked: libzmq contexts are thread-safe; the handle is immutable after init.
    let handle: UnsafeMutableRawPointer
    private var terminated = false

    public init(ioThreads: Int32 = 1) throws(ZMQError) {
        guard let h = zmq_ctx_new() else { throw .last("zmq_ctx_new") }
        handle = h
        zmq_ctx_set(h, ZMQ_IO_THREADS, ioThreads)
        zmq_ctx_set(h, ZMQ_BLOCKY, 0)  // sockets default to LINGER 0
    }

    /// Interrupts blocking calls on every socket (they fail with ETERM) without waiting.
    public func shutdown() { zmq_ctx_shutdown(handle) }

    /// Terminates the context; every socket must be closed first.
    public func terminate() {
        guard !terminated else { return }
        terminated = true
        while zmq_ctx_term(handle) != 0 && zmq_errno() == EINTR {}
    }

    deinit { terminate() }

    public func socket(_ type: ZMQSocket.Kind) throws(ZMQError) -> ZMQSocket { try ZMQSocket(context: self, kind: type) }

    /// The libzmq version, e.g. "4.3.4".
    public static var version: String {
        var a: Int32 = 0, b: Int32 = 0, c: Int32 = 0
        zmq_version(&a, &b, &c)
        return "\(a).\(b).\(c)"
    }
    /// Whether libzmq was built with a capability ("curve", "ipc", ...).
    public static func has(_ capability: String) -> Bool { zmq_has(capability) == 1 }
}

/// One ZeroMQ socket. Threading rule: a socket is used by one thread at a time (libzmq's rule);
/// it may be handed to another thread with a full memory barrier in between (e.g. thread start).
public final class ZMQSocket: @unchecked Sendable {
    // @unchecked: see the threading rule above; the owner enforces one thread at a time.
    public enum Kind: Sendable {
        case pair, pub, sub, req, rep, dealer, router, pull, push, xpub
        var raw: Int32 {
            switch self {
            case .pair: return ZMQ_PAIR; case .pub: return ZMQ_PUB; case .sub: return ZMQ_SUB
            case .req: return ZMQ_REQ; case .rep: return ZMQ_REP; case .dealer: return ZMQ_DEALER
            case .router: return ZMQ_ROUTER; case .pull: return ZMQ_PULL; case .push: return ZMQ_PUSH
            case .xpub: return ZMQ_XPUB
            }
        }
    }

    public private(set) var handle: UnsafeMutableRawPointer?
    public let kind: Kind
    let context: ZMQContext

    init(context: ZMQContext, kind: Kind) throws(ZMQError) {
        guard let h = zmq_socket(context.handle, kind.raw) else { throw .last("zmq_socket") }
        self.handle = h; self.kind = kind; self.context = context
        try setInt(ZMQ_LINGER, 0)
    }

    deinit { close() }

    /// Closes the socket (LINGER 0: unsent messages are dropped). Idempotent.
    public func close() {
        if let h = handle { zmq_close(h); handle = nil }
    }

    private func h(_ op: String) throws(ZMQError) -> UnsafeMutableRawPointer {
        guard let h = handle else { throw ZMQError(code: ENOTSOCK, operation: op) }
        return h
    }

    public func bind(_ endpoint: String) throws(ZMQError) {
        let s = try h("bind")
        if zmq_bind(s, endpoint) != 0 { throw ZMQError(code: zmq_errno(), operation: "bind \(endpoint)") }
    }
    public func connect(_ endpoint: String) throws(ZMQError) {
        let s = try h("connect")
        if zmq_connect(s, endpoint) != 0 { throw ZMQError(code: zmq_errno(), operation: "connect \(endpoint)") }
    }
    public func disconnect(_ endpoint: String) throws(ZMQError) {
        let s = try h("disconnect")
        if zmq_disconnect(s, endpoint) != 0 { throw ZMQError(code: zmq_errno(), operation: "disconnect \(endpoint)") }
    }
    /// The endpoint actually bound (e.g. the port chosen for `tcp://127.0.0.1:*`).
    public var lastEndpoint: String? {
        guard let s = handle else { return nil }
        var buf = [CChar](repeating: 0, count: 512)
        var len = buf.count
        guard zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, &buf, &len) == 0 else { return nil }
        return buf.withUnsafeBufferPointer { p in
            String(decoding: UnsafeRawBufferPointer(p).prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }

    // MARK: options

    public func setInt(_ option: Int32, _ value: Int32) throws(ZMQError) {
        let s = try h("setsockopt")
        var v = value
        if zmq_setsockopt(s, option, &v, MemoryLayout<Int32>.size) != 0 { throw .last("setsockopt \(option)") }
    }
    public func setInt64(_ option: Int32, _ value: Int64) throws(ZMQError) {
        let s = try h("setsockopt")
        var v = value
        if zmq_setsockopt(s, option, &v, MemoryLayout<Int64>.size) != 0 { throw .last("setsockopt \(option)") }
    }
    public func setBytes(_ option: Int32, _ value: [UInt8]) throws(ZMQError) {
        let s = try h("setsockopt")
        let rc = value.withUnsafeBytes { zmq_setsockopt(s, option, $0.baseAddress, $0.count) }
        if rc != 0 { throw .last("setsockopt \(option)") }
    }
    public func getInt(_ option: Int32) throws(ZMQError) -> Int32 {
        let s = try h("getsockopt")
        var v: Int32 = 0
        var len = MemoryLayout<Int32>.size
        if zmq_getsockopt(s, option, &v, &len) != 0 { throw .last("getsockopt \(option)") }
        return v
    }

    public func setSendHWM(_ n: Int32) throws(ZMQError) { try setInt(ZMQ_SNDHWM, n) }
    /// Whether a message is waiting to be received (ZMQ_EVENTS), without taking it.
    public var hasInput: Bool { ((try? getInt(ZMQ_EVENTS)) ?? 0) & Int32(ZMQ_POLLIN) != 0 }
    public func setReceiveHWM(_ n: Int32) throws(ZMQError) { try setInt(ZMQ_RCVHWM, n) }
    /// Outer guard only: our decoder enforces real limits (an oversized message disconnects the peer).
    public func setMaxMessageSize(_ n: Int64) throws(ZMQError) { try setInt64(ZMQ_MAXMSGSIZE, n) }
    public func setLinger(ms: Int32) throws(ZMQError) { try setInt(ZMQ_LINGER, ms) }
    public func setReceiveTimeout(ms: Int32) throws(ZMQError) { try setInt(ZMQ_RCVTIMEO, ms) }
    public func setSendTimeout(ms: Int32) throws(ZMQError) { try setInt(ZMQ_SNDTIMEO, ms) }
    public func setIdentity(_ id: [UInt8]) throws(ZMQError) { try setBytes(ZMQ_ROUTING_ID, id) }
    public func setImmediate(_ on: Bool) throws(ZMQError) { try setInt(ZMQ_IMMEDIATE, on ? 1 : 0) }
    /// ROUTER: fail with EHOSTUNREACH instead of dropping a message to an unknown peer.
    public func setRouterMandatory(_ on: Bool) throws(ZMQError) { try setInt(ZMQ_ROUTER_MANDATORY, on ? 1 : 0) }
    public func subscribe(_ prefix: [UInt8]) throws(ZMQError) { try setBytes(ZMQ_SUBSCRIBE, prefix) }
    /// Whether more parts of the current multipart message follow.
    public var hasMore: Bool { (try? getInt(ZMQ_RCVMORE)) == 1 }

    // MARK: security

    /// Makes this socket a CURVE server for the binds that follow (binds made earlier keep the
    /// mechanism they had). Clients are authenticated by the context's ZAP handler in `domain`.
    public func makeCurveServer(secretKey: String, domain: String) throws(ZMQError) {
        try setInt(ZMQ_CURVE_SERVER, 1)
        try setBytes(ZMQ_CURVE_SECRETKEY, Array(secretKey.utf8))
        try setBytes(ZMQ_ZAP_DOMAIN, Array(domain.utf8))
    }
    /// Makes this socket a CURVE client of the server with `serverKey` for the connects that follow.
    public func makeCurveClient(publicKey: String, secretKey: String, serverKey: String) throws(ZMQError) {
        try setBytes(ZMQ_CURVE_SERVERKEY, Array(serverKey.utf8))
        try setBytes(ZMQ_CURVE_PUBLICKEY, Array(publicKey.utf8))
        try setBytes(ZMQ_CURVE_SECRETKEY, Array(secretKey.utf8))
    }
    /// A plaintext (NULL mechanism) listener that still asks the ZAP handler in `domain`, so
    /// that every connection is seen (and can be refused by address).
    public func setZAPDomain(_ domain: String) throws(ZMQError) { try setBytes(ZMQ_ZAP_DOMAIN, Array(domain.utf8)) }

    /// Sends the socket's handshake events (failed and succeeded) to an inproc PAIR endpoint;
    /// read them with ``ZMQMonitorEvent/receive(from:)``.
    /// (`failuresOnly`: the failed handshakes alone.) libzmq sends events with a blocking send
    /// from its own threads: connect the reader at once, and call ``stopMonitor()`` before closing
    /// it, so that no event ever waits for a reader that is gone.
    public func monitorHandshakes(_ endpoint: String, failuresOnly: Bool = false) throws(ZMQError) {
        let s = try h("monitor")
        var events = ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH
        if !failuresOnly { events |= ZMQ_EVENT_HANDSHAKE_SUCCEEDED | ZMQ_EVENT_DISCONNECTED }
        if zmq_socket_monitor(s, endpoint, events) != 0 { throw .last("zmq_socket_monitor \(endpoint)") }
    }

    /// Stops the socket's monitor (libzmq closes its end). Call it before closing the reader.
    public func stopMonitor() {
        guard let s = try? h("monitor") else { return }
        _ = zmq_socket_monitor(s, nil, 0)
    }

    // MARK: send / receive

    /// Sends one part. Returns false when `dontWait` and the message could not be queued (EAGAIN).
    @discardableResult
    public func send(_ bytes: [UInt8], more: Bool = false, dontWait: Bool = false) throws(ZMQError) -> Bool {
        let s = try h("send")
        var flags: Int32 = 0
        if more { flags |= ZMQ_SNDMORE }
        if dontWait { flags |= ZMQ_DONTWAIT }
        while true {
            let rc = bytes.withUnsafeBytes { zmq_send(s, $0.baseAddress, $0.count, flags) }
            if rc >= 0 { return true }
            let e = zmq_errno()
            if e == EINTR { continue }
            if e == EAGAIN && dontWait { return false }
            throw ZMQError(code: e, operation: "send")
        }
    }

    /// Sends one message of `count` bytes written in place by `fill` into libzmq's own buffer
    /// (zero-copy: no intermediate array). Returns false when `dontWait` and it could not be queued.
    @discardableResult
    public func send(count: Int, dontWait: Bool = false, fill: (UnsafeMutableRawBufferPointer) -> Void) throws(ZMQError) -> Bool {
        let s = try h("send")
        let m = UnsafeMutablePointer<zmq_msg_t>.allocate(capacity: 1)
        defer { m.deallocate() }
        guard zmq_msg_init_size(m, count) == 0 else { throw .last("zmq_msg_init_size") }
        fill(UnsafeMutableRawBufferPointer(start: zmq_msg_data(m), count: count))
        while true {
            if zmq_msg_send(m, s, dontWait ? ZMQ_DONTWAIT : 0) >= 0 { return true }  // libzmq owns the data now
            let e = zmq_errno()
            if e == EINTR { continue }
            zmq_msg_close(m)
            if e == EAGAIN && dontWait { return false }
            throw ZMQError(code: e, operation: "send")
        }
    }

    /// Sends a received message on (zero-copy: libzmq takes its buffer, and `message` is left
    /// empty). Returns false, with `message` intact, when `dontWait` and it could not be queued.
    @discardableResult
    public func send(_ message: ZMQMessage, dontWait: Bool = false) throws(ZMQError) -> Bool {
        let s = try h("send")
        while true {
            if zmq_msg_send(message.pointer, s, dontWait ? ZMQ_DONTWAIT : 0) >= 0 { return true }
            let e = zmq_errno()
            if e == EINTR { continue }
            if e == EAGAIN && dontWait { return false }
            throw ZMQError(code: e, operation: "send")
        }
    }

    /// Sends a multipart message.
    @discardableResult
    public func send(parts: [[UInt8]], dontWait: Bool = false) throws(ZMQError) -> Bool {
        for (i, p) in parts.enumerated() {
            let ok = try send(p, more: i < parts.count - 1, dontWait: dontWait && i == 0)
            if !ok { return false }
        }
        return true
    }

    /// Receives one part into a message; nil when `dontWait` and nothing is queued, or on timeout.
    public func receiveMessage(dontWait: Bool = false) throws(ZMQError) -> ZMQMessage? {
        let s = try h("recv")
        let m = ZMQMessage()
        while true {
            let rc = zmq_msg_recv(m.pointer, s, dontWait ? ZMQ_DONTWAIT : 0)
            if rc >= 0 { return m }
            let e = zmq_errno()
            if e == EINTR { continue }
            if e == EAGAIN { return nil }
            throw ZMQError(code: e, operation: "recv")
        }
    }

    /// Receives one part as bytes (copied).
    public func receive(dontWait: Bool = false) throws(ZMQError) -> [UInt8]? {
        try receiveMessage(dontWait: dontWait)?.bytes
    }

    /// Receives every part of one multipart message; nil if nothing was queued (dontWait) or on timeout.
    public func receiveParts(dontWait: Bool = false) throws(ZMQError) -> [[UInt8]]? {
        guard let first = try receive(dontWait: dontWait) else { return nil }
        var parts = [first]
        while hasMore { if let p = try receive() { parts.append(p) } else { break } }
        return parts
    }
}

/// A received message, kept at a stable heap address (a `zmq_msg_t` must never be copied).
/// Its bytes are read in place (zero-copy) through ``withBytes(_:)``.
public final class ZMQMessage {
    let pointer: UnsafeMutablePointer<zmq_msg_t>
    init() {
        pointer = .allocate(capacity: 1)
        zmq_msg_init(pointer)
    }
    deinit {
        zmq_msg_close(pointer)
        pointer.deallocate()
    }
    public var count: Int { zmq_msg_size(pointer) }
    /// Borrowed view of the message bytes, valid only inside `body`.
    public func withBytes<R, E: Error>(_ body: (UnsafeRawBufferPointer) throws(E) -> R) throws(E) -> R {
        let n = zmq_msg_size(pointer)
        guard n > 0, let base = zmq_msg_data(pointer) else { return try body(UnsafeRawBufferPointer(start: nil, count: 0)) }
        return try body(UnsafeRawBufferPointer(start: base, count: n))
    }
    public var bytes: [UInt8] { withBytes { Array($0) } }
    public var hasMore: Bool { zmq_msg_more(pointer) == 1 }
    /// A metadata property of the connection the message came in on ("User-Id" set by the ZAP
    /// handler, "Peer-Address", ...), or nil where there is none (inproc, ipc without ZAP).
    public func property(_ name: String) -> String? {
        guard let p = zmq_msg_gets(pointer, name) else { return nil }
        return String(cString: p)
    }
}

/// One socket-monitor event (two parts: `u16 event, u32 value`, then the endpoint).
public struct ZMQMonitorEvent: Sendable {
    public var event: Int32
    public var value: UInt32
    public var endpoint: String
    public var isHandshakeFailure: Bool {
        event & (ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL | ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL | ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) != 0
    }
    /// Refused by the ZAP handler (which reports it itself).
    public var isAuthFailure: Bool { event == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH }
    public var isHandshakeSuccess: Bool { event == ZMQ_EVENT_HANDSHAKE_SUCCEEDED }
    public var isDisconnect: Bool { event == ZMQ_EVENT_DISCONNECTED }
    /// What failed, for a log line.
    public var reason: String {
        switch event {
        case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH: return "authentication refused (status \(value))"
        case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
            switch value {
            case 0x1100_0002: return "security mechanism mismatch: a plaintext peer talking to CURVE, or the other way round"
            case 0x1100_0001: return "CURVE handshake did not decrypt: the client's server key is not this host's key"
            default: return "handshake protocol error 0x\(String(value, radix: 16))"
            }
        case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL: return "handshake failed (\(String(cString: zmq_strerror(Int32(bitPattern: value)))))"
        case ZMQ_EVENT_HANDSHAKE_SUCCEEDED: return "handshake succeeded"
        case ZMQ_EVENT_DISCONNECTED: return "disconnected"
        default: return "event 0x\(String(event, radix: 16))"
        }
    }
    /// Takes one event from a PAIR socket connected to a monitor endpoint; nil when none is queued.
    public static func receive(from s: ZMQSocket) -> ZMQMonitorEvent? {
        guard let parts = try? s.receiveParts(dontWait: true), parts.count == 2, parts[0].count == 6 else { return nil }
        let p = parts[0]
        let ev = Int32(p[0]) | Int32(p[1]) << 8
        let v = UInt32(p[2]) | UInt32(p[3]) << 8 | UInt32(p[4]) << 16 | UInt32(p[5]) << 24
        return ZMQMonitorEvent(event: ev, value: v, endpoint: String(decoding: parts[1], as: UTF8.self))
    }
}

/// One ZAP request (RFC 27): a peer asking to connect to a listener with a ZAP domain.
public struct ZAPRequest: Sendable {
    /// The routing envelope of the handler's ROUTER socket, echoed in the reply.
    public var routing: [[UInt8]]
    public var requestID: [UInt8]
    public var domain: String
    public var address: String
    public var mechanism: String
    /// The client's CURVE public key (Z85), for mechanism CURVE.
    public var clientKey: String?

    /// Parses the parts after the routing envelope; nil for anything that is not ZAP 1.0.
    public static func parse(_ parts: [[UInt8]]) -> ZAPRequest? {
        guard let empty = parts.firstIndex(where: { $0.isEmpty }) else { return nil }
        let body = Array(parts[(empty + 1)...])
        guard body.count >= 6, String(decoding: body[0], as: UTF8.self) == "1.0" else { return nil }
        let mech = String(decoding: body[5], as: UTF8.self)
        var key: String?
        if mech == "CURVE", body.count >= 7, body[6].count == 32 { key = ZMQCurve.z85(body[6]) }
        return ZAPRequest(routing: Array(parts[...empty]), requestID: body[1], domain: String(decoding: body[2], as: UTF8.self),
                          address: String(decoding: body[3], as: UTF8.self), mechanism: mech, clientKey: key)
    }
    /// The reply: 200 with the user id the connection's messages will carry, or 400 with a reason.
    public func reply(allow userID: String?, reason: String) -> [[UInt8]] {
        routing + [Array("1.0".utf8), requestID, Array((userID != nil ? "200" : "400").utf8), Array(reason.utf8),
                   Array((userID ?? "").utf8), []]
    }
}

/// `zmq_poll` over a fixed set of sockets.
public struct ZMQPoller {
    public struct Events: OptionSet, Sendable {
        public let rawValue: Int16
        public init(rawValue: Int16) { self.rawValue = rawValue }
        public static let readable = Events(rawValue: Int16(ZMQ_POLLIN))
        public static let writable = Events(rawValue: Int16(ZMQ_POLLOUT))
    }
    private var items: [zmq_pollitem_t] = []
    private var sockets: [ZMQSocket] = []
    public init() {}

    /// Adds a socket; returns its index for ``isReadable(_:)``.
    @discardableResult
    public mutating func add(_ socket: ZMQSocket, events: Events = .readable) -> Int {
        items.append(zmq_pollitem_t(socket: socket.handle, fd: -1, events: events.rawValue, revents: 0))
        sockets.append(socket)
        return items.count - 1
    }
    public mutating func setEvents(_ index: Int, _ events: Events) { items[index].events = events.rawValue }

    /// Waits up to `timeoutMs` (-1: forever). Returns the number of ready sockets (0 on timeout or EINTR).
    public mutating func poll(timeoutMs: Int) throws(ZMQError) -> Int {
        let n = items.count
        let rc = items.withUnsafeMutableBufferPointer { zmq_poll($0.baseAddress, Int32(n), timeoutMs) }
        if rc < 0 {
            let e = zmq_errno()
            if e == EINTR { return 0 }
            throw ZMQError(code: e, operation: "zmq_poll")
        }
        return Int(rc)
    }
    public func isReadable(_ index: Int) -> Bool { items[index].revents & Int16(ZMQ_POLLIN) != 0 }
    public func isWritable(_ index: Int) -> Bool { items[index].revents & Int16(ZMQ_POLLOUT) != 0 }
}

/// CURVE key pairs (Z85-encoded, 40 characters each), made by libzmq.
public enum ZMQCurve {
    public static func keyPair() throws(ZMQError) -> (publicKey: String, secretKey: String) {
        var pub = [CChar](repeating: 0, count: 41), sec = [CChar](repeating: 0, count: 41)
        guard zmq_curve_keypair(&pub, &sec) == 0 else { throw .last("zmq_curve_keypair") }
        func s(_ a: [CChar]) -> String { a.withUnsafeBufferPointer { String(decoding: UnsafeRawBufferPointer($0).prefix(40), as: UTF8.self) } }
        return (s(pub), s(sec))
    }
    /// The public key (Z85) of a Z85 secret key; nil when `secretKey` is not a CURVE secret key.
    public static func publicKey(secretKey: String) -> String? {
        guard secretKey.utf8.count == 40 else { return nil }
        var pub = [CChar](repeating: 0, count: 41)
        guard zmq_curve_public(&pub, secretKey) == 0 else { return nil }
        return pub.withUnsafeBufferPointer { String(decoding: UnsafeRawBufferPointer($0).prefix(40), as: UTF8.self) }
    }
    /// Whether `key` is a well-formed Z85 CURVE key (40 characters that decode to 32 bytes).
    public static func isKey(_ key: String) -> Bool {
        guard key.utf8.count == 40 else { return false }
        var out = [UInt8](repeating: 0, count: 32)
        return zmq_z85_decode(&out, key) != nil
    }
    /// Z85 text of 32 key bytes.
    public static func z85(_ bytes: [UInt8]) -> String {
        var out = [CChar](repeating: 0, count: bytes.count * 5 / 4 + 1)
        _ = zmq_z85_encode(&out, bytes, bytes.count)
        return out.withUnsafeBufferPointer { String(decoding: UnsafeRawBufferPointer($0).prefix(while: { $0 != 0 }), as: UTF8.self) }
    }
}

/// CURVE key files from `pipehost keygen`: `curve.key` (Z85 secret) and `curve.pub` (Z85 public).
/// One reader for the host, its workers and the stages that speak CURVE themselves.
public enum CurveKeyFiles {
    public struct Failure: Error, Sendable, CustomStringConvertible {
        public let description: String
    }

    /// The file's text without surrounding whitespace.
    static func read(_ path: String) throws(Failure) -> String {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw Failure(description: "cannot read CURVE key \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 512)
        while bytes.count <= 4096 {
            let n = buf.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n <= 0 { break }
            bytes += buf[0..<n]
        }
        let ws: Set<UInt8> = [0x20, 0x09, 0x0a, 0x0d]
        return String(decoding: bytes.drop(while: { ws.contains($0) }).reversed().drop(while: { ws.contains($0) }).reversed(), as: UTF8.self)
    }

    /// A key pair from a secret key file. Refuses a file anybody else can read or the group can
    /// change (group read is allowed: a Kubernetes secret mounted for a non-root user is 0440).
    public static func loadSecret(_ path: String) throws(Failure) -> (publicKey: String, secretKey: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { throw Failure(description: "cannot read CURVE key \(path): \(String(cString: strerror(errno)))") }
        if st.st_mode & 0o027 != 0 {
            throw Failure(description: "CURVE secret key \(path) is open to others (mode \(String(st.st_mode & 0o777, radix: 8))); chmod 600 it")
        }
        let secret = try read(path)
        guard let pub = ZMQCurve.publicKey(secretKey: secret) else {
            throw Failure(description: "\(path) is not a CURVE secret key (40 Z85 characters; `pipehost keygen` writes curve.key)")
        }
        return (pub, secret)
    }

    /// A public key given as Z85 text or as the path of a `curve.pub` file (relative to `base`).
    public static func loadPublic(_ keyOrPath: String, base: String) throws(Failure) -> String {
        if ZMQCurve.isKey(keyOrPath) { return keyOrPath }
        let path = keyOrPath.hasPrefix("/") ? keyOrPath : base + "/" + keyOrPath
        let key = try read(path)
        guard ZMQCurve.isKey(key) else { throw Failure(description: "\(path) is not a CURVE public key (40 Z85 characters; `pipehost keygen` writes curve.pub)") }
        return key
    }
}
