/// A FIFO queue over an array with a moving head: our per-lane sender queue.
struct Ring<T> {
    private var items: [T] = []
    private var head = 0
    var count: Int { items.count - head }
    var isEmpty: Bool { head == items.count }
    mutating func append(_ x: T) { items.append(x) }
    func peek(_ i: Int) -> T { items[head + i] }
    /// The first `n` items, contiguous, borrowed for `body`.
    func withFirst<R>(_ n: Int, _ body: (UnsafeBufferPointer<T>) -> R) -> R {
        items.withUnsafeBufferPointer { body(UnsafeBufferPointer(rebasing: $0[head..<(head + n)])) }
    }
    mutating func removeFirst(_ n: Int = 1) {
        head += n
        if head == items.count { items.removeAll(keepingCapacity: true); head = 0 }
        else if head > 1024 && head * 2 > items.count { items.removeFirst(head); head = 0 }
    }
}
