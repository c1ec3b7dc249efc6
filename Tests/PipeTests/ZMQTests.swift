import Testing
import Foundation
import PipeZMQ

@Suite("ZeroMQ wrapper")
struct ZMQTests {
    func pushPull(_ bindEP: String, connectEP: ((String) -> String)? = nil) throws -> [[UInt8]] {
        let ctx = try ZMQContext()
        let pull = try ctx.socket(.pull)
        try pull.bind(bindEP)
        let actual = pull.lastEndpoint ?? bindEP
        let push = try ctx.socket(.push)
        try push.connect(connectEP?(actual) ?? actual)
        let msgs: [[UInt8]] = (0..<100).map { i in Array("message \(i)".utf8) }
        for m in msgs { try push.send(m) }
        try pull.setReceiveTimeout(ms: 5000)
        var got: [[UInt8]] = []
        for _ in msgs { if let m = try pull.receive() { got.append(m) } }
        push.close(); pull.close(); ctx.terminate()
        #expect(got == msgs)
        return got
    }

    @Test func pushPull_overInproc() throws { _ = try pushPull("inproc://t-\(UInt32.random(in: 0...UInt32.max))") }
    @Test func pushPull_overIPC() throws { _ = try pushPull("ipc://" + NSTemporaryDirectory() + "zt-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).sock") }
    @Test func pushPull_overTCPLoopback() throws { _ = try pushPull("tcp://127.0.0.1:*") }

    @Test func routerDealer_multipartAndPoller() throws {
        let ctx = try ZMQContext()
        let router = try ctx.socket(.router)
        let ep = "inproc://rd-\(UInt32.random(in: 0...UInt32.max))"
        try router.bind(ep)
        let dealer = try ctx.socket(.dealer)
        try dealer.setIdentity(Array("d1".utf8))
        try dealer.connect(ep)
        try dealer.send(Array("hello".utf8))
        var poller = ZMQPoller()
        let i = poller.add(router)
        #expect(try poller.poll(timeoutMs: 5000) == 1)
        #expect(poller.isReadable(i))
        let parts = try #require(try router.receiveParts(dontWait: true))
        #expect(parts == [Array("d1".utf8), Array("hello".utf8)])
        try router.send(parts: [Array("d1".utf8), Array("back".utf8)])
        try dealer.setReceiveTimeout(ms: 5000)
        #expect(try dealer.receive() == Array("back".utf8))
        // Nothing queued: dontWait returns nil instead of blocking.
        #expect(try dealer.receive(dontWait: true) == nil)
        dealer.close(); router.close(); ctx.terminate()
    }

    @Test func bindTwice_isATypedError() throws {
        let ctx = try ZMQContext()
        let a = try ctx.socket(.pull), b = try ctx.socket(.pull)
        let ep = "inproc://dup-\(UInt32.random(in: 0...UInt32.max))"
        try a.bind(ep)
        #expect(throws: ZMQError.self) { try b.bind(ep) }
        a.close(); b.close(); ctx.terminate()
    }

    @Test func closedSocket_throwsInsteadOfCrashing() throws {
        let ctx = try ZMQContext()
        let s = try ctx.socket(.push)
        s.close()
        #expect(throws: ZMQError.self) { try s.send([1]) }
        ctx.terminate()
    }

    @Test func termination_doesNotHangWithUnsentMessages() throws {
        let ctx = try ZMQContext()
        let push = try ctx.socket(.push)
        try push.connect("tcp://127.0.0.1:1")  // nobody listens: the message stays queued
        _ = try push.send([1, 2, 3], dontWait: true)
        push.close()
        ctx.terminate()  // LINGER 0: returns at once
    }

    @Test func curveKeys_areZ85Pairs() throws {
        #expect(ZMQContext.has("curve"))
        let (pub, sec) = try ZMQCurve.keyPair()
        #expect(pub.count == 40 && sec.count == 40 && pub != sec)
    }
}
