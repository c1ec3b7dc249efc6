import CSodium
import Foundation
import PipeKit

/// The sealed container (docs/sealed-container.md): a TBZ v2 header, a JSON manifest signed
/// with Ed25519, then the content in blocks, each signed and bound to the manifest's hash and to
/// its own index, so a block cannot be edited, dropped, reordered or moved to another container.
///
/// ```
/// "TBZ" 02 00 <flags=00> 00 | format=01 | u32 manifest length | manifest | sig(manifest)
/// then per block: u32 length | data | sig("tbz-block-v1\0" || sha256(manifest) || u32 index || data)
/// ```
/// Integers are big-endian. The manifest signature covers `"tbz-manifest-v1\0" || manifest`.
public enum SealedContainer {
    public static let header: [UInt8] = [0x54, 0x42, 0x5A, 0x02, 0x00, 0x00, 0x00]
    public static let formatVersion: UInt8 = 1
    public static let blockSize = 64 * 1024
    public static let maxManifestBytes = 1 << 20
    public static let maxBlockBytes = 1 << 20
    static let manifestDomain = Array("tbz-manifest-v1\0".utf8)
    static let blockDomain = Array("tbz-block-v1\0".utf8)

    /// One file inside a container: its relative path, mode bits and byte count.
    public struct Entry: Sendable, Equatable {
        public var path: String
        public var mode: Int
        public var size: Int
        public init(path: String, mode: Int = 0o644, size: Int) { self.path = path; self.mode = mode; self.size = size }
    }

    /// What a container says about itself.
    public struct Manifest: Sendable, Equatable {
        /// The surface: the name the container was sealed as, and its profile.
        public var surfaceName: String
        public var profile: String
        /// The signer's Ed25519 public key (32 bytes).
        public var signer: [UInt8]
        public var createdNs: UInt64
        public var entries: [Entry]
        public var blockCount: Int

        func json() -> [UInt8] {
            let surface = ConfigValue.object([("name", .string(surfaceName)), ("profile", .string(profile))])
            let list: [ConfigValue] = entries.map { e in
                ConfigValue.object([("path", .string(e.path)), ("mode", .int(Int64(e.mode))), ("size", .int(Int64(e.size)))])
            }
            var pairs: [(String, ConfigValue)] = [("format", .string("tbz-seal")), ("version", .int(Int64(SealedContainer.formatVersion)))]
            pairs.append(("surface", surface))
            pairs.append(("signer", .string(Hex.encode(signer))))
            pairs.append(("created_ns", .int(Int64(clamping: createdNs))))
            pairs.append(("block_size", .int(Int64(SealedContainer.blockSize))))
            pairs.append(("block_count", .int(Int64(blockCount))))
            pairs.append(("entries", .list(list)))
            var o: [UInt8] = []
            JSON.write(ConfigValue.object(pairs), into: &o)
            return o
        }

        init(surfaceName: String, profile: String, signer: [UInt8], createdNs: UInt64, entries: [Entry], blockCount: Int) {
            self.surfaceName = surfaceName; self.profile = profile; self.signer = signer; self.createdNs = createdNs
            self.entries = entries; self.blockCount = blockCount
        }

        init(parsing bytes: [UInt8]) throws(SealError) {
            let v: ConfigValue
            do { v = try JSON.parse(bytes: bytes, maxDepth: 8) } catch { throw SealError(message: "manifest is not JSON: \(error.message)") }
            guard v["format"]?.stringValue == "tbz-seal" else { throw SealError(message: "manifest format is not tbz-seal") }
            guard v["version"]?.intValue == Int64(SealedContainer.formatVersion) else {
                throw SealError(message: "manifest version \(v["version"].map { JSON.serialize($0) } ?? "missing") is not supported (expected \(SealedContainer.formatVersion))")
            }
            guard let name = v["surface"]?["name"]?.stringValue, let profile = v["surface"]?["profile"]?.stringValue else {
                throw SealError(message: "manifest has no surface name and profile")
            }
            guard let signerHex = v["signer"]?.stringValue, let signer = Hex.decode(signerHex), signer.count == 32 else {
                throw SealError(message: "manifest signer is not a 32-byte hex public key")
            }
            guard let count = v["block_count"]?.intValue, count >= 0, count <= 1 << 24 else { throw SealError(message: "manifest block_count missing or out of range") }
            guard v["block_size"]?.intValue == Int64(SealedContainer.blockSize) else { throw SealError(message: "manifest block_size is not \(SealedContainer.blockSize)") }
            var entries: [Entry] = []
            for (i, e) in (v["entries"]?.listValue ?? []).enumerated() {
                guard let p = e["path"]?.stringValue, let size = e["size"]?.intValue, size >= 0 else {
                    throw SealError(message: "manifest entry \(i) has no path or size")
                }
                if let why = SealedContainer.unsafePathReason(p) { throw SealError(message: "manifest entry \(i) path '\(p)': \(why)") }
                entries.append(Entry(path: p, mode: Int(e["mode"]?.intValue ?? 0o644) & 0o777, size: Int(size)))
            }
            self.init(surfaceName: name, profile: profile, signer: signer,
                      createdNs: UInt64(clamping: v["created_ns"]?.intValue ?? 0), entries: entries, blockCount: Int(count))
        }

        /// The key id (first 8 bytes of the signer key, hex), as in envelope signatures.
        public var signerID: String { Hex.encode(signer.prefix(8)) }
    }

    /// A verified container: its manifest and the content of each entry.
    public struct Opened: Sendable {
        public var manifest: Manifest
        public var files: [(entry: Entry, data: [UInt8])]
    }

    static func sha256(_ bytes: [UInt8]) -> [UInt8] { Digest.sha256(bytes) }

    static func be32(_ v: Int) -> [UInt8] { [UInt8(v >> 24 & 0xFF), UInt8(v >> 16 & 0xFF), UInt8(v >> 8 & 0xFF), UInt8(v & 0xFF)] }

    /// Why `path` may not be unpacked (absolute, `..`, empty components, NUL), or nil.
    /// Checked on bytes, as the kernel sees the path (a `/` followed by a combining mark is one
    /// Swift character but two path components).
    public static func unsafePathReason(_ path: String) -> String? {
        let u = Array(path.utf8)
        if u.isEmpty { return "empty path" }
        if u.first == 0x2F { return "absolute path" }
        if u.contains(0) { return "NUL in path" }
        for c in u.split(separator: 0x2F, omittingEmptySubsequences: false) {
            if c.isEmpty { return "empty path component" }
            if c.elementsEqual([0x2E]) || c.elementsEqual([0x2E, 0x2E]) { return "'\(String(decoding: c, as: UTF8.self))' component" }
        }
        return nil
    }

    /// Seals `files` (relative path, mode, content) under a surface name and profile.
    public static func seal(files: [(path: String, mode: Int, data: [UInt8])], surfaceName: String, profile: String,
                            key: SigningKey, createdNs: UInt64) throws(SealError) -> [UInt8] {
        var stream: [UInt8] = []
        var entries: [Entry] = []
        for f in files {
            if let why = unsafePathReason(f.path) { throw SealError(message: "cannot seal '\(f.path)': \(why)") }
            entries.append(Entry(path: f.path, mode: f.mode & 0o777, size: f.data.count))
            stream.append(contentsOf: f.data)
        }
        let blockCount = (stream.count + blockSize - 1) / blockSize
        let manifest = Manifest(surfaceName: surfaceName, profile: profile, signer: key.publicKey, createdNs: createdNs,
                                entries: entries, blockCount: blockCount).json()
        guard manifest.count <= maxManifestBytes else { throw SealError(message: "manifest of \(manifest.count) bytes exceeds \(maxManifestBytes)") }
        let mhash = sha256(manifest)
        var out = header
        out.reserveCapacity(stream.count + manifest.count + blockCount * 68 + 80)
        out.append(formatVersion)
        out += be32(manifest.count)
        out += manifest
        out += key.sign(manifestDomain + manifest)
        for b in 0..<blockCount {
            let data = Array(stream[b * blockSize..<min(stream.count, (b + 1) * blockSize)])
            out += be32(data.count)
            out += data
            out += key.sign(blockDomain + mhash + be32(b) + data)
        }
        return out
    }

    /// Checks every signature and the layout; returns the manifest and contents, or why not.
    /// `trusted`: accepted signer keys (32 bytes each); empty means any signer whose signatures
    /// verify (self-consistency only: callers that decide trust pass their keys).
    public static func open(_ bytes: [UInt8], trusted: [[UInt8]] = []) throws(SealError) -> Opened {
        guard bytes.count >= header.count + 5, Array(bytes.prefix(header.count)) == header else {
            throw SealError(message: "not a sealed container (no TBZ v2 header)")
        }
        var at = header.count
        guard bytes[at] == formatVersion else { throw SealError(message: "container format \(bytes[at]) is not supported (expected \(formatVersion))") }
        at += 1
        func u32() throws(SealError) -> Int {
            guard at + 4 <= bytes.count else { throw SealError(message: "truncated at byte \(at)") }
            let v = Int(bytes[at]) << 24 | Int(bytes[at + 1]) << 16 | Int(bytes[at + 2]) << 8 | Int(bytes[at + 3])
            at += 4
            return v
        }
        func take(_ n: Int, _ what: String) throws(SealError) -> [UInt8] {
            guard n >= 0, at + n <= bytes.count else { throw SealError(message: "truncated in \(what) (needs \(n) bytes at \(at), \(bytes.count - at) left)") }
            defer { at += n }
            return Array(bytes[at..<at + n])
        }
        let mlen = try u32()
        guard mlen <= maxManifestBytes else { throw SealError(message: "manifest length \(mlen) exceeds \(maxManifestBytes)") }
        let manifestBytes = try take(mlen, "manifest")
        let msig = try take(64, "manifest signature")
        let manifest = try Manifest(parsing: manifestBytes)
        guard SigningKey.verify(msig, message: manifestDomain + manifestBytes, publicKey: manifest.signer) else {
            throw SealError(message: "manifest signature does not verify (signer \(manifest.signerID))")
        }
        if !trusted.isEmpty, !trusted.contains(manifest.signer) {
            throw SealError(message: "signer \(manifest.signerID) is not a trusted key")
        }
        let mhash = sha256(manifestBytes)
        var stream: [UInt8] = []
        for b in 0..<manifest.blockCount {
            let len = try u32()
            guard len > 0, len <= blockSize else { throw SealError(message: "block \(b) length \(len) out of range") }
            let data = try take(len, "block \(b)")
            let sig = try take(64, "block \(b) signature")
            guard SigningKey.verify(sig, message: blockDomain + mhash + be32(b) + data, publicKey: manifest.signer) else {
                throw SealError(message: "block \(b) signature does not verify")
            }
            stream += data
        }
        guard at == bytes.count else { throw SealError(message: "\(bytes.count - at) unexpected bytes after block \(manifest.blockCount)") }
        var total = 0
        for e in manifest.entries {
            let (t, o) = total.addingReportingOverflow(e.size)
            guard !o, t <= stream.count else { throw SealError(message: "entries declare more bytes than the blocks carry (\(stream.count))") }
            total = t
        }
        guard total == stream.count else { throw SealError(message: "entries declare \(total) bytes, blocks carry \(stream.count)") }
        var files: [(Entry, [UInt8])] = []
        var off = 0
        for e in manifest.entries { files.append((e, Array(stream[off..<off + e.size]))); off += e.size }
        return Opened(manifest: manifest, files: files)
    }

    /// Reads a file or a directory tree (regular files only, sorted, symlinks refused) for sealing.
    public static func collect(path: String) throws(SealError) -> [(path: String, mode: Int, data: [UInt8])] {
        var st = stat()
        guard lstat(path, &st) == 0 else { throw SealError(message: "cannot stat \(path): \(String(cString: strerror(errno)))") }
        func read(_ p: String) throws(SealError) -> [UInt8] {
            guard let d = FileManager.default.contents(atPath: p) else { throw SealError(message: "cannot read \(p)") }
            return [UInt8](d)
        }
        if st.st_mode & S_IFMT == S_IFREG {
            return [((path as NSString).lastPathComponent, Int(st.st_mode & 0o777), try read(path))]
        }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw SealError(message: "\(path) is neither a regular file nor a directory") }
        var out: [(String, Int, [UInt8])] = []
        guard let walker = FileManager.default.enumerator(atPath: path) else { throw SealError(message: "cannot list \(path)") }
        var rels: [String] = []
        while let r = walker.nextObject() as? String { rels.append(r) }
        for rel in rels.sorted() {
            let full = path + "/" + rel
            guard lstat(full, &st) == 0 else { throw SealError(message: "cannot stat \(full): \(String(cString: strerror(errno)))") }
            switch st.st_mode & S_IFMT {
            case S_IFREG: out.append((rel, Int(st.st_mode & 0o777), try read(full)))
            case S_IFDIR: continue
            case S_IFLNK: throw SealError(message: "\(full) is a symlink; a container holds regular files only")
            default: throw SealError(message: "\(full) is not a regular file")
            }
        }
        return out
    }

    /// Writes an opened container's files under `dir` (created), refusing unsafe paths and
    /// never overwriting an existing file.
    public static func unpack(_ opened: Opened, into dir: String) throws(SealError) -> [String] {
        var written: [String] = []
        do { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        catch { throw SealError(message: "cannot create \(dir): \(error.localizedDescription)") }
        for (e, data) in opened.files {
            if let why = unsafePathReason(e.path) { throw SealError(message: "refusing '\(e.path)': \(why)") }
            // Create each directory on the way, refusing any component that exists as a symlink or
            // a non-directory (so nothing already in `dir` can redirect a write outside it).
            var at = dir
            let parts = e.path.utf8.split(separator: 0x2F).map { String(decoding: $0, as: UTF8.self) }
            for comp in parts.dropLast() {
                at += "/" + comp
                var st = stat()
                if lstat(at, &st) == 0 {
                    guard st.st_mode & S_IFMT == S_IFDIR else { throw SealError(message: "refusing '\(e.path)': \(at) exists and is not a directory") }
                } else if mkdir(at, 0o755) != 0 && errno != EEXIST {
                    throw SealError(message: "cannot create \(at): \(String(cString: strerror(errno)))")
                }
            }
            let full = at + "/" + (parts.last ?? "")
            let fd = Glibc.open(full, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode_t(e.mode == 0 ? 0o644 : e.mode))
            guard fd >= 0 else { throw SealError(message: "cannot create \(full): \(String(cString: strerror(errno)))") }
            var done = 0
            var failure: String?
            while done < data.count {
                let n = data.withUnsafeBytes { raw -> Int in
                    guard let base = raw.baseAddress else { return 0 }
                    return Glibc.write(fd, base + done, raw.count - done)
                }
                if n < 0 { if errno == EINTR { continue }; failure = String(cString: strerror(errno)); break }
                done += n
            }
            if failure == nil && fsync(fd) != 0 { failure = String(cString: strerror(errno)) }
            close(fd)
            if let f = failure { unlink(full); throw SealError(message: "cannot write \(full): \(f)") }
            written.append(full)
        }
        return written
    }
}

extension KeyFiles {
    /// A public key given as 64 hex digits, or the path of a `.pub` file holding them.
    public static func loadPublicKey(_ spec: String) throws(SealError) -> [UInt8] {
        if spec.count == 64, let k = Hex.decode(spec) { return k }
        let text = try read(spec)
        guard let k = Hex.decode(text), k.count == 32 else { throw SealError(message: "\(spec): not a 32-byte hex Ed25519 public key") }
        return k
    }
}
