/// The envelope signature's coverage (docs/wire-format.md, "Envelope signature"): the fields no
/// stage rewrites. `rank`, `lane`, `hops`, `attempt`, `ingest_ns`, `clock` and `attrs` change on
/// the way and are not covered.
extension Envelope {
    /// Domain tag that starts the signed bytes, so a signature over an envelope is never valid
    /// for any other kind of message signed with the same key.
    public static let signingDomain = Array("pipe.sig.v1".utf8)

    /// `"pipe.sig.v1" || id (16) || u8 has_parent || parent (16, if any) || u32 len || actor ||
    /// u32 len || intent || u32 len || authority || u32 len || payload`, lengths little-endian.
    public var signingBytes: [UInt8] {
        var w = ByteWriter(capacity: 96 + actor.utf8.count + intent.utf8.count + authority.utf8.count + payloadCount)
        w.bytes(Self.signingDomain)
        w.bytes(id.bytes)
        if let p = parent { w.u8(1); w.bytes(p.bytes) } else { w.u8(0) }
        for s in [actor, intent, authority] {
            w.u32(UInt32(truncatingIfNeeded: s.utf8.count)); w.bytes(s.utf8)
        }
        w.u32(UInt32(truncatingIfNeeded: payloadCount))
        withPayloadBytes { w.bytes($0) }
        return w.buffer
    }
}
