import Glibc
import Synchronization

/// 64-bit words from the kernel's generator (`getrandom(2)`), fetched 4 KiB at a time and handed
/// out under one lock: random envelope ids cost one system call per 256 ids instead of two per
/// id (`SystemRandomNumberGenerator` asks the kernel for every word; the calls were a quarter of
/// the CPU of a generator without a seed). The words are as good as the kernel's; they are kept
/// in this process's memory until used, so nothing that must stay secret (keys, the HANDOFF
/// tokens) is drawn from here. Child processes are spawned with exec, never forked with a copy.
final class RandomPool: Sendable {
    static let shared = RandomPool()

    private struct Pool {
        var words = [UInt64](repeating: 0, count: 512)
        var used = 512
    }
    private let state = Mutex(Pool())

    /// Two fresh words.
    func pair() -> (UInt64, UInt64) {
        state.withLock { p in
            if p.used + 2 > p.words.count {
                Self.fill(&p.words)
                p.used = 0
            }
            defer { p.used += 2 }
            return (p.words[p.used], p.words[p.used + 1])
        }
    }

    typealias GetRandom = @convention(c) (UnsafeMutableRawPointer?, Int, UInt32) -> Int
    /// glibc's getrandom (not in Swift's Glibc module), looked up once.
    private static let getrandom: GetRandom? = {
        guard let h = dlopen(nil, RTLD_NOW), let f = dlsym(h, "getrandom") else { return nil }
        return unsafeBitCast(f, to: GetRandom.self)
    }()

    private static func fill(_ words: inout [UInt64]) {
        let got = words.withUnsafeMutableBytes { b -> Int in
            guard let base = b.baseAddress, let getrandom = Self.getrandom else { return 0 }
            var off = 0
            while off < b.count {
                let n = getrandom(base + off, b.count - off, 0)
                if n > 0 { off += n } else if n < 0 && errno == EINTR { continue } else { break }
            }
            return off
        }
        // getrandom cannot fail on Linux >= 3.17 once the pool is seeded; if it ever does, the
        // rest comes word by word from the system generator.
        if got < words.count * 8 {
            var g = SystemRandomNumberGenerator()
            for i in (got / 8)..<words.count { words[i] = g.next() }
        }
    }
}
