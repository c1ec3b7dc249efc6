import PipeKit
import Foundation

/// Buffered append-only writer for JSONL output (stdio FILE, flushed on demand).
final class LineWriter {
    let file: UnsafeMutablePointer<FILE>
    let ownsFile: Bool
    init(path: String, append: Bool) throws {
        let dir = (path as NSString).deletingLastPathComponent
        if !dir.isEmpty { try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        guard let f = fopen(path, append ? "ae" : "we") else {
            throw StageError.halt("cannot open \(path) for writing: \(String(cString: strerror(errno)))")
        }
        file = f; ownsFile = true
        setvbuf(f, nil, _IOFBF, 1 << 16)
    }
    init(fd: Int32) throws {
        guard let f = fdopen(dup(fd), "w") else { throw StageError.halt("cannot open standard output: \(String(cString: strerror(errno)))") }
        file = f; ownsFile = true
    }
    func write(_ line: [UInt8]) throws {
        let n = line.withUnsafeBytes { fwrite($0.baseAddress, 1, $0.count, file) }
        if n != line.count || fputc(0x0A, file) == EOF { throw StageError.halt("write failed: \(String(cString: strerror(errno)))") }
    }
    func flush(sync: Bool = false) throws {
        if fflush(file) != 0 { throw StageError.halt("flush failed: \(String(cString: strerror(errno)))") }
        if sync { fsync(fileno(file)) }
    }
    /// Writes what is buffered (before the file is changed under this writer).
    func seal() { fflush(file) }
    deinit { if ownsFile { fclose(file) } else { fflush(file) } }
}

/// `file-sink`: appends every envelope as one JSONL line (CONCEPTS.md form).
public final class FileSinkStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "file-sink", summary: "Writes envelopes as JSONL lines to a file.", role: .sink,
        inputs: [InputPort("in", doc: "envelopes to write")],
        fields: [
            ConfigField("path", .string, doc: "Output file; relative paths are resolved against the run directory."),
            ConfigField("append", .bool, default: .bool(false), doc: "Append instead of truncating at start."),
            ConfigField("include_ingest", .bool, default: .bool(true), doc: "Write `ingest_ns` (turn off for byte-comparable outputs)."),
            ConfigField("fsync", .bool, default: .bool(false), doc: "fsync at every flush and at drain."),
        ],
        make: { FileSinkStage(config: $0) })
    let path: String, append: Bool, includeIngest: Bool, sync: Bool
    var writer: LineWriter?
    var lines: Int64 = 0
    init(config c: ConfigReader) {
        path = c.string("path") ?? "out.jsonl"; append = c.bool("append") ?? false
        includeIngest = c.bool("include_ingest") ?? true; sync = c.bool("fsync") ?? false
    }
    public func start(context: any StageContext) throws {
        let p = context.resolvePath(path)
        // A restarted worker keeps what its earlier incarnation wrote (and acknowledged).
        writer = try LineWriter(path: p, append: append || context.restarts > 0)
        context.report("path", .string(p))
    }
    public var tickInterval: UInt64? { 200_000_000 }
    public func tick(context: any StageContext) throws { try writer?.flush(sync: sync) }
    public func process(_ envelope: Envelope, from arrival: Arrival, context: any StageContext) throws {
        try writer?.write(EnvelopeJSONL.encode(envelope, includeIngest: includeIngest))
        lines += 1
    }
    public func drain(context: any StageContext) throws {
        try writer?.flush(sync: sync)
        context.report("lines", .int(lines))
    }
    public func stop() { try? writer?.flush(sync: sync); writer = nil }
    /// Before its envelopes are acknowledged, their lines reach the file (fsync with `fsync: true`).
    public func commit(context: any StageContext) throws { try writer?.flush(sync: sync) }
    /// The ids of the file's last `limit` lines (when appending, or after a restart: a file
    /// truncated at start has none), read from the end of the file backwards. A line torn by a
    /// crash (no newline) is cut off first: its envelope was never acknowledged and comes again.
    public func deliveredIDs(limit: Int, context: any StageContext) throws -> [EnvelopeID]? {
        guard append || context.restarts > 0 else { return [] }
        let p = context.resolvePath(path)
        writer?.seal()
        let fd = open(p, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size > 0 else { return [] }
        func read(_ at: Int, _ n: Int) throws -> [UInt8] {
            var b = [UInt8](repeating: 0, count: n)
            let got = b.withUnsafeMutableBytes { pread(fd, $0.baseAddress, n, off_t(at)) }
            guard got == n else { throw StageError.halt("\(p): cannot read back its tail: \(String(cString: strerror(errno)))") }
            return b
        }
        // Lines start with {"id":"<32 hex>" (EnvelopeJSONL writes id first).
        let prefix = Array("{\"id\":\"".utf8)
        var fileEnd = Int(st.st_size)
        if try read(fileEnd - 1, 1) != [0x0A] {
            // Find where the unterminated last line starts, reading backwards.
            var p0 = fileEnd, start = 0
            while p0 > 0 {
                let n = min(1 << 20, p0)
                p0 -= n
                if let i = try read(p0, n).lastIndex(of: 0x0A) { start = p0 + i + 1; break }
            }
            let head = try read(start, min(prefix.count, fileEnd - start))
            if head.starts(with: prefix.prefix(head.count)) {
                // One of ours, cut short by a crash: its envelope was never acknowledged.
                guard truncate(p, off_t(start)) == 0 else { throw StageError.halt("\(p): cannot cut off a torn last line: \(String(cString: strerror(errno)))") }
                context.logger.warning("\(p): cut off a torn last line (\(fileEnd - start) bytes) left by a crash")
                fileEnd = start
            } else {
                // Not a line this sink writes: keep it, and end it so ours start on a line of their own.
                try writer?.write([])
                context.logger.warning("\(p): its last line has no newline and is not an envelope line; left as it is, ended with a newline")
            }
        }
        // Backwards, a block (1 MiB) at a time, carrying only the partial line at a block's start.
        var ids: [EnvelopeID] = []
        var carry: [UInt8] = []
        var pos = fileEnd
        while pos > 0 && ids.count < limit {
            let n = min(1 << 20, pos)
            pos -= n
            var buf = try read(pos, n)
            buf += carry
            var lineEnd = buf.count
            var i = buf.count - 1
            while i >= 0 && ids.count < limit {
                // A line starts after a newline, or at the start of the file.
                if i == 0 ? pos == 0 : buf[i - 1] == 0x0A {
                    if lineEnd - i >= 40, Array(buf[i..<(i + 7)]) == prefix,
                       let id = EnvelopeID(hex: String(decoding: buf[(i + 7)..<(i + 39)], as: UTF8.self)) { ids.append(id) }
                    lineEnd = i
                }
                i -= 1
            }
            carry = Array(buf[0..<lineEnd])
        }
        return ids.reversed()
    }
}

/// `stdout-sink`: prints every envelope as a JSONL line, or a short text line.
public final class StdoutSinkStage: Stage {
    public static let descriptor = StageDescriptor(
        kind: "stdout-sink", summary: "Prints envelopes to standard output (JSONL or a short text line).", role: .sink,
        inputs: [InputPort("in", doc: "envelopes to print")],
        fields: [ConfigField("format", .enumeration(["jsonl", "text"]), default: .string("jsonl"), doc: "`jsonl` (full envelope) or `text` (id, actor, intent, payload size).")],
        make: { StdoutSinkStage(text: $0.string("format") == "text") })
    let text: Bool
    var writer: LineWriter?
    init(text: Bool) { self.text = text }
    public func start(context: any StageContext) throws { writer = try LineWriter(fd: 1) }
    public func process(_ envelope: Envelope, from arrival: Arrival, context: any StageContext) throws {
        if text {
            try writer?.write(Array("\(envelope.id) \(envelope.actor) \(envelope.intent) rank=\(envelope.rank) hops=\(envelope.hops) \(envelope.payloadCount)B".utf8))
        } else {
            try writer?.write(EnvelopeJSONL.encode(envelope))
        }
    }
    public var tickInterval: UInt64? { 100_000_000 }
    public func tick(context: any StageContext) throws { try writer?.flush() }
    public func drain(context: any StageContext) throws { try writer?.flush() }
    public func commit(context: any StageContext) throws { try writer?.flush() }
}

/// `file-source`: reads a JSONL file of envelopes; a bad line is dead-lettered with its line
/// number and reason, and reading goes on. A line longer than the envelope limit is never read
/// whole into memory: it is skipped and dead-lettered.
public final class FileSourceStage: ResumableSource {
    public static let descriptor = StageDescriptor(
        kind: "file-source", summary: "Reads envelopes from a JSONL file (one JSON object per line).", role: .source,
        fields: [ConfigField("path", .string, doc: "Input file; relative paths are resolved against the run directory."),
                 ConfigField("durable", .bool, default: .bool(false), doc: "Under `delivery: at-least-once`, journal every envelope (and the read offset) before sending it; a restart with the same run directory goes on from there (docs/delivery.md).")],
        make: { FileSourceStage(path: $0.string("path") ?? "", durable: $0.bool("durable") ?? false) })
    let path: String
    public let durable: Bool
    var file: UnsafeMutablePointer<FILE>?
    var lineNo = 0
    var out = OutputHandle(index: 0, name: "out")
    var done = false
    init(path: String, durable: Bool) { self.path = path; self.durable = durable }

    /// u64 byte offset of the next line, u64 its line number - 1.
    public func position() -> [UInt8] {
        var w = ByteWriter(capacity: 16)
        w.u64(UInt64(max(0, file.map { ftello($0) } ?? 0))); w.u64(UInt64(lineNo))
        return w.buffer
    }

    public func resume(from position: [UInt8]) throws {
        guard position.count == 16 else { throw StageError.halt("\(path): the journal's position is \(position.count) bytes, expected 16") }
        func u64(_ at: Int) -> UInt64 { position[at..<(at + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        let offset = u64(0), line = u64(8)
        guard let f = file, fseeko(f, off_t(clamping: offset), SEEK_SET) == 0 else {
            throw StageError.halt("\(path): cannot go back to offset \(offset) from the journal: \(String(cString: strerror(errno)))")
        }
        lineNo = Int(clamping: line)
    }

    public func start(context: any StageContext) throws {
        out = try context.output("out")
        let p = context.resolvePath(path)
        guard let f = fopen(p, "re") else { throw StageError.halt("cannot open \(p): \(String(cString: strerror(errno)))") }
        file = f
    }
    public func requestStop() { done = true }
    /// Reads one line of at most `limit` bytes; returns (bytes, tooLong) or nil at EOF.
    func readLine(limit: Int) -> ([UInt8], Bool)? {
        guard let f = file else { return nil }
        var buf = [UInt8]()
        var tooLong = false
        while true {
            let c = getc(f)
            if c == EOF { return buf.isEmpty && !tooLong ? nil : (buf, tooLong) }
            if c == 0x0A { return (buf, tooLong) }
            if buf.count < limit { buf.append(UInt8(truncatingIfNeeded: c)) } else { tooLong = true }
        }
    }
    public func produce(budget: Int, context: any StageContext) throws -> SourceProgress {
        if done { return .exhausted }
        let limits = context.limits
        for _ in 0..<budget {
            guard let (bytes, tooLong) = readLine(limit: limits.maxEnvelopeBytes * 2) else { done = true; return .exhausted }
            lineNo += 1
            if bytes.allSatisfy({ $0 == 0x20 || $0 == 0x09 || $0 == 0x0D }) { continue }
            if tooLong {
                context.deadLetter(Envelope(intent: "file-source.bad-line", payload: Array(bytes.prefix(1024))),
                                   reason: "\(path):\(lineNo): line longer than \(limits.maxEnvelopeBytes * 2) bytes")
                continue
            }
            let text = String(decoding: bytes, as: UTF8.self)
            do {
                var e = try EnvelopeJSONL.decode(text, limits: limits)
                if e.ingestNs == 0 { e.ingestNs = context.wallClockNs }
                context.emit(e, to: out)
            } catch {
                context.deadLetter(Envelope(intent: "file-source.bad-line", payload: bytes), reason: "\(path):\(lineNo): \(error.message)")
            }
        }
        return .active
    }
    public func stop() { if let f = file { fclose(f); file = nil } }
}
