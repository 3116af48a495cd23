"""The lease demo: worker processes contend for a few keys; one is killed mid-hold.

What it shows, on an embedded Redis (or ``--redis URL``):

* one holder per key at a time (every hold is recorded and checked for overlaps),
* fences rising with every grant of a key,
* a holder killed with SIGKILL (no ``finally`` runs) whose key comes free by expiry, ``ttl``
  seconds at most after its last renewal, and goes to a waiting worker.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import connect
from ..embedded import embedded_redis

KEYS = ("customer:1", "customer:2", "customer:3")
NAMES = "ABCDEFGH"


@dataclass
class Hold:
    worker: str
    key: str
    fence: int
    start: float
    end: float | None = None


def _worker(
    url: str, prefix: str, name: str, ttl: float, duration: float, events: Any, go: Any
) -> None:
    store = connect(url, prefix=prefix)
    rng = random.Random(os.getpid())
    events.put(("ready", name, "", 0, time.time(), os.getpid()))
    go.wait(120)  # every worker contends from the same moment, however slow the start
    stop_at = time.time() + duration
    while time.time() < stop_at:
        key = rng.choice(KEYS)
        lease = store.lease(key, ttl=ttl, meta={"worker": name})
        if not lease.acquire(timeout=max(0.05, min(ttl * 3, stop_at - time.time()))):
            continue
        start = time.time()
        events.put(("hold", name, key, lease.fence, start, os.getpid()))
        time.sleep(rng.uniform(0.05, 0.25))  # the "work"
        end = time.time()
        events.put(("done", name, key, lease.fence, end, os.getpid()))
        lease.release()
    store.close()


def _wait_ready(events: Any, workers: int, deadline: float) -> None:
    """Wait until every worker process has started and connected (spawning takes seconds)."""
    ready = 0
    while ready < workers and time.time() < deadline:
        with contextlib.suppress(queue.Empty):
            if events.get(timeout=0.5)[0] == "ready":
                ready += 1


def _probe(url: str, prefix: str, key: str, ttl: float, freed: list[float]) -> None:
    """Wait for ``key`` (woken at the dead holder's expiry) and note when it came free."""
    store = connect(url, prefix=prefix)
    lease = store.lease(key, ttl=ttl, meta={"worker": "demo probe"})
    if lease.acquire(timeout=ttl * 4 + 5):
        freed.append(time.time())
        lease.release()
    store.close()


def overlaps(holds: Sequence[Hold]) -> list[tuple[Hold, Hold]]:
    """Return pairs of holds of the same key whose intervals overlap."""
    found = []
    for key in {h.key for h in holds}:
        ordered = sorted((h for h in holds if h.key == key), key=lambda h: h.start)
        for a, b in itertools.pairwise(ordered):
            if a.end is None or b.start < a.end:
                found.append((a, b))
    return found


def fences_rise(holds: Sequence[Hold]) -> bool:
    """Whether, for every key, fences increase in the order the holds started."""
    for key in {h.key for h in holds}:
        fences = [
            h.fence for h in sorted((h for h in holds if h.key == key), key=lambda h: h.start)
        ]
        if any(b <= a for a, b in itertools.pairwise(fences)):
            return False
    return True


def timeline(
    holds: Sequence[Hold], t0: float, t1: float, kill: tuple[float, str] | None, width: int = 64
) -> list[str]:
    """Draw one row per key: the letter of the holder in each time slot, '.' when free."""
    rows = []
    step = (t1 - t0) / width
    for key in KEYS:
        cells = []
        for i in range(width):
            mid = t0 + (i + 0.5) * step
            who = next(
                (
                    h.worker
                    for h in holds
                    if h.key == key and h.start <= mid and (h.end or t1) > mid
                ),
                ".",
            )
            cells.append(who)
        if kill and kill[1] == key:
            cells[min(width - 1, int((kill[0] - t0) / step))] = "X"
        rows.append(f"{key:>11} |{''.join(cells)}|")
    rows.append(f"{'':>11}  0 s{'':{width - 10}}{t1 - t0:4.1f} s")
    return rows


def _remove_keys(url: str, prefix: str) -> None:
    """Delete what the demo wrote (on a user's Redis too): every key under its own prefix."""
    import redis

    from .cleanup import remove_prefixed

    with redis.Redis.from_url(url) as client:
        remove_prefixed(client, prefix)


@dataclass
class _Watch:
    """What the demo sees of the workers' holds, and the one kill it makes."""

    url: str
    prefix: str
    ttl: float
    t0: float
    out: TextIO
    holds: list[Hold] = field(default_factory=list)
    open_holds: dict[tuple[str, str], Hold] = field(default_factory=dict)
    kill: tuple[float, str] | None = None  # (when, key)
    killed_worker: str = ""
    freed_after: float | None = None
    freed_by_probe: list[float] = field(default_factory=list)

    def saw(self, kind: str, name: str, key: str, fence: int, at: float) -> None:
        """Record one worker's event: a grant ("hold") or a release ("done")."""
        if kind == "hold":
            hold = Hold(name, key, fence, at)
            self.holds.append(hold)
            self.open_holds[(name, key)] = hold
            note = ""
            kill = self.kill
            if kill and kill[1] == key and self.freed_after is None and name != self.killed_worker:
                self.freed_after = at - kill[0]
                note = f"   <- free again {self.freed_after:.2f} s after the kill"
            print(
                f"  {at - self.t0:5.2f} s  worker {name} holds {key}  fence {fence}{note}",
                file=self.out,
            )
        elif kind == "done":
            finished = self.open_holds.pop((name, key), None)
            if finished is not None:
                finished.end = at

    def kill_a_holder(self, procs: dict[str, Any]) -> None:
        """SIGKILL one worker while it holds a key, and wait for that key in a thread."""
        (name, key), hold = next(iter(self.open_holds.items()))
        pid = procs[name].pid
        if not pid:
            return
        os.kill(pid, signal.SIGKILL)
        self.kill = (time.time(), key)
        self.killed_worker = name
        hold.end = self.kill[0]  # it stops working; its lease lives on until expiry
        self.open_holds.pop((name, key))
        print(
            f"  {self.kill[0] - self.t0:5.2f} s  ** worker {name} killed (SIGKILL) holding {key}:"
            f" no release will run; the lease must expire **",
            file=self.out,
        )
        # Also wait for the key here, in case no worker happens to pick it again.
        args = (self.url, self.prefix, key, self.ttl, self.freed_by_probe)
        threading.Thread(target=_probe, args=args, daemon=True).start()

    def report(self) -> int:
        """Print the timeline and the checks; return 0 when every check holds."""
        out, kill = self.out, self.kill
        if kill is not None and self.freed_by_probe:
            probed = self.freed_by_probe[0] - kill[0]
            self.freed_after = probed if self.freed_after is None else min(self.freed_after, probed)
        holds, freed_after = self.holds, self.freed_after
        t1 = max([h.end or h.start for h in holds] + [time.time()])
        bad = overlaps(holds)
        rising = fences_rise(holds)
        print("\nTimeline (one row per key; letters are workers, X the kill):", file=out)
        for row in timeline(holds, self.t0, t1, kill):
            print("  " + row, file=out)
        print("\nSummary", file=out)
        print(f"  leases granted            {len(holds)}", file=out)
        print(f"  overlapping holds         {len(bad)}", file=out)
        print(f"  fences rising on each key {'yes' if rising else 'NO'}", file=out)
        if kill:
            freed = (
                f"{freed_after:.2f} s (ttl {self.ttl:g} s)"
                if freed_after is not None
                else "not seen"
            )
            print(f"  killed holder's key free  after {freed}", file=out)
        else:
            print("  (no worker was caught holding a key, so none was killed)", file=out)
        # No grant or no kill would be a demo that showed nothing: that fails too.
        ok = bool(holds) and not bad and rising and kill is not None and freed_after is not None
        print("\n" + ("All checks passed." if ok else "A CHECK FAILED."), file=out)
        return 0 if ok else 1


def run(
    url: str | None = None,
    *,
    workers: int = 4,
    duration: float = 8.0,
    ttl: float = 2.0,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demo; return 0 when every check holds (no overlap, fences rising, key freed)."""
    if url is None:
        with embedded_redis() as embedded:
            print(f"Started a private Redis at {embedded} (no server to install).", file=out)
            return run(embedded, workers=workers, duration=duration, ttl=ttl, out=out)
    prefix = f"demo-{os.getpid()}"
    ctx = mp.get_context("spawn")
    events, go = ctx.Queue(), ctx.Event()
    procs = {
        NAMES[i]: ctx.Process(
            target=_worker, args=(url, prefix, NAMES[i], ttl, duration, events, go), daemon=True
        )
        for i in range(workers)
    }
    for p in procs.values():
        p.start()
    _wait_ready(events, workers, time.time() + 120)
    t0 = time.time()
    stop_at = t0 + duration
    go.set()
    print(
        f"{workers} worker processes contend for {', '.join(KEYS)} (ttl {ttl:g} s) for "
        f"{duration:g} s; one will be killed with SIGKILL while it holds a key.\n",
        file=out,
    )
    watch = _Watch(url, prefix, ttl, t0, out)
    deadline = stop_at + ttl * 4 + 10
    try:
        while time.time() < deadline and (
            any(p.is_alive() for p in procs.values()) or not events.empty()
        ):
            try:
                kind, name, key, fence, at, _pid = events.get(timeout=0.1)
                watch.saw(kind, name, key, fence, at)
            except queue.Empty:
                pass
            if watch.kill is None and time.time() > t0 + duration / 3 and watch.open_holds:
                watch.kill_a_holder(procs)
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)
        _remove_keys(url, prefix)
    return watch.report()
