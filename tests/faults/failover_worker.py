"""A lease holder for the failover and partition runs (``python failover_worker.py URL PREFIX
MODE ...``): it records what it believed and when, on the machine's shared monotonic clock.

Lines on stdout, one per event, flushed at once: ``WORD [details]``; times are
``time.monotonic_ns()`` (CLOCK_MONOTONIC, shared by every process of the machine and by
processes in a network namespace), so they compare with the test's own times.

``hold``: acquire each of ``--keys`` (blocking, ``--timeout``) and print
``ACQUIRED <key> <fence> <t>`` for each, then ``HOLDING``. While held, ``on_lost`` prints
``LOST <key> <t> <reason>``, and a watcher prints ``NOT_HELD <key> <t>`` the first time
``lease.held`` reads False (every 5 ms). Commands on stdin, one per line:

    STATUS     print ``HELD <key> True|False`` per key, then ``STATUS_DONE``
    RELEASE    release every key: ``RELEASED <key> True|False|error <t>`` per key
    ACQUIRE    acquire every key again, not blocking: ``ACQUIRE <key> True|False <fence>``
    EXIT       exit (without releasing)

``hammer``: print ``READY``, wait for ``GO``, then until ``STOP`` (or ``--seconds``): take one
of ``--keys`` at random (blocking, ``--timeout``), hold it ``--min-hold-ms`` to
``--max-hold-ms`` while watching ``lease.held``, and release it. Each hold is one JSON line in
``--out`` (written at once, so a killed worker's holds are kept)::

    {"key", "requested", "start", "end", "fence", "id", "lost_at", "released", "error"}

``end`` is when the worker stopped believing it held the key: right before ``release()``, or
the moment it saw the lease lost (``on_lost``, or ``held`` False). Store errors are counted
(``ERROR`` lines) and the loop goes on after 20 ms. Prints ``DONE <holds> <errors>`` at the end.
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

from celery_exclusive import Lease, connect
from celery_exclusive.exceptions import BackendError

#: The longest one run may last whatever stdin says (every loop is bounded).
MAX_SECONDS = 600.0


def say(*words: object) -> None:
    print(*words, flush=True)


def hold(args: argparse.Namespace) -> int:
    store = connect(args.url, prefix=args.prefix)
    keys = args.keys.split(",")
    leases: dict[str, Lease] = {}
    reported: set[str] = set()
    lock = threading.Lock()

    def on_lost(lease: Lease, reason: str) -> None:
        say("LOST", lease.key, time.monotonic_ns(), reason.replace("\n", " "))

    for key in keys:
        lease = store.lease(key, ttl=args.ttl, on_lost=on_lost)
        if not lease.acquire(blocking=True, timeout=args.timeout):
            say("NOT_ACQUIRED", key)
            return 2
        leases[key] = lease
        say("ACQUIRED", key, lease.fence, time.monotonic_ns())
    say("HOLDING")
    stop = threading.Event()

    def watch() -> None:
        until = time.monotonic() + MAX_SECONDS
        while not stop.is_set() and time.monotonic() < until:
            for key, lease in leases.items():
                with lock:
                    if key not in reported and not lease.held:
                        reported.add(key)
                        say("NOT_HELD", key, time.monotonic_ns())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, name="watch-held", daemon=True)
    watcher.start()
    for line in sys.stdin:
        command = line.strip()
        if command == "STATUS":
            for key, lease in leases.items():
                say("HELD", key, lease.held)
            say("STATUS_DONE")
        elif command == "RELEASE":
            for key, lease in leases.items():
                with lock:
                    reported.add(key)  # a release is not a loss
                try:
                    released: object = lease.release()
                except BackendError:
                    released = "error"
                say("RELEASED", key, released, time.monotonic_ns())
        elif command == "ACQUIRE":
            for key, lease in leases.items():
                try:
                    got: object = lease.acquire()
                except BackendError:
                    got = "error"
                if got is True:
                    with lock:
                        reported.discard(key)
                say("ACQUIRE", key, got, lease.fence)
        elif command == "EXIT":
            break
        else:
            say("UNKNOWN", command)
    stop.set()
    return 0


def hammer(args: argparse.Namespace) -> int:
    store = connect(args.url, prefix=args.prefix)
    keys = args.keys.split(",")
    rng = random.Random(args.seed)
    pid = os.getpid()
    stop = threading.Event()
    holds = errors = 0
    say("READY", pid)
    if sys.stdin.readline().strip() != "GO":
        return 3

    def read_stop() -> None:
        for line in sys.stdin:
            if line.strip() == "STOP":
                break
        stop.set()

    threading.Thread(target=read_stop, name="read-stop", daemon=True).start()
    until = time.monotonic() + min(args.seconds, MAX_SECONDS)
    with open(args.out, "a", encoding="utf-8") as out:
        for i in range(10_000_000):
            if stop.is_set() or time.monotonic() >= until:
                break
            key = rng.choice(keys)
            lost_at: list[int] = []

            def on_lost(_lease: Lease, _reason: str, seen: list[int] = lost_at) -> None:
                seen.append(time.monotonic_ns())

            lease = store.lease(key, ttl=args.ttl, meta={"i": i}, on_lost=on_lost)
            record: dict[str, Any] = {"key": key, "id": f"{pid}:{i}", "pid": pid}
            record["requested"] = time.monotonic_ns()
            try:
                if not lease.acquire(blocking=True, timeout=args.timeout):
                    continue
            except BackendError as exc:
                errors += 1
                say("ERROR", "acquire", time.monotonic_ns(), type(exc).__name__)
                stop.wait(0.02)
                continue
            record["start"] = time.monotonic_ns()
            record["fence"] = lease.fence
            hold_until = time.monotonic() + rng.uniform(args.min_hold_ms, args.max_hold_ms) / 1e3
            end = None
            for _ in range(1_000_000):
                left = hold_until - time.monotonic()
                if left <= 0:
                    break
                if not lease.held:
                    end = time.monotonic_ns()
                    break
                time.sleep(min(left, 0.005))
            if lost_at:
                end = min(lost_at[0], end or lost_at[0])
            record["lost_at"] = lost_at[0] if lost_at else None
            record["end"] = end if end is not None else time.monotonic_ns()
            try:
                record["released"] = lease.release()
            except BackendError as exc:
                errors += 1
                record["released"] = "error"
                record["error"] = type(exc).__name__
            holds += 1
            out.write(json.dumps(record) + "\n")
            out.flush()
    say("DONE", holds, errors)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("prefix")
    parser.add_argument("mode", choices=["hold", "hammer"])
    parser.add_argument("--keys", default="k0,k1,k2")
    parser.add_argument("--ttl", type=float, default=3.0)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--min-hold-ms", type=float, default=0.0)
    parser.add_argument("--max-hold-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    return hold(args) if args.mode == "hold" else hammer(args)


if __name__ == "__main__":
    sys.exit(main())
