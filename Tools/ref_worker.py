#!/usr/bin/env python3
"""Reference worker in Python: runs `external` stages of a pipehost pipeline.

Written from docs/wire-format.md alone (frames, HELLO/ASSIGN registration, DATA, CREDIT, EOS,
HEARTBEAT, COMMAND, STATS, the envelope encoding) with pyzmq. It connects in like
`pipehost worker --connect tcp://...` does, registers, and runs each `external` stage of its
roster. Programs:

  upper  the payload's ASCII letters in upper case; attribute `program` = "upper"
  tag    every entry of the stage's `settings` becomes a string attribute

Usage:
  ref_worker.py --connect tcp://HOST:PORT --key worker/curve.key --server-key host/curve.pub
  ref_worker.py --connect tcp://HOST:PORT --insecure --name NAME

Delivery: under `delivery: at-least-once` it acknowledges an input (ACK on the input lane's
return path) once every copy of what it made of it was acknowledged on each output lane it went
to, and at once an input it refused; it keeps no copies (a transform does not resend: when a
consumer restarts, what was outstanding on its lane is forgotten and the source's timeout sends
it again), and what it emits keeps the input's `attempt`. Byte bounds are not enforced. It follows the
tcp loss rules of the wire format: a HEARTBEAT on every output lane each second, EOS and CREDIT
repeated each second, and a gap in a producer's frame seqs (frames lost with a dropped
connection) answered, once it has lasted a second, with a new credit epoch, so a link cut longer than ZeroMQ's heartbeat
timeout loses what was in flight but never stalls a lane. It is a reference for the protocol,
not a production worker.
"""
import argparse
import json
import os
import struct
import sys
import time

import zmq

MAGIC = b"PL"
VERSION = 1
DATA, EOS, CREDIT, ACK, HEARTBEAT, STATS, AUDIT, HELLO, ASSIGN, COMMAND = range(1, 11)
FRAME_ENVELOPE_BYTES = 1 << 20  # docs/wire-format.md, limits
MAX_ATTRS = 64
GAP_GRACE_S = 1.0  # how long seqs must be missing before they are taken for lost
PROTOCOL_VERSION = 2  # HELLO: STATS lane entries end with the credit epoch and the count within it
CMD_LOOP_CLOSED, CMD_STOP, CMD_FINISH, CMD_ABORT = 1, 2, 3, 4
F_IDLE, F_EXHAUSTED, F_FINISHED, F_FAILED = 0x01, 0x02, 0x04, 0x10


def now_ns():
    return time.time_ns()


# --- frames -------------------------------------------------------------------------------------

def header(ftype, lane, seq):
    return MAGIC + bytes([VERSION, ftype]) + struct.pack("<IQ", lane, seq)


def parse_header(b):
    if len(b) < 16 or b[:2] != MAGIC or b[2] != VERSION:
        raise ValueError("not a frame")
    lane, seq = struct.unpack_from("<IQ", b, 4)
    return b[3], lane, seq, b[16:]


def str16(s):
    raw = s.encode("utf-8")
    return struct.pack("<H", len(raw)) + raw


class Reader:
    def __init__(self, b):
        self.b, self.i = b, 0

    def take(self, n):
        if self.i + n > len(self.b):
            raise ValueError("truncated")
        v = self.b[self.i:self.i + n]
        self.i += n
        return v

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack("<H", self.take(2))[0]

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def i64(self):
        return struct.unpack("<q", self.take(8))[0]

    def s16(self):
        return self.take(self.u16()).decode("utf-8")


# --- envelopes (docs/wire-format.md, "Envelope (version 1)") -------------------------------------

def attr_encode(v):
    if isinstance(v, bool):
        return b"\x04" + bytes([1 if v else 0])
    if isinstance(v, int):
        return b"\x02" + struct.pack("<q", v)
    if isinstance(v, float):
        return b"\x03" + struct.pack("<d", v)
    return b"\x01" + str16(str(v))


def attr_decode(r):
    t = r.u8()
    if t == 1:
        return r.s16()
    if t == 2:
        return r.i64()
    if t == 3:
        return struct.unpack("<d", r.take(8))[0]
    if t == 4:
        b = r.u8()
        if b > 1:
            raise ValueError("bad bool")
        return b == 1
    raise ValueError("bad attr type %d" % t)


def decode_envelope(b):
    r = Reader(b)
    if r.u8() != 1:
        raise ValueError("envelope version")
    flags = r.u8()
    if flags & ~0x07:
        raise ValueError("unknown envelope flags")
    e = {"id": r.take(16)}
    e["parent"] = r.take(16) if flags & 1 else None
    e["rank"], e["hops"], e["attempt"], e["ingest_ns"] = r.u64(), r.u32(), r.u32(), r.u64()
    e["actor"], e["intent"], e["authority"], e["lane"] = r.s16(), r.s16(), r.s16(), r.s16()
    e["clock"] = [(r.s16(), r.u64()) for _ in range(r.u16())] if flags & 2 else None
    e["attrs"] = {}
    for _ in range(r.u16()):
        k = r.s16()
        e["attrs"][k] = attr_decode(r)
    e["sig"] = r.take(72) if flags & 4 else None
    e["payload"] = r.take(r.u32())
    if r.i != len(b):
        raise ValueError("trailing bytes")
    return e


def encode_envelope(e):
    flags = (1 if e["parent"] else 0) | (2 if e["clock"] is not None else 0) | (4 if e["sig"] else 0)
    out = bytearray([1, flags]) + e["id"]
    if e["parent"]:
        out += e["parent"]
    out += struct.pack("<QIIQ", e["rank"], e["hops"], e["attempt"], e["ingest_ns"])
    for s in (e["actor"], e["intent"], e["authority"], e["lane"]):
        out += str16(s)
    if e["clock"] is not None:
        out += struct.pack("<H", len(e["clock"]))
        for actor, counter in sorted(e["clock"], key=lambda x: x[0].encode()):
            out += str16(actor) + struct.pack("<Q", counter)
    keys = sorted(e["attrs"], key=lambda k: k.encode("utf-8"))
    out += struct.pack("<H", len(keys))
    for k in keys:
        out += str16(k) + attr_encode(e["attrs"][k])
    if e["sig"]:
        out += e["sig"]
    out += struct.pack("<I", len(e["payload"])) + e["payload"]
    return bytes(out)


# --- programs -----------------------------------------------------------------------------------

def program_upper(e, settings):
    e["payload"] = bytes(c - 32 if 97 <= c <= 122 else c for c in e["payload"])
    e["attrs"]["program"] = "upper"
    return e


def program_tag(e, settings):
    for k, v in (settings or {}).items():
        e["attrs"][k] = str(v)
    return e


PROGRAMS = {"upper": program_upper, "tag": program_tag}


# --- one stage ----------------------------------------------------------------------------------

class Stage:
    def __init__(self, ctx, args, stage_id):
        self.ctx, self.args, self.id = ctx, args, stage_id
        self.control = self.socket(zmq.DEALER)
        # A random, secret routing id kept for the runner's life: when ZeroMQ reconnects after a
        # cut, the host's ROUTER hands the same route over to the new connection.
        self.control.routing_id = b"r" + os.urandom(16)
        self.control.connect(args.connect)
        self.control.send(header(HELLO, 0, 1) + struct.pack("<HI", PROTOCOL_VERSION, os.getpid()) + str16(stage_id) + struct.pack("<I", 0))
        self.seq = 1
        self.a = None
        self.finished = self.failed = False
        self.error = ""
        self.received = self.emitted = self.errors = 0
        self.busy_ns = 0
        self.last_host = time.monotonic()
        self.next_stats = 0.0

    def socket(self, kind):
        s = self.ctx.socket(kind)
        s.linger = 0
        # ZeroMQ heartbeats, as the host's side has: a vanished peer is noticed and the
        # connection dropped and made again.
        s.heartbeat_ivl, s.heartbeat_timeout, s.heartbeat_ttl = 1000, 5000, 10000
        # And TCP_USER_TIMEOUT, as the host's side has: a connection whose data goes
        # unacknowledged for 5 s is closed (docs/wire-format.md, tcp loss rules).
        s.setsockopt(zmq.TCP_MAXRT, 5000)
        if self.args.keys:
            pub, sec, server = self.args.keys
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, server
        return s

    def assigned(self, a):
        self.a = a
        self.incarnation = now_ns()
        cfg = a.get("config") or {}
        if a["kind"] != "external" or cfg.get("program") not in PROGRAMS:
            self.fail("this worker runs kind external with program %s, not %s %r" % ("/".join(PROGRAMS), a["kind"], cfg.get("program")))
            return
        self.program, self.settings = PROGRAMS[cfg["program"]], cfg.get("settings") or {}
        self.alo = (a.get("delivery") or {}).get("mode") == "at-least-once"
        self.pending = {}  # input id -> output lanes whose copy is not yet acknowledged, input lane
        self.acks = {}     # input lane -> ids to acknowledge
        self.inp = self.socket(zmq.PULL)
        for ep in a.get("connect_in", []):
            self.inp.connect(ep)
        self.ret = self.socket(zmq.PULL)
        for ep in a.get("connect_ret", []):
            self.ret.connect(ep)
        self.ins = {}
        for i in a["inputs"]:
            s = self.socket(zmq.PUSH)
            s.connect(i["ret"])
            epoch = ((self.incarnation // 1000) & 0xFFFFFFFF) | 1
            self.ins[i["lane"]] = {"sock": s, "bound": i["bound"], "epoch": epoch, "in_epoch": 0, "received": 0,
                                   "granted": 0, "eos": False, "incarnation": None, "seq": 0, "last_seq": 0, "credit_at": 0.0}
            self.grant(i["lane"])
        self.outs = {}
        self.groups = {}  # output name -> {group: [lanes]}
        for o in a["outputs"]:
            for l in o["lanes"]:
                s = self.socket(zmq.PUSH)
                s.sndhwm = l["bound"] + 64
                s.connect(l["connect"])
                self.outs[l["lane"]] = {"sock": s, "bound": l["bound"], "epoch": 0, "limit": 0, "sent_in_epoch": 0,
                                        "transmitted": 0, "queue": [], "seq": 0, "eos": False, "retired": [],
                                        "beat_at": time.monotonic(), "eos_at": 0.0}
                try:
                    s.send(header(HEARTBEAT, l["lane"], 1) + struct.pack("<Q", self.incarnation), zmq.NOBLOCK)
                    self.outs[l["lane"]]["seq"] = 1  # a seq is taken only when ZeroMQ accepted the frame
                except zmq.Again:
                    pass
                self.groups.setdefault(o["name"], {}).setdefault(l["group"], []).append(l["lane"])
        self.rr = {}

    def fail(self, why):
        self.failed, self.error = True, why
        print("stage %s: %s" % (self.id, why), file=sys.stderr)

    def send_control(self, frame_type, body):
        self.seq += 1
        self.control.send(header(frame_type, 0, self.seq) + body)

    def grant(self, lane):
        i = self.ins[lane]
        i["granted"] = i["in_epoch"] + i["bound"]
        i["credit_at"] = time.monotonic()
        i["seq"] += 1
        try:
            i["sock"].send(header(CREDIT, lane, i["seq"]) + struct.pack("<IQ", i["epoch"], i["granted"]), zmq.NOBLOCK)
        except zmq.Again:
            pass  # cumulative: the next grant carries it

    def emit(self, encoded, output="out"):
        """Queues one copy of an encoded envelope per lane group; returns the lanes it went to."""
        went = []
        for group, lanes in sorted(self.groups.get(output, {}).items()):
            k = self.rr.get((output, group), 0)
            self.rr[(output, group)] = k + 1
            lane = lanes[k % len(lanes)]
            self.outs[lane]["queue"].append(encoded)
            went.append(lane)
        self.emitted += 1
        return went

    def done(self, lane, eid):
        """An input is fully handled: acknowledge it upstream (at-least-once only)."""
        if self.alo:
            self.acks.setdefault(lane, []).append(eid)

    def send_acks(self):
        for lane, ids in self.acks.items():
            i = self.ins.get(lane)
            while i is not None and ids:
                n = min(len(ids), 4096)
                try:
                    i["sock"].send(header(ACK, lane, i["seq"] + 1) + struct.pack("<I", n) + b"".join(ids[:n]), zmq.NOBLOCK)
                except zmq.Again:
                    break
                i["seq"] += 1
                del ids[:n]

    def on_data(self, lane, body):
        i = self.ins.get(lane)
        if i is None:
            self.errors += 1
            return
        r = Reader(body)
        r.u64()
        count = r.u32()
        t0 = time.monotonic_ns()
        for _ in range(count):
            raw = r.take(r.u32())
            i["received"] += 1
            i["in_epoch"] += 1
            self.received += 1
            self.handle(lane, raw)
            if i["granted"] - i["in_epoch"] <= i["bound"] // 2:
                self.grant(lane)
        self.busy_ns += time.monotonic_ns() - t0

    def handle(self, lane, raw):
        try:
            e = decode_envelope(raw)
        except ValueError as err:
            self.errors += 1
            print("stage %s: envelope refused: %s" % (self.id, err), file=sys.stderr)
            if len(raw) >= 18:
                self.done(lane, bytes(raw[2:18]))  # handled (it never will be better): not sent again
            return
        eid = bytes(e["id"])
        out = self.program(e, self.settings)
        encoded = encode_envelope(out)
        if len(out["attrs"]) > MAX_ATTRS or len(encoded) > self.a.get("max_envelope_bytes", 1 << 20):
            # What the program made breaks the wire limits: the consumer would refuse it (and count
            # it against this worker). Not sent; the input is done.
            self.errors += 1
            print("stage %s: program output over the limits (%d attrs, %d bytes); not sent" % (self.id, len(out["attrs"]), len(encoded)), file=sys.stderr)
            self.done(lane, eid)
            return
        went = self.emit(encoded)
        if not self.alo:
            return
        if went:
            # The program keeps the id: the copies' acknowledgements name the input.
            self.pending[eid] = {"lanes": set(went), "src": lane}
        else:
            self.done(lane, eid)

    def notice_loss(self, lane, seq):
        """tcp loss rule: a gap in the producer's seqs means frames went down with a dropped
        connection; once it has lasted GAP_GRACE_S (all gaps seen meanwhile as one loss), a
        fresh credit epoch lets the producer start over (docs/wire-format.md)."""
        i = self.ins[lane]
        last = i["last_seq"]
        i["last_seq"] = max(last, seq)
        if seq <= last + 1:
            # A frame that was missing arrived after all (reordered, not lost).
            missing = i.get("missing")
            if seq < last and missing and seq in missing:
                missing.discard(seq)
                if not missing and not i.get("untracked"):
                    i["gap_since"] = None
            return
        if not last:
            # Our first frame; earlier seqs were another consumer's. A new epoch all the same, in
            # case frames sent on our own credits went down before this one.
            self.fresh_epoch(lane)
            return
        missing = i.setdefault("missing", set())
        if seq - last - 1 + len(missing) <= 65536:
            missing.update(range(last + 1, seq))
        else:
            i["untracked"] = i.get("untracked", 0) + seq - last - 1
        if i.get("gap_since") is None:
            i["gap_since"] = time.monotonic()

    def settle_gap(self, lane):
        """The missing frames are lost: counted, logged, and a fresh credit epoch."""
        i = self.ins[lane]
        if i.get("gap_since") is None:
            return
        lost = len(i.get("missing", ())) + i.get("untracked", 0)
        i["gap_since"], i["missing"], i["untracked"] = None, set(), 0
        print("stage %s: lane %d: %d frame(s) lost in transit; new credit epoch" % (self.id, lane, lost), file=sys.stderr)
        self.fresh_epoch(lane)

    def fresh_epoch(self, lane):
        i = self.ins[lane]
        fresh = ((now_ns() // 1000) & 0xFFFFFFFF) | 1
        if fresh in (i["epoch"], (i["epoch"] + 1) & 0xFFFFFFFF):
            fresh = (fresh + 2) & 0xFFFFFFFF
        i["epoch"], i["in_epoch"] = fresh, 0
        self.grant(lane)

    def tcp_rules(self):
        """Once a second: a HEARTBEAT on each output lane (what shows a consumer a gap when we
        have nothing else to send), EOS again once sent, the current CREDIT again."""
        now = time.monotonic()
        for lane, o in self.outs.items():
            if now - o["beat_at"] >= 1.0:
                o["beat_at"] = now
                try:
                    o["sock"].send(header(HEARTBEAT, lane, o["seq"] + 1) + struct.pack("<Q", self.incarnation), zmq.NOBLOCK)
                    o["seq"] += 1
                except zmq.Again:
                    pass
            if o["eos"] and now - o["eos_at"] >= 1.0:
                self.send_eos(lane, o)
        for lane, i in self.ins.items():
            if i.get("gap_since") is not None and now - i["gap_since"] >= GAP_GRACE_S:
                self.settle_gap(lane)
            if now - i["credit_at"] >= 1.0:
                self.grant(lane)  # cumulative: a repeat is harmless

    def on_frame(self, take, b):
        """A malformed frame (bad header, short body, broken batch) is counted, never fatal."""
        try:
            take(*parse_header(b))
        except (ValueError, struct.error) as err:
            self.errors += 1
            print("stage %s: malformed frame refused: %s" % (self.id, err), file=sys.stderr)

    def on_input(self, b):
        self.on_frame(self.take_input, b)

    def on_return(self, b):
        self.on_frame(self.take_return, b)

    def take_input(self, ftype, lane, seq, body):
        if lane in self.ins and ftype in (DATA, EOS, HEARTBEAT):
            inc = struct.unpack_from("<Q", body)[0] if ftype == HEARTBEAT and len(body) >= 8 else None
            if inc is not None and self.ins[lane]["incarnation"] not in (None, inc):
                self.ins[lane]["last_seq"] = seq  # a restarted producer counts from 1 again
                self.ins[lane]["gap_since"], self.ins[lane]["missing"], self.ins[lane]["untracked"] = None, set(), 0
            else:
                self.notice_loss(lane, seq)
        if ftype == DATA:
            self.on_data(lane, body)
        elif ftype == EOS and lane in self.ins:
            self.settle_gap(lane)  # nothing more can fill a gap
            self.ins[lane]["eos"] = True
        elif ftype == HEARTBEAT and lane in self.ins:
            inc = struct.unpack_from("<Q", body)[0]
            i = self.ins[lane]
            # A restarted producer: move to the next epoch and grant again; its EOS is to come.
            if i["incarnation"] is not None and i["incarnation"] != inc:
                i["epoch"] = (i["epoch"] + 1) & 0xFFFFFFFF
                i["in_epoch"] = 0
                i["eos"] = False
                self.grant(lane)
            i["incarnation"] = inc

    def take_return(self, ftype, lane, _seq, body):
        o = self.outs.get(lane)
        if o is not None and ftype == ACK:
            n = struct.unpack_from("<I", body)[0] if len(body) >= 4 else -1
            if n < 0 or len(body) != 4 + 16 * n:
                self.errors += 1
                return
            for k in range(n):
                eid = bytes(body[4 + 16 * k:20 + 16 * k])
                p = self.pending.get(eid)
                if p is None or lane not in p["lanes"]:
                    continue
                p["lanes"].discard(lane)
                if not p["lanes"]:
                    del self.pending[eid]
                    self.done(p["src"], eid)
            return
        if o is None or ftype != CREDIT:
            return
        epoch, claimed = struct.unpack_from("<IQ", body)
        if epoch in o["retired"]:
            return
        if epoch != o["epoch"]:
            if o["epoch"]:
                o["retired"] = (o["retired"] + [o["epoch"]])[-4:]
                # The consumer restarted: what was outstanding on this lane will not be
                # acknowledged; the source sends it again after its timeout.
                for eid in [k for k, p in self.pending.items() if lane in p["lanes"]]:
                    del self.pending[eid]
            o["epoch"], o["sent_in_epoch"], o["limit"] = epoch, 0, min(claimed, o["bound"])
            if o["eos"]:
                # A restarted consumer still learns the end.
                self.send_eos(lane, o)
        else:
            o["limit"] = max(o["limit"], min(claimed, o["sent_in_epoch"] + o["bound"]))

    def flush(self):
        for lane, o in self.outs.items():
            while o["queue"] and o["sent_in_epoch"] < o["limit"]:
                n = min(len(o["queue"]), o["limit"] - o["sent_in_epoch"], self.a["max_batch_envelopes"], 512)
                # At most 1 MiB of envelopes (length prefixes included) per frame, or one envelope
                # when that one alone is larger: the consumer's size guard is sized on that rule.
                size, fit = 0, 0
                while fit < n and (fit == 0 or size + 4 + len(o["queue"][fit]) <= FRAME_ENVELOPE_BYTES):
                    size += 4 + len(o["queue"][fit])
                    fit += 1
                n = fit
                batch = o["queue"][:n]
                body = struct.pack("<QI", now_ns(), n) + b"".join(struct.pack("<I", len(x)) + x for x in batch)
                o["seq"] += 1
                try:
                    o["sock"].send(header(DATA, lane, o["seq"]) + body, zmq.NOBLOCK)
                except zmq.Again:
                    o["seq"] -= 1
                    break
                del o["queue"][:n]
                o["sent_in_epoch"] += n
                o["transmitted"] += n

    def maybe_finish(self):
        if self.finished or not all(i["eos"] for i in self.ins.values()):
            return
        if any(o["queue"] for o in self.outs.values()):
            return
        for lane, o in self.outs.items():
            if not o["eos"]:
                o["eos"] = self.send_eos(lane, o)
        if all(o["eos"] for o in self.outs.values()):
            self.finished = True
            self.next_stats = 0

    def send_eos(self, lane, o):
        """EOS on one lane; its seq is taken only when ZeroMQ accepted the frame."""
        try:
            o["sock"].send(header(EOS, lane, o["seq"] + 1) + struct.pack("<Q", o["transmitted"]), zmq.NOBLOCK)
        except zmq.Again:
            return False
        o["seq"] += 1
        o["eos_at"] = time.monotonic()
        return True

    def stats(self):
        flags = (F_FINISHED if self.finished else 0) | (F_FAILED if self.failed else 0)
        if not self.failed and not any(o["queue"] for o in getattr(self, "outs", {}).values()):
            flags |= F_IDLE
        body = str16(self.id) + struct.pack("<QB", now_ns(), flags)
        body += struct.pack("<QQQQI", self.received, self.emitted, 0, self.errors, 0)
        body += struct.pack("<Q", self.busy_ns) + b"\x00"
        lanes = []
        for lane, o in getattr(self, "outs", {}).items():
            credits = max(0, o["limit"] - o["sent_in_epoch"])
            lanes.append(struct.pack("<IBQIIBQQQI", lane, 0, o["transmitted"], credits, len(o["queue"]), 1 if o["eos"] else 0, 0, 0, 0, 0) + b"\x00"
                         + struct.pack("<IQ", o["epoch"], o["sent_in_epoch"]))
        for lane, i in getattr(self, "ins", {}).items():
            credits = max(0, i["granted"] - i["in_epoch"])
            lanes.append(struct.pack("<IBQIIBQQQI", lane, 1, i["received"], credits, 0, 1 if i["eos"] else 0, 0, 0, 0, 0) + b"\x00"
                         + struct.pack("<IQ", i["epoch"], i["in_epoch"]))
        body += struct.pack("<H", len(lanes)) + b"".join(lanes)
        status = [("language", "python"), ("program", (self.a or {}).get("config", {}).get("program", "") if self.a else "")]
        if self.error:
            status.append(("error", self.error))
        body += struct.pack("<H", len(status)) + b"".join(str16(k) + attr_encode(v) for k, v in status)
        self.send_control(STATS, body)
        self.next_stats = time.monotonic() + (self.a or {}).get("stats_interval_ms", 100) / 1000.0

    def on_control(self, b):
        """Returns False when the stage must end."""
        self.last_host = time.monotonic()
        try:
            ftype, _, _, body = parse_header(b)
        except ValueError:
            return True
        if ftype == ASSIGN and self.a is None:
            a = json.loads(body.decode("utf-8"))
            if "refused" in a:
                print("stage %s refused: %s" % (self.id, a["refused"]), file=sys.stderr)
                return False
            self.assigned(a)
            self.stats()
        elif ftype == COMMAND:
            code = body[0]
            if code in (CMD_FINISH, CMD_ABORT):
                if self.a is not None:
                    self.stats()
                return False
        return True

    def sockets(self):
        return [self.control] + ([self.inp, self.ret] if self.a is not None and not self.failed else [])

    def close(self):
        for s in [self.control] + ([self.inp, self.ret] + [x["sock"] for x in self.ins.values()] + [x["sock"] for x in self.outs.values()]
                                   if hasattr(self, "inp") else []):
            s.close(0)


def register(ctx, args):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if args.keys:
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = args.keys
    s.connect(args.connect)
    s.send(header(HELLO, 0, 1) + struct.pack("<HI", PROTOCOL_VERSION, os.getpid()) + str16("worker:" + (args.name or "")) + struct.pack("<I", 0))
    if not s.poll(int(args.handshake_timeout * 1000)):
        sys.exit("no answer from %s within %s s (host down, wrong --server-key, or a key the host does not allow)" % (args.connect, args.handshake_timeout))
    ftype, _, _, body = parse_header(s.recv())
    s.close(0)
    if ftype == COMMAND:
        sys.exit("the host refused this worker")
    roster = json.loads(body.decode("utf-8"))
    if "refused" in roster:
        sys.exit("the host refused this worker: " + roster["refused"])
    return roster


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connect", required=True)
    p.add_argument("--key", help="this worker's curve.key")
    p.add_argument("--server-key", help="the host's curve.pub")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--name")
    p.add_argument("--handshake-timeout", type=float, default=10)
    args = p.parse_args()
    if args.insecure:
        if not args.name:
            p.error("--insecure needs --name")
        args.keys = None
    else:
        if not (args.key and args.server_key):
            p.error("give --key and --server-key, or --insecure --name NAME")
        sec = open(args.key, "rb").read().strip()
        args.keys = (zmq.curve_public(sec), sec, open(args.server_key, "rb").read().strip())
    ctx = zmq.Context()
    roster = register(ctx, args)
    print("registered as worker %r of pipeline %r; stages: %s" % (roster["worker"], roster.get("pipeline", ""), ", ".join(roster["stages"]) or "none"),
          file=sys.stderr)
    stages = [Stage(ctx, args, sid) for sid in roster["stages"]]
    live = list(stages)
    while live:
        poller = zmq.Poller()
        owner = {}
        for st in live:
            for s in st.sockets():
                poller.register(s, zmq.POLLIN)
                owner[s] = st
        events = dict(poller.poll(20))
        ended = []
        for s in events:
            st = owner[s]
            while True:
                try:
                    b = s.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if s is st.control:
                    if not st.on_control(b):
                        ended.append(st)
                        break
                elif s is st.inp:
                    st.on_input(b)
                else:
                    st.on_return(b)
        for st in live:
            if st in ended or st.a is None:
                continue
            if not st.failed:
                st.flush()
                st.send_acks()
                st.maybe_finish()
                st.tcp_rules()
            if time.monotonic() >= st.next_stats:
                st.stats()
            if time.monotonic() - st.last_host > 15:
                print("stage %s: no word from the host for 15 s; stopping" % st.id, file=sys.stderr)
                ended.append(st)
        for st in ended:
            if st in live:
                live.remove(st)
                st.close()
    ctx.term()
    sys.exit(1 if any(st.failed for st in stages) else 0)


if __name__ == "__main__":
    main()
