"""A lease holder run as a subprocess by the fault tests (``python holder.py URL PREFIX MODE ...``).

It talks over stdout, one line per event, flushed at once: ``WORD [details]``.

``hold``: acquire ``--key`` (blocking), print ``ACQUIRED <fence> <token>``, then obey commands
read from stdin, one per line, until ``EXIT`` or end of input:

    WAIT_LOST <seconds>   print ``LOST <reason>`` once on_lost fired, or ``NOT_LOST``
    STATUS                print ``HELD True|False``
    RELEASE               print ``ENSURE_HELD OK`` or ``ENSURE_HELD LeaseLost <message>``,
                          then ``RELEASED True|False`` (what release() returned)
    EXIT                  exit (without releasing)

``loop``: print ``READY``, wait for ``GO`` on stdin, then ``--count`` times take one of
``--keys`` at random (blocking, ``--timeout``), hold it for 0..``--max-hold-ms`` ms and release
it, recording each hold; write the records as JSON lines to ``--out`` and print
``DONE <holds> <timeouts>``. Times are ``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by
every process of the machine), so holds of different processes can be compared.

Anything unexpected goes to stderr as a traceback and exits non-zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from typing import Any

from celery_exclusive import Lease, LeaseLost, connect


def say(*words: object) -> None:
    print(*words, flush=True)


def hold(args: argparse.Namespace) -> int:
    store = connect(args.url, prefix=args.prefix)
    lost = threading.Event()
    reasons: list[str] = []

    def on_lost(_lease: Lease, reason: str) -> None:
        reasons.append(reason)
        lost.set()

    lease = store.lease(args.key, ttl=args.ttl, meta={"role": "holder"}, on_lost=on_lost)
    if not lease.acquire(blocking=True, timeout=args.timeout):
        say("NOT_ACQUIRED", json.dumps(lease.holder and lease.holder.as_dict()))
        return 2
    say("ACQUIRED", lease.fence, lease.token)
    for line in sys.stdin:
        command, _, rest = line.strip().partition(" ")
        if command == "WAIT_LOST":
            if lost.wait(float(rest or "5")):
                say("LOST", reasons[0])
            else:
                say("NOT_LOST")
        elif command == "STATUS":
            say("HELD", lease.held)
        elif command == "RELEASE":
            try:
                lease.ensure_held()
            except LeaseLost as exc:
                say("ENSURE_HELD", "LeaseLost", exc)
            else:
                say("ENSURE_HELD", "OK")
            say("RELEASED", lease.release())
        elif command == "EXIT":
            break
        else:
            say("UNKNOWN", command)
    return 0


def loop(args: argparse.Namespace) -> int:
    store = connect(args.url, prefix=args.prefix)
    keys = args.keys.split(",")
    rng = random.Random(args.seed)
    pid = os.getpid()
    records: list[dict[str, Any]] = []
    timeouts = 0
    say("READY", pid)
    if sys.stdin.readline().strip() != "GO":
        return 3
    for i in range(args.count):
        key = rng.choice(keys)
        lease = store.lease(key, ttl=args.ttl, limit=args.limit, meta={"i": i})
        requested = time.monotonic_ns()
        if not lease.acquire(blocking=True, timeout=args.timeout):
            timeouts += 1
            continue
        start = time.monotonic_ns()
        time.sleep(rng.uniform(0, args.max_hold_ms) / 1000.0)
        end = time.monotonic_ns()
        released = lease.release()
        records.append(
            {
                "key": key,
                "start": start,
                "end": end,
                "requested": requested,
                "fence": lease.fence,
                "id": f"{pid}:{i}",
                "pid": pid,
                "released": released,
            }
        )
    tmp = f"{args.out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, args.out)
    say("DONE", len(records), timeouts)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("mode", choices=["hold", "loop"])
    parser.add_argument("--key", default="k")
    parser.add_argument("--keys", default="k0,k1,k2")
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--max-hold-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    return hold(args) if args.mode == "hold" else loop(args)


if __name__ == "__main__":
    sys.exit(main())
