import Testing
import Foundation
import PipeAudit
import PipeKit

/// Paths used by the tests.
enum Paths {
    static let root: String = {
        var u = URL(fileURLWithPath: #filePath)
        for _ in 0..<3 { u.deleteLastPathComponent() }
        return u.path
    }()
    static func fixture(_ name: String) -> String { root + "/Tests/PipeTests/Fixtures/" + name }
    /// The directory holding the built executables (next to the test bundle).
    static let bin: String = {
        let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? ""
        var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
        for _ in 0..<3 {
            if FileManager.default.fileExists(atPath: dir.path + "/pipehost") { return dir.path }
            dir.deleteLastPathComponent()
        }
        return root + "/.build/debug"
    }()
    static var pipehost: String { bin + "/pipehost" }
    static var pipectl: String { bin + "/pipectl" }
    static func tempDir(_ tag: String) -> String {
        let d = NSTemporaryDirectory() + "pipetest-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try? FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }
}

/// A finished child process.
struct ProcResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs an executable to completion, with a timeout after which it is killed.
@discardableResult
func runProcess(_ exe: String, _ args: [String], timeout: Double = 120, env: [String: String] = [:]) throws -> ProcResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: exe)
    p.arguments = args
    var e = ProcessInfo.processInfo.environment
    for (k, v) in env { e[k] = v }
    p.environment = e
    let out = Pipe(), err = Pipe()
    p.standardOutput = out; p.standardError = err
    try p.run()
    let deadline = Date().addingTimeInterval(timeout)
    // Read while running so a full pipe never blocks the child.
    var o = Data(), r = Data()
    let group = DispatchGroup()
    let q = DispatchQueue(label: "read", attributes: .concurrent)
    let box = DataBox()
    group.enter(); q.async { box.setOut(out.fileHandleForReading.readDataToEndOfFile()); group.leave() }
    group.enter(); q.async { box.setErr(err.fileHandleForReading.readDataToEndOfFile()); group.leave() }
    while p.isRunning && Date() < deadline { usleep(10_000) }
    if p.isRunning { p.terminate(); usleep(200_000); if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
    p.waitUntilExit()
    group.wait()
    o = box.out; r = box.err
    return ProcResult(status: p.terminationStatus, stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: r, as: UTF8.self))
}

final class DataBox: @unchecked Sendable {
    // @unchecked: guarded by the lock.
    private let lock = NSLock()
    private var _out = Data(), _err = Data()
    func setOut(_ d: Data) { lock.lock(); _out = d; lock.unlock() }
    func setErr(_ d: Data) { lock.lock(); _err = d; lock.unlock() }
    var out: Data { lock.lock(); defer { lock.unlock() }; return _out }
    var err: Data { lock.lock(); defer { lock.unlock() }; return _err }
}

/// A deterministic envelope used by the wire-format vectors.
func vectorEnvelope() -> Envelope {
    Envelope(id: EnvelopeID(hi: 0x0011_2233_4455_6677, lo: 0x8899_aabb_ccdd_eeff),
             parent: EnvelopeID(hi: 0x0102_0304_0506_0708, lo: 0x090a_0b0c_0d0e_0f10),
             actor: "ai", intent: "x.y", authority: "", rank: 5, clock: [:], lane: "l",
             hops: 1, attempt: 1, ingestNs: 0x1122_3344_5566_7788, attrs: ["k": .int(-1)], sig: nil, payload: Array("hi".utf8))
}

/// Parses `bytes` as a frame and hands the view to `body` (the buffer lives for the call).
func withFrame<R>(_ bytes: [UInt8], _ body: (FrameView) throws -> R) throws -> R {
    let p = UnsafeMutableRawBufferPointer.allocate(byteCount: max(1, bytes.count), alignment: 8)
    defer { p.deallocate() }
    p.copyBytes(from: bytes)
    let view = try FrameView(UnsafeRawBufferPointer(rebasing: p[0..<bytes.count]))
    return try body(view)
}

/// The decode error of a frame header, if any.
func headerError(_ bytes: [UInt8]) -> DecodeError? {
    do { _ = try withFrame(bytes) { _ in () }; return nil } catch let e as DecodeError { return e } catch { return nil }
}

/// The run's audit log (audit.db) as JSON lines, one record per line in the provenance-layer
/// form of `AuditRecord.json`, in sequence order.
func auditJSONL(_ run: String) throws -> String {
    let r = try AuditReader(path: run + "/audit.db")
    var lines: [String] = []
    try r.forEach { e in lines.append(JSON.serialize(e.record.json)); return true }
    return lines.joined(separator: "\n")
}

/// Mounts a tmpfs of `size` on `dir` (a small file system to fill). Where mounting is not allowed
/// (no CAP_SYS_ADMIN), says the test is skipped, rather than passing silently, and returns false.
func mountTmpfs(_ dir: String, size: String, for test: String) throws -> Bool {
    let m = try runProcess("/bin/mount", ["-t", "tmpfs", "-o", "size=\(size)", "tmpfs", dir], timeout: 10)
    if m.status == 0 { return true }
    FileHandle.standardError.write(Data("\(test) test skipped: cannot mount a tmpfs (\(m.stderr.trimmingCharacters(in: .whitespacesAndNewlines)))\n".utf8))
    return false
}

func unmount(_ dir: String) { _ = try? runProcess("/bin/umount", [dir], timeout: 10) }

/// Suites whose pipelines are timing-sensitive (an inbox coalescing a rewritten file) or heavy
/// (million-envelope crash runs) run one after another, never side by side: on 2 cores a crash
/// test's load starved the intake simulator long enough to split a 3-write rewrite (seen in CI).
@Suite("Pipelines that must not share the machine", .serialized)
enum ExclusivePipelines {}
