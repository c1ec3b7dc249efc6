import Glibc
import PipeKit

/// Runs one allow-listed program with argv (never a shell), a timeout and an output limit.
/// stdout and stderr are read as they come (a full pipe never stalls the child); past the limit
/// the output is cut and the rest discarded; past the timeout the child's process group is killed.
enum CommandRunner {
    struct Result {
        var exitStatus: Int32?      // nil when killed or not started
        var signal: Int32?
        var stdout: [UInt8]
        var truncated: Bool
        var timedOut: Bool
        var elapsedNs: UInt64
        var spawnError: String?
    }

    typealias Pipe2 = @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> Int32
    /// glibc's pipe2 (not in Swift's Glibc module): the pipe is close-on-exec from birth, so a
    /// process another thread spawns meanwhile cannot inherit it (and hold our reader open).
    static let pipe2: Pipe2? = {
        guard let h = dlopen(nil, RTLD_NOW), let f = dlsym(h, "pipe2") else { return nil }
        return unsafeBitCast(f, to: Pipe2.self)
    }()

    static func makePipe(_ fds: inout [Int32]) -> Bool {
        if let p2 = pipe2 { return fds.withUnsafeMutableBufferPointer { b in b.baseAddress.map { p2($0, O_CLOEXEC) == 0 } ?? false } }
        guard pipe(&fds) == 0 else { return false }
        for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
        return true
    }

    static func run(_ argv: [String], timeoutNs: UInt64, maxOutput: Int) -> Result {
        let t0 = monotonicNs()
        var fds: [Int32] = [0, 0]
        guard makePipe(&fds) else {
            return Result(stdout: [], truncated: false, timedOut: false, elapsedNs: 0, spawnError: "pipe: \(String(cString: strerror(errno)))")
        }
        // The child gets the write end as 1 and 2 (dup2 clears close-on-exec on those).
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attr, 0)
        var empty = sigset_t(); sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attr, &empty)
        var defaults = sigset_t(); sigfillset(&defaults)
        posix_spawnattr_setsigdefault(&attr, &defaults)
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var env: [UnsafeMutablePointer<CChar>?] = [strdup("PATH=/usr/bin:/bin"), strdup("LANG=C.UTF-8"), nil]
        defer { for p in env { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, argv[0], &actions, &attr, &cargs, &env)
        close(fds[1])
        guard rc == 0 else {
            close(fds[0])
            return Result(stdout: [], truncated: false, timedOut: false, elapsedNs: monotonicNs() - t0,
                          spawnError: "cannot start \(argv[0]): \(String(cString: strerror(rc)))")
        }
        var out: [UInt8] = []
        var truncated = false, timedOut = false
        var buf = [UInt8](repeating: 0, count: 16384)
        let deadline = t0 + timeoutNs
        var open = true
        while open {
            let now = monotonicNs()
            if now >= deadline { timedOut = true; break }
            var pfd = pollfd(fd: fds[0], events: Int16(POLLIN), revents: 0)
            let waitMs = Int32(min(1000, (deadline - now) / 1_000_000 + 1))
            let n = poll(&pfd, 1, waitMs)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { continue }
            let r = read(fds[0], &buf, buf.count)
            if r > 0 {
                let room = maxOutput - out.count
                if room > 0 { out.append(contentsOf: buf.prefix(min(room, r))) }
                if r > room { truncated = true }
            } else if r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN) {
                open = false
            }
        }
        close(fds[0])
        var status: Int32 = 0
        /// Reaps the child (retrying on EINTR); false when it cannot be waited for at all.
        func reap(_ flags: Int32) -> Int32 {
            while true {
                let rc = waitpid(pid, &status, flags)
                if rc == -1 && errno == EINTR { continue }
                return rc
            }
        }
        var reaped = false
        if timedOut {
            kill(-pid, SIGKILL)
            reaped = reap(0) == pid
        } else {
            // Output closed: the child is exiting (or closed its stdout); wait within the deadline.
            while true {
                let rc = reap(WNOHANG)
                if rc == pid { reaped = true; break }
                if rc == -1 { break }
                if monotonicNs() >= deadline { timedOut = true; kill(-pid, SIGKILL); reaped = reap(0) == pid; break }
                usleep(1000)
            }
        }
        if !reaped {
            return Result(stdout: out, truncated: truncated, timedOut: timedOut, elapsedNs: monotonicNs() - t0,
                          spawnError: "cannot wait for \(argv[0]): \(String(cString: strerror(errno)))")
        }
        let elapsed = monotonicNs() - t0
        let exited = status & 0x7f == 0
        return Result(exitStatus: !timedOut && exited ? (status >> 8) & 0xff : nil,
                      signal: exited ? nil : status & 0x7f, stdout: out, truncated: truncated,
                      timedOut: timedOut, elapsedNs: elapsed, spawnError: nil)
    }
}
