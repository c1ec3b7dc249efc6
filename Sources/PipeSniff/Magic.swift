import CMagic
import PipeKit

/// A libmagic handle. Threading rule: one thread at a time (libmagic cookies are not thread-safe),
/// so each stage instance opens its own.
public final class MagicDetector: @unchecked Sendable {
    // @unchecked: confined to its owning stage's thread, per the rule above.
    let cookie: OpaquePointer

    public struct MagicError: Error, Sendable, CustomStringConvertible {
        public let message: String
        public var description: String { message }
    }

    /// Opens libmagic with the system database, answering MIME types.
    public init(mime: Bool = true) throws(MagicError) {
        guard let c = magic_open(mime ? MAGIC_MIME_TYPE : MAGIC_NONE) else { throw MagicError(message: "magic_open failed") }
        guard magic_load(c, nil) == 0 else {
            let msg = magic_error(c).map { String(cString: $0) } ?? "magic_load failed"
            magic_close(c)
            throw MagicError(message: msg)
        }
        cookie = c
    }
    deinit { magic_close(cookie) }

    /// libmagic's answer for `bytes` (e.g. `application/json`), or nil on error.
    public func describe(_ bytes: [UInt8]) -> String? {
        bytes.withUnsafeBytes { p -> String? in
            guard let r = magic_buffer(cookie, p.baseAddress, p.count) else { return nil }
            return String(cString: r)
        }
    }

    /// libmagic's answer for the bytes in `p`, or nil on error.
    public func describe(_ p: UnsafeRawBufferPointer) -> String? {
        guard let r = magic_buffer(cookie, p.baseAddress, p.count) else { return nil }
        return String(cString: r)
    }
}
