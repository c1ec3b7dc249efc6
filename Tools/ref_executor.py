#!/usr/bin/env python3
"""Reference service for the executor's `external` kind (docs/cap-pipeline.md, "The external executor").

Binds a ZeroMQ ROUTER and answers every cap: `executed` with the payload upper-cased as output,
or `rejected` when the cap's intent ends in `.deny`. `--delay-ms` makes each execution take that
long (the receipt's latency shows it). With --key/--clients it is a CURVE server admitting only
the listed client keys (its own ZAP handler).

  ref_executor.py --bind ipc:///tmp/exec.sock [--delay-ms 20]
  ref_executor.py --bind tcp://127.0.0.1:7900 --key svc/curve.key --clients host/curve.pub
"""
import argparse
import base64
import json
import sys
import time

import zmq
import zmq.utils.z85

PROTO = b"pipehost-exec-v1"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bind", required=True)
    p.add_argument("--delay-ms", type=float, default=0)
    p.add_argument("--key", help="this service's curve.key (CURVE server)")
    p.add_argument("--clients", nargs="*", default=[], help="curve.pub files of the clients allowed in")
    p.add_argument("--max", type=int, default=0, help="exit after answering this many caps (0: never)")
    args = p.parse_args()
    ctx = zmq.Context()
    zap = None
    allowed = set()
    s = ctx.socket(zmq.ROUTER)
    s.linger = 0
    if args.key:
        allowed = {open(f, "rb").read().strip() for f in args.clients}
        zap = ctx.socket(zmq.ROUTER)
        zap.bind("inproc://zeromq.zap.01")
        sec = open(args.key, "rb").read().strip()
        s.curve_server = True
        s.curve_secretkey = sec
        s.zap_domain = b"executor"
    s.bind(args.bind)
    print("executor service on %s" % args.bind, file=sys.stderr, flush=True)
    poller = zmq.Poller()
    poller.register(s, zmq.POLLIN)
    if zap is not None:
        poller.register(zap, zmq.POLLIN)
    answered = 0
    while not args.max or answered < args.max:
        for sock, _ in poller.poll(1000):
            if sock is zap:
                f = zap.recv_multipart()
                i = f.index(b"")
                version, rid, mech = f[i + 1], f[i + 2], f[i + 6]
                key = zmq.utils.z85.encode(f[i + 7]) if mech == b"CURVE" and len(f) > i + 7 else b""
                ok = key in allowed
                zap.send_multipart(f[:i + 1] + [version, rid, b"200" if ok else b"400", b"OK" if ok else b"unknown client", b"", b""])
                continue
            routing, proto, body = s.recv_multipart()
            if proto != PROTO:
                continue
            req = json.loads(body)
            if args.delay_ms:
                time.sleep(args.delay_ms / 1000.0)
            if req["intent"].endswith(".deny"):
                rep = {"id": req["id"], "outcome": "rejected", "output": "", "reason": "denied by policy"}
            else:
                text = base64.b64decode(req["payload_b64"]).decode("utf-8", "replace")
                rep = {"id": req["id"], "outcome": "executed", "output": text.upper(), "reason": "", "exit_status": 0}
            s.send_multipart([routing, PROTO, json.dumps(rep).encode()])
            answered += 1
    s.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
