import PipeKit
import Synchronization

/// Batches of envelopes handed between stages of one process (docs/wire-format.md, "HANDOFF").
///
/// On an in-process lane the producer does not encode its batch: it leaves the envelopes here
/// under a random token and sends a HANDOFF frame naming the token over the lane's ZeroMQ socket,
/// in order with the lane's other frames and under the same credits. The consumer takes the batch
/// back by the token. Envelopes are copy-on-write values, so the two threads never share one
/// mutably. A token is only ever valid inside the process that made it: a HANDOFF frame naming one
/// that is not here (one forged on an ipc or tcp connection, or already taken) is refused.
final class LocalHandoff: Sendable {
    static let shared = LocalHandoff()

    struct Batch: Sendable {
        /// Who may take it: the ZeroMQ context the lane lives in (inproc endpoints are per context,
        /// so lane ids of pipelines running side by side in one process do not mix) and the lane.
        let context: ObjectIdentifier
        let lane: UInt32
        let envelopes: [Envelope]
    }

    private let state = Mutex<[UInt64: Batch]>([:])

    init() {}

    /// Leaves a batch and returns its token (never 0).
    func put(_ envelopes: consuming [Envelope], context: ObjectIdentifier, lane: UInt32) -> UInt64 {
        let b = Batch(context: context, lane: lane, envelopes: envelopes)
        // From the system's generator (getrandom), one call per batch: a token seen cannot
        // predict the next one.
        var g = SystemRandomNumberGenerator()
        return state.withLock { s in
            var t: UInt64 = 0
            repeat { t = g.next() } while t == 0 || s[t] != nil
            s[t] = b
            return t
        }
    }

    /// Takes the batch with `token` if it was left for this context, lane and count; else nil
    /// (and the table is left as it was).
    func take(_ token: UInt64, context: ObjectIdentifier, lane: UInt32, count: Int) -> [Envelope]? {
        state.withLock { s in
            guard let b = s[token], b.context == context, b.lane == lane, b.envelopes.count == count else { return nil }
            s[token] = nil
            return b.envelopes
        }
    }

    /// Drops what was left for `lanes` (nil: all lanes) of `context` and never taken: a consumer
    /// that stops before reading them (an abort), and, when the host is done, whatever an abort
    /// raced into the table after that. Returns how many envelopes went.
    @discardableResult
    func discard(context: ObjectIdentifier, lanes: Set<UInt32>? = nil) -> Int {
        state.withLock { s in
            var n = 0
            for (t, b) in s where b.context == context && (lanes?.contains(b.lane) ?? true) {
                n += b.envelopes.count
                s[t] = nil
            }
            return n
        }
    }

    /// Batches waiting, for tests.
    var waiting: Int { state.withLock { $0.count } }
}
