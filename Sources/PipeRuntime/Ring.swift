/// A FIFO queue over one contiguous buffer with a moving head: our per-lane sender queue.
///
/// Items live in `[head, tail)`; the first `n` are always contiguous (DATA frames are written
/// straight from them), and ``takeFirst(_:)`` moves them out without touching their reference
/// counts (an in-process handoff passes them on as they are). A value type (copy-on-write).
struct Ring<T> {
    final class Buffer {
        var base: UnsafeMutablePointer<T>
        var capacity: Int
        var head = 0
        var tail = 0
        init(capacity: Int) {
            self.capacity = capacity
            base = .allocate(capacity: capacity)
        }
        deinit {
            (base + head).deinitialize(count: tail - head)
            base.deallocate()
        }
        func copy() -> Buffer {
            let c = Buffer(capacity: Swift.max(16, tail - head))
            c.base.initialize(from: base + head, count: tail - head)
            c.tail = tail - head
            return c
        }
        /// Room for one more at the tail: slide the items to the front, or grow.
        func makeRoom() {
            let n = tail - head
            if n * 2 <= capacity && head > 0 {
                base.moveInitialize(from: base + head, count: n)
            } else {
                let bigger = UnsafeMutablePointer<T>.allocate(capacity: capacity * 2)
                bigger.moveInitialize(from: base + head, count: n)
                base.deallocate()
                base = bigger
                capacity *= 2
            }
            head = 0; tail = n
        }
    }
    private var b = Buffer(capacity: 16)

    @inline(__always) private mutating func unique() { if !isKnownUniquelyReferenced(&b) { b = b.copy() } }

    var count: Int { b.tail - b.head }
    var isEmpty: Bool { b.head == b.tail }

    mutating func append(_ x: consuming T) {
        unique()
        if b.tail == b.capacity { b.makeRoom() }
        (b.base + b.tail).initialize(to: x)
        b.tail += 1
    }

    func peek(_ i: Int) -> T {
        precondition(i >= 0 && i < count, "Ring.peek out of range")
        return b.base[b.head + i]
    }

    /// The first `n` items (at most all), contiguous, borrowed for `body`.
    func withFirst<R>(_ n: Int, _ body: (UnsafeBufferPointer<T>) -> R) -> R {
        body(UnsafeBufferPointer(start: b.base + b.head, count: Swift.max(0, Swift.min(n, count))))
    }

    mutating func removeFirst(_ n: Int = 1) {
        unique()
        let k = Swift.max(0, Swift.min(n, count))
        (b.base + b.head).deinitialize(count: k)
        b.head += k
        if b.head == b.tail { b.head = 0; b.tail = 0 }
    }

    /// Moves the first `n` items (at most all) out, in order.
    mutating func takeFirst(_ n: Int) -> [T] {
        unique()
        let k = Swift.max(0, Swift.min(n, count))
        let buf = b
        let out = [T](unsafeUninitializedCapacity: k) { dst, c in
            if let d = dst.baseAddress { d.moveInitialize(from: buf.base + buf.head, count: k) }
            c = k
        }
        b.head += k
        if b.head == b.tail { b.head = 0; b.tail = 0 }
        return out
    }

    /// Puts `items` back at the front, ahead of what is queued (undoes a ``takeFirst(_:)``).
    mutating func putBack(_ items: [T]) {
        guard !items.isEmpty else { return }
        unique()
        let k = items.count, n = count
        if b.head < k {
            // Not enough free slots before the head: rebuild with `items` first.
            let cap = Swift.max(b.capacity, (n + k) * 2)
            let fresh = UnsafeMutablePointer<T>.allocate(capacity: cap)
            (fresh + k).moveInitialize(from: b.base + b.head, count: n)
            b.base.deallocate()
            b.base = fresh; b.capacity = cap
            b.head = k; b.tail = k + n
        }
        b.head -= k
        items.withUnsafeBufferPointer { src in
            if let s = src.baseAddress { (b.base + b.head).initialize(from: s, count: k) }
        }
    }
}
