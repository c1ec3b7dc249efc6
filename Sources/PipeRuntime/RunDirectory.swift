import Foundation
import Glibc

/// Where a host keeps its run files, and how `pipectl` finds them (docs/operations.md):
/// 1. `--run-dir DIR` (host and pipectl), else
/// 2. `$PIPEHOST_RUN_DIR`, else
/// 3. `$XDG_RUNTIME_DIR/pipehost/<pipeline>` when XDG_RUNTIME_DIR is set, else `/tmp/pipehost-<uid>/<pipeline>`.
/// pipectl with neither flag nor variable looks at every `<base>/*/control.sock` whose `host.pid`
/// is alive: exactly one is used; several are listed and it asks for `--run-dir`.
public enum RunDirectory {
    public static var base: String {
        if let x = ProcessInfo.processInfo.environment["XDG_RUNTIME_DIR"], !x.isEmpty { return x + "/pipehost" }
        return "/tmp/pipehost-\(getuid())"
    }

    public static func forPipeline(_ name: String, explicit: String?) -> String {
        if let e = explicit, !e.isEmpty { return absolute(e) }
        if let e = ProcessInfo.processInfo.environment["PIPEHOST_RUN_DIR"], !e.isEmpty { return absolute(e) }
        return base + "/" + name
    }

    public static func absolute(_ p: String) -> String {
        if p.hasPrefix("/") { return p }
        return FileManager.default.currentDirectoryPath + "/" + p
    }

    /// Creates the directory (and parents) with mode 0700.
    public static func create(_ path: String) throws(RuntimeError) {
        do { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700]) }
        catch { throw .io("cannot create run directory \(path): \(error.localizedDescription)") }
        chmod(path, 0o700)
    }

    public static func controlEndpoint(_ runDir: String) -> String { "ipc://\(runDir)/control.sock" }

    /// Run directories of live hosts under `base`.
    public static func live() -> [String] {
        let b = base
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: b) else { return [] }
        return names.sorted().map { b + "/" + $0 }.filter { dir in
            guard FileManager.default.fileExists(atPath: dir + "/control.sock"),
                  let pidText = try? String(contentsOfFile: dir + "/host.pid", encoding: .utf8),
                  let pid = Int32(pidText.trimmingCharacters(in: .whitespacesAndNewlines)) else { return false }
            return kill(pid, 0) == 0 || errno == EPERM
        }
    }
}
