import PipeKit

/// A hash table from (envelope id, tag) to an `Int32`, for the delivery bookkeeping's hot path:
/// open addressing with linear probing and backward-shift deletion, no per-entry allocation and
/// no SipHash (which cost more than half of what acknowledgements cost: docs/delivery.md,
/// "Performance"). Ids are random or SHA-256-derived; a per-process random key is mixed in
/// before the multiply so that chosen ids (a file source's input) cannot aim at one bucket run.
struct IDTable {
    private struct Slot {
        var hi: UInt64
        var lo: UInt64
        var tag: Int32
        var value: Int32
    }
    private static let empty = Int32.min
    private static let processKey: (UInt64, UInt64) = {
        var g = SystemRandomNumberGenerator()
        return (g.next() | 1, g.next())
    }()
    /// The process key, copied (reading a global costs a `swift_once` check per hash).
    private let key: (UInt64, UInt64)
    private var slots: [Slot]
    private var mask: Int
    private(set) var count = 0

    init(capacity: Int = 1024) {
        var n = 16
        while n < capacity * 2 { n <<= 1 }
        slots = Array(repeating: Slot(hi: 0, lo: 0, tag: Self.empty, value: 0), count: n)
        mask = n - 1
        key = Self.processKey
    }

    var isEmpty: Bool { count == 0 }

    @inline(__always) private func home(_ hi: UInt64, _ lo: UInt64, _ tag: Int32) -> Int {
        let t = UInt64(UInt32(bitPattern: tag)) << 17
        let x = (lo ^ key.1 ^ (hi &* 0x9E37_79B9_7F4A_7C15) ^ t) &* key.0
        let y = (x ^ (x >> 29)) &* 0xBF58_476D_1CE4_E5B9
        return Int(truncatingIfNeeded: y >> 32) & mask
    }

    @inline(__always) private func find(_ hi: UInt64, _ lo: UInt64, _ tag: Int32) -> Int? {
        var i = home(hi, lo, tag)
        while true {
            let s = slots[i]
            if s.tag == Self.empty { return nil }
            if s.lo == lo && s.hi == hi && s.tag == tag { return i }
            i = (i + 1) & mask
        }
    }

    func value(_ id: EnvelopeID, tag: Int32 = 0) -> Int32? { find(id.hi, id.lo, tag).map { slots[$0].value } }
    func contains(_ id: EnvelopeID, tag: Int32 = 0) -> Bool { find(id.hi, id.lo, tag) != nil }

    /// Inserts; when the key is there already, leaves it and returns its value.
    @discardableResult
    mutating func insert(_ id: EnvelopeID, tag: Int32 = 0, value: Int32) -> Int32? {
        precondition(tag != Self.empty)
        if (count + 1) * 2 > slots.count { grow() }
        var i = home(id.hi, id.lo, tag)
        while true {
            let s = slots[i]
            if s.tag == Self.empty { break }
            if s.lo == id.lo && s.hi == id.hi && s.tag == tag { return s.value }
            i = (i + 1) & mask
        }
        slots[i] = Slot(hi: id.hi, lo: id.lo, tag: tag, value: value)
        count += 1
        return nil
    }

    /// Sets the value of a key that is present.
    mutating func update(_ id: EnvelopeID, tag: Int32 = 0, value: Int32) {
        if let i = find(id.hi, id.lo, tag) { slots[i].value = value }
    }

    /// Removes a key; returns its value.
    @discardableResult
    mutating func remove(_ id: EnvelopeID, tag: Int32 = 0) -> Int32? {
        guard var i = find(id.hi, id.lo, tag) else { return nil }
        let v = slots[i].value
        // Backward shift: pull later members of the run into the hole when their home allows.
        var j = i
        while true {
            j = (j + 1) & mask
            let s = slots[j]
            if s.tag == Self.empty { break }
            let h = home(s.hi, s.lo, s.tag)
            // Can s move to i? Only if i lies cyclically in [h, j).
            let fits = i <= j ? (h <= i || h > j) : (h <= i && h > j)
            if fits { slots[i] = s; i = j }
        }
        slots[i].tag = Self.empty
        count -= 1
        return v
    }

    /// Every entry, for the rare whole-table walks (a consumer restarted).
    func forEach(_ body: (EnvelopeID, Int32, Int32) -> Void) {
        for s in slots where s.tag != Self.empty { body(EnvelopeID(hi: s.hi, lo: s.lo), s.tag, s.value) }
    }

    mutating func removeAll(where drop: (EnvelopeID, Int32, Int32) -> Bool) {
        var keep: [Slot] = []
        for s in slots where s.tag != Self.empty && !drop(EnvelopeID(hi: s.hi, lo: s.lo), s.tag, s.value) { keep.append(s) }
        self = IDTable(capacity: max(keep.count, slots.count / 2))
        for s in keep { insert(EnvelopeID(hi: s.hi, lo: s.lo), tag: s.tag, value: s.value) }
    }

    private mutating func grow() {
        let old = slots
        slots = Array(repeating: Slot(hi: 0, lo: 0, tag: Self.empty, value: 0), count: old.count * 2)
        mask = slots.count - 1
        count = 0
        for s in old where s.tag != Self.empty { insert(EnvelopeID(hi: s.hi, lo: s.lo), tag: s.tag, value: s.value) }
    }
}
