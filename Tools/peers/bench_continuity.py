"""Peer baseline: tibet-continuityd 0.5.6 (sniff + daemon intake), timed in the same run as ours.

Set up by Tools/peers.sh (tibet-continuityd==0.5.6 and tibet-drop==0.3.4 with --no-deps, plus
cryptography: the daemon imports tibet_continuityd.verify_fork -> tibet_drop on every arrival).
Run:  .build/peers-venv/bin/python Tools/peers/bench_continuity.py   (PEER_BENCH_SECONDS=N, default 3)

Cases:
  sniff  tibet_continuityd.sniff.sniff_payload(path) over an 11-file scenario mix written once
         to tmpfs (/dev/shm when writable). sniff_payload takes a Path and does exists/is_file/
         stat/open+read(16) per call, so the files are real; only the calls are timed (warm-up
         0.3 s, then PEER_BENCH_SECONDS). It uses an in-package magic table, not libmagic; we
         check that (python-magic not imported, no libmagic mapped into the process).
  e2e    the real daemon loop, ContinuityDaemon(DaemonConfig(...)).run(), in a background thread
         on a temp inbox: LaneWatcher (ctypes inotify, select timeout 0.1 s) -> ArrivalCoalescer
         (350 ms debounce, the default) -> ContinuityDaemon._on_arrival (time.sleep(0.05) settle,
         sniff_payload, causal-ID minting, JSONL audit append, INFO log line), and then
           mode "strict" (headline): non-sealed -> os.rename into quarantine_dir + strict-reject
             audit record; sealed-tbz -> verify_and_fork (tibet_drop.verify_bundle + trust kernel)
             + verify-fork audit record.
           mode "passive" (the daemon's default): sniff + audit only, nothing moves.
         After a warm-up batch (one copy of the mix), N files of the mix are written into the inbox
         in a burst; the clock runs from before the first write until the daemon has logged the
         last file's terminal step (its log line follows the audit write). files/s = N / that.
         "steady" = rate between the first and the last completed file (excludes the debounce).
         The daemon's log goes to /dev/null through a StreamHandler with the daemon's own format
         (so the INFO formatting cost stays), which is also how completion is observed.

Prints progress on stderr and exactly one JSON line on stdout.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

SECONDS = float(os.environ.get("PEER_BENCH_SECONDS", "3.0"))

from tibet_continuityd import __version__ as TCD_VERSION  # noqa: E402
from tibet_continuityd.sniff import sniff_payload  # noqa: E402
from tibet_continuityd.daemon import ContinuityDaemon, DaemonConfig  # noqa: E402


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scenario_mix() -> list[tuple[str, bytes]]:
    rng = random.Random(20260511)
    rnd = lambda n: bytes(rng.getrandbits(8) for _ in range(n))  # noqa: E731
    sealed = b"TBZ\x02\x00\x00\x00" + rnd(200)
    rand = rnd(256)
    # keep rand.bin "unknown": not a TBZ/ELF/MZ/PDF/JSON lead-in by accident
    while rand[:1] in (b"T", b"\x7f", b"M", b"%", b"{", b"[", b" ", b"\t", b"\n", b"\r"):
        rand = rnd(256)
    return [
        ("a.tza", sealed),
        ("report.txt", sealed),
        ("x.tza", b"\x7fELF" + rnd(200)),
        ("note.json", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n"),
        ("data.json", b'   {"a": 1}'),
        ("demo.claude", b"hello world"),
        ("empty.bin", b""),
        ("rand.bin", rand),
        ("script.sh", b"#!/bin/sh\necho hi\n"),
        ("a.part", b"half-written payload, writer still appending\n"),
        ("list.txt", b"[1,2,3]"),
    ]


def scratch_root() -> str:
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        return shm
    return tempfile.gettempdir()


def run_for(step, seconds: float, batch: int = 256, warmup: float = 0.3) -> tuple[int, float]:
    """Same scheme as ../shared/peer-bench/_harness.run_for, without printing to stdout."""
    i = 0
    t_end = time.perf_counter() + warmup
    while time.perf_counter() < t_end:
        for _ in range(batch):
            step(i)
            i += 1
    ops = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    now = t0
    while now < deadline:
        for _ in range(batch):
            step(i)
            i += 1
        ops += batch
        now = time.perf_counter()
    return ops, now - t0


def libmagic_in_use() -> bool:
    if "magic" in sys.modules:
        return True
    try:
        with open("/proc/self/maps") as f:
            return "libmagic" in f.read()
    except OSError:
        return False


# ─── sniff ──────────────────────────────────────────────────────


def bench_sniff(root: str) -> dict:
    d = Path(tempfile.mkdtemp(prefix="tcd-sniff-", dir=root))
    try:
        paths = []
        for name, data in scenario_mix():
            p = d / name
            p.write_bytes(data)
            paths.append(p)
        for p in paths:
            r = sniff_payload(p)
            note(f"   {p.name:12s} -> {r.intake_class.value:18s} {r.disposition_hint}")
        n = len(paths)

        def step(i: int) -> None:
            sniff_payload(paths[i % n])

        ops, elapsed = run_for(step, SECONDS)
        rate = ops / elapsed
        note(f"sniff: {rate:,.0f} calls/s ({elapsed / ops * 1e6:.2f} us/call, "
             f"{ops:,} calls in {elapsed:.2f}s, {d.parent} )")
        return {"sniff_per_s": rate, "sniff_us_per_call": elapsed / ops * 1e6}
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ─── e2e ────────────────────────────────────────────────────────


class _Tap(logging.StreamHandler):
    """The daemon's own log format, written to /dev/null; counts each file's terminal step."""

    def __init__(self, terminal: tuple[str, ...]):
        super().__init__(open(os.devnull, "w"))
        self.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s"))
        self.terminal = terminal
        self.ready = threading.Event()
        self.mx = threading.Lock()
        self.done_ts: list[float] = []
        self.target = -1
        self.reached = threading.Event()
        self.warnings: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        msg = record.getMessage()
        if msg.startswith("watching:"):
            self.ready.set()
        if record.levelno >= logging.WARNING:
            self.warnings.append(msg)
        if msg.startswith(self.terminal):
            with self.mx:
                self.done_ts.append(time.perf_counter())
                if len(self.done_ts) >= self.target >= 0:
                    self.reached.set()

    def arm(self, count: int) -> None:
        with self.mx:
            self.done_ts.clear()
            self.target = count
            self.reached.clear()


def bench_e2e(root: str, mode: str, n_files: int) -> dict:
    base = Path(tempfile.mkdtemp(prefix=f"tcd-e2e-{mode}-", dir=root))
    inbox = base / "inbox"
    inbox.mkdir()
    cfg = DaemonConfig(
        inbox=inbox,
        audit_jsonl=base / "audit.jsonl",
        mode=mode,
        quarantine_dir=base / "quarantine",
        triage_dir=base / "triage",
    )
    # strict: non-sealed -> "strict-reject: ...", sealed -> "verify-fork: ..." (or a
    # "verify_fork failed" warning); passive: "arrival: ..." is the last step for every file.
    terminal = ("strict-reject:", "verify-fork:", "verify_fork failed") if mode == "strict" \
        else ("arrival:",)
    log = logging.getLogger("tibet-continuityd")
    for h in list(log.handlers):
        log.removeHandler(h)
    tap = _Tap(terminal)
    log.addHandler(tap)  # present before __init__, so the daemon adds no stderr handler
    daemon = ContinuityDaemon(cfg)
    th = threading.Thread(target=daemon.run, name=f"continuityd-{mode}", daemon=True)
    th.start()

    mix = scenario_mix()
    seq = 0

    def burst(count: int) -> None:
        nonlocal seq
        for k in range(count):
            name, data = mix[k % len(mix)]
            with open(inbox / f"{seq:05d}-{name}", "wb") as f:
                f.write(data)
            seq += 1

    try:
        if not tap.ready.wait(10):
            raise RuntimeError("daemon did not start watching")
        # warm-up: one copy of the mix (lazy imports of verify_fork/tibet_drop, policy cache)
        tap.arm(len(mix))
        burst(len(mix))
        if not tap.reached.wait(30):
            raise RuntimeError(f"warm-up: {len(tap.done_ts)}/{len(mix)} files processed")

        tap.arm(n_files)
        t0 = time.perf_counter()
        burst(n_files)
        t_written = time.perf_counter()
        if not tap.reached.wait(30 + n_files * 0.2):
            raise RuntimeError(f"{mode}: {len(tap.done_ts)}/{n_files} files processed")
        with tap.mx:
            ts = sorted(tap.done_ts)
        t_end = ts[-1]
    except BaseException:
        daemon._stop = True
        th.join(5)
        log.removeHandler(tap)
        shutil.rmtree(base, ignore_errors=True)
        raise
    finally:
        daemon._stop = True  # the documented way to stop a daemon run from a non-main thread
        th.join(5)

    elapsed = t_end - t0
    rate = n_files / elapsed
    steady = (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else float("nan")
    left = sorted(p.name for p in inbox.iterdir())
    moved = len(list((base / "quarantine").iterdir())) if (base / "quarantine").exists() else 0
    stats = daemon._stats
    note(f"e2e {mode}: {n_files} files in {elapsed:.3f}s -> {rate:.1f} files/s "
         f"(steady {steady:.1f} files/s; first file done {ts[0] - t0:.3f}s after the burst, "
         f"burst written in {(t_written - t0) * 1e3:.1f} ms)")
    note(f"   by_class={stats['by_class']} by_disposition={stats['by_disposition']} "
         f"strict_rejects={stats.get('strict_rejects', 0)} quarantined={moved} "
         f"left_in_inbox={len(left)}")
    if tap.warnings:
        note(f"   daemon warnings: {len(tap.warnings)} (first: {tap.warnings[0]})")
    log.removeHandler(tap)
    tap.stream.close()
    shutil.rmtree(base, ignore_errors=True)
    return {"files_per_s": rate, "steady_files_per_s": steady, "seconds": elapsed,
            "first_done_s": ts[0] - t0}


def main() -> None:
    import platform
    note(f"# tibet-continuityd {TCD_VERSION} sniff + daemon e2e | CPython {platform.python_version()} "
         f"| {platform.machine()} | {os.cpu_count()} CPUs | duration/case={SECONDS}s "
         f"(PEER_BENCH_SECONDS)")
    root = scratch_root()
    s = bench_sniff(root)
    n_files = max(22, math.ceil(SECONDS * 18 / 11) * 11)
    strict = bench_e2e(root, "strict", n_files)
    passive = bench_e2e(root, "passive", n_files)
    uses_magic = libmagic_in_use()
    note(f"sniff uses libmagic: {uses_magic} (python-magic imported: {'magic' in sys.modules})")
    out = {
        "sniff_per_s": round(s["sniff_per_s"], 1),
        "e2e_files_per_s": round(strict["files_per_s"], 2),
        "sniff_uses_libmagic": uses_magic,
        "e2e_path": ("ContinuityDaemon.run() mode=strict in a thread: LaneWatcher inotify -> "
                     "ArrivalCoalescer(350ms) -> _on_arrival (sleep 0.05s, sniff_payload, audit "
                     "JSONL; non-sealed os.rename to quarantine, sealed verify_and_fork+audit); "
                     f"{n_files} files burst-written to a {root} inbox, timed until the last "
                     "file's terminal log line"),
        "e2e_steady_files_per_s": round(strict["steady_files_per_s"], 2),
        "e2e_passive_files_per_s": round(passive["files_per_s"], 2),
        "e2e_passive_steady_files_per_s": round(passive["steady_files_per_s"], 2),
        "e2e_files": n_files,
        "sniff_inputs": len(scenario_mix()),
        "peer": f"tibet-continuityd=={TCD_VERSION}",
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
