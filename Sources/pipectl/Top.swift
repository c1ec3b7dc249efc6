import ArgumentParser
import Foundation
import Glibc
import PipeKit
import PipeRuntime

struct Top: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A live view of a running host's stages and lanes: rates, depth bars, lane states, blocked time, errors. q quits.",
        discussion: """
        Lane states: normal (green), pressure-rising (yellow), overloaded (red), recovering (cyan).
        A lane whose depth bar ends in + holds more than its bound: the producer's queue or spill.
        --once prints one frame (no screen control, no colour unless --color) for scripts.
        """)
    @OptionGroup var host: HostOptions
    @Flag(help: "Print one frame and exit.") var once = false
    @Option(help: "Seconds between refreshes.") var interval: Double = 1
    @Flag(help: "Colour even when not writing to a terminal.") var color = false
    @Flag(name: .customLong("no-color"), help: "Never colour.") var noColor = false
    @Flag(name: .customLong("all"), help: "Include the dead-letter stage and lanes.") var all = false

    func validate() throws {
        if interval < 0.1 || interval > 3600 { throw ValidationError("--interval must be between 0.1 and 3600 seconds") }
    }

    func run() throws {
        let client = host.client()
        let useColor = !noColor && (color || (!once && isatty(STDOUT_FILENO) != 0)) && ProcessInfo.processInfo.environment["NO_COLOR"] == nil
        func frame() -> String {
            do {
                let status = try client.call("status"), lanes = try client.call("lanes")
                return TopFrame(status: status, lanes: lanes, color: useColor, all: all).render()
            } catch { fail("pipectl top: \(error)") }
        }
        if once { print(frame(), terminator: ""); return }
        guard isatty(STDIN_FILENO) != 0 else { fail("pipectl top: needs a terminal to read q from; use --once for scripts", code: 64) }
        let saved = RawTerminal.enter()
        defer { RawTerminal.leave(saved) }
        while true {
            let text = frame()
            FileHandle.standardOutput.write(Data(("\u{1B}[H\u{1B}[2J" + text.replacingOccurrences(of: "\n", with: "\r\n")).utf8))
            var p = pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0)
            if poll(&p, 1, Int32(interval * 1000)) > 0 {
                var c: UInt8 = 0
                if read(STDIN_FILENO, &c, 1) == 1, c == UInt8(ascii: "q") || c == UInt8(ascii: "Q") || c == 3 { break }
            }
        }
    }
}

/// Non-canonical, no-echo input so one key press (q) is read at once; restored on exit.
enum RawTerminal {
    nonisolated(unsafe) static var saved = termios()
    static func enter() -> termios {
        var t = termios()
        tcgetattr(STDIN_FILENO, &t)
        saved = t
        var raw = t
        raw.c_lflag &= ~tcflag_t(ICANON | ECHO)
        tcsetattr(STDIN_FILENO, TCSANOW, &raw)
        FileHandle.standardOutput.write(Data("\u{1B}[?25l".utf8))   // hide the cursor
        signal(SIGINT) { _ in RawTerminal.leave(RawTerminal.saved); exit(0) }
        signal(SIGTERM) { _ in RawTerminal.leave(RawTerminal.saved); exit(0) }
        return t
    }
    static func leave(_ t: termios) {
        var t = t
        tcsetattr(STDIN_FILENO, TCSANOW, &t)
        FileHandle.standardOutput.write(Data("\u{1B}[?25h\n".utf8))
    }
}

/// One screen of `pipectl top`.
struct TopFrame {
    let status: ConfigValue
    let lanes: ConfigValue
    let color: Bool
    let all: Bool

    func paint(_ s: String, _ code: String) -> String { color ? "\u{1B}[\(code)m\(s)\u{1B}[0m" : s }
    func stateColor(_ s: String) -> String {
        switch s { case "overloaded": return "31;1"; case "pressure-rising": return "33"; case "recovering": return "36"; default: return "32" }
    }
    static func rate(_ d: Double?) -> String { LaneTable.rate(d) }
    static func pct(_ d: Double?) -> String { d.map { String(format: "%.0f%%", $0) } ?? "-" }
    static func us(_ d: Double?) -> String {
        guard let d else { return "-" }
        return d >= 1000 ? String(format: "%.1fms", d / 1000) : String(format: "%.0fus", d)
    }

    /// `[#####.....] 512/1024`, `+` at the end when the depth exceeds the bound.
    static func bar(_ depth: Int64, _ bound: Int64, width: Int = 16) -> String {
        let f = bound > 0 ? min(1, Double(depth) / Double(bound)) : 0
        let n = Int((f * Double(width)).rounded())
        return "[" + String(repeating: "#", count: n) + String(repeating: ".", count: width - n) + (depth > bound ? "+" : "]")
    }

    /// Pads to `width` ignoring colour codes.
    func cell(_ plain: String, _ shown: String, _ width: Int) -> String {
        shown + String(repeating: " ", count: max(0, width - plain.count))
    }

    func render() -> String {
        let h = status["host"] ?? .null
        var out = "pipehost top: pipeline \(h["pipeline"]?.stringValue ?? "?"), pid \(h["pid"]?.intValue ?? 0), "
        out += "\(h["state"]?.stringValue ?? "?"), up \(String(format: "%.1f", h["uptime_s"]?.doubleValue ?? 0)) s, "
        out += "\(h["audit_records"]?.intValue ?? 0) audit records" + (color ? "   (q quits)" : "") + "\n\n"

        let stages = (status["stages"]?.listValue ?? []).filter { all || !($0["id"]?.stringValue ?? "").hasPrefix("_") }
        let sh = ["STAGE", "KIND", "PLACEMENT", "STATE", "IN/S", "OUT/S", "BUSY", "DEAD", "ERRORS", "RESTARTS"]
        let srows = stages.map { s -> [String] in
            [s["id"]?.stringValue ?? "", s["kind"]?.stringValue ?? "", s["placement"]?.stringValue ?? "", s["state"]?.stringValue ?? "",
             Self.rate(s["rate_in"]?.doubleValue), Self.rate(s["rate_out"]?.doubleValue), Self.pct(s["busy_pct"]?.doubleValue),
             String(s["dead_lettered"]?.intValue ?? 0), String(s["errors"]?.intValue ?? 0), String(s["restarts"]?.intValue ?? 0)]
        }
        out += table(sh, srows) { row, col, text in
            if col == 3 && (row[3] == "failed" || row[3].hasPrefix("down")) { return paint(text, "31;1") }
            if col == 3 && row[3].hasPrefix("blocked") { return paint(text, "33") }
            if (col == 8 || col == 9) && row[col] != "0" { return paint(text, "31") }
            return text
        }
        if let line = StageTable.bottleneckLine(status) { out += paint(line, "33;1") + "\n" }
        out += "\n"
        let list = (lanes.listValue ?? []).filter { all || !($0["to"]?.stringValue ?? "").hasPrefix("_dead_letters.") }
        let lh = ["LANE", "FROM -> TO", "STATE", "DEPTH", "", "IN/S", "OUT/S", "BLOCKED", "DROPPED", "SPILLED", "P99"]
        let lrows = list.map { l -> [String] in
            let depth = l["depth"]?.intValue ?? 0, bound = l["bound"]?.intValue ?? 0
            return [String(l["id"]?.intValue ?? 0), "\(l["from"]?.stringValue ?? "") -> \(l["to"]?.stringValue ?? "")", l["state"]?.stringValue ?? "",
                    Self.bar(depth, bound), "\(depth)/\(bound)", Self.rate(l["rate_in"]?.doubleValue), Self.rate(l["rate_out"]?.doubleValue),
                    Self.pct(l["blocked_pct"]?.doubleValue), String(l["dropped"]?.intValue ?? 0), String(l["spill_depth"]?.intValue ?? 0),
                    Self.us(l["latency_p99_us"]?.doubleValue)]
        }
        out += table(lh, lrows) { row, col, text in
            if col == 2 || col == 3 { return paint(text, stateColor(row[2])) }
            if col == 8 && row[8] != "0" { return paint(text, "33") }
            return text
        }
        return out
    }

    /// A table whose cells may be coloured without breaking the alignment.
    func table(_ header: [String], _ rows: [[String]], style: ([String], Int, String) -> String) -> String {
        var widths = header.map(\.count)
        for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
        var s = header.enumerated().map { i, c in cell(c, paint(c, "1"), widths[i]) }.joined(separator: "  ") + "\n"
        for r in rows {
            s += r.enumerated().map { i, c in cell(c, style(r, i, c), widths[i]) }.joined(separator: "  ") + "\n"
        }
        return s
    }
}
