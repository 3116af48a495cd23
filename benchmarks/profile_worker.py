#!/usr/bin/env python
"""Profile a real worker's per-task path: where the time of one protected task goes.

Run from the repository root::

    python benchmarks/profile_worker.py                       # every contender, 1,000 tasks each
    python benchmarks/profile_worker.py ce_running plain -n 2000 --top 40

For each contender (a task of ``celery_bench_app``) it publishes ``n`` tasks with distinct
arguments to a queue of their own on a private redis-server, then drains them with a Celery
worker running in this process on the ``solo`` pool, so that the consumer loop, the tracer, the
task and the lock library all run in one thread that ``cProfile`` sees. The profiler is switched
on at the 21st task's ``task_prerun`` (connections and scripts are loaded by then) and off at
the last task's ``task_postrun``. It prints, per contender, the profiled time per task, and the
functions with the most own time (``tottime``) and the library's functions by cumulative time.
The profiler slows everything down about alike, so compare contenders, not absolute times.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import secrets
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
for _p in (str(BENCH), str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tests.servers import RedisServer  # noqa: E402

CONTENDERS = ("plain", "ce_running", "ce_queued", "ce_until_done", "once", "singleton")
WARM_UP = 20


@dataclass
class Run:
    """One drain: the profile (if taken), and wall and CPU seconds over the profiled tasks."""

    stats: pstats.Stats | None
    wall: float
    cpu: float
    tasks: int


def drain(app: Any, task: Any, n: int, profile: bool, pool: str = "solo") -> Run:
    """Publish ``n`` calls of ``task``, drain them on a worker in this process (``solo``, or
    ``threads`` with 4 threads: then the profile covers the consumer thread only)."""
    from celery import signals
    from celery._state import _set_task_join_will_block

    queue = f"{os.environ['CEXB_PREFIX']}.{task.name}"
    _set_task_join_will_block(True)  # no result subscription per published task
    for i in range(n):
        task.apply_async((i,), queue=queue)
    prof = cProfile.Profile() if profile else None
    seen = {"pre": 0, "post": 0, "t0": 0.0, "t1": 0.0, "c0": 0.0, "c1": 0.0}
    done = threading.Event()

    def pre(sender: Any = None, **kw: Any) -> None:
        seen["pre"] += 1
        if seen["pre"] == WARM_UP + 1:
            seen["t0"], seen["c0"] = time.perf_counter(), time.process_time()
            if prof is not None:
                prof.enable()

    def post(sender: Any = None, **kw: Any) -> None:
        seen["post"] += 1
        if seen["post"] == n:
            if prof is not None:
                prof.disable()
            seen["t1"], seen["c1"] = time.perf_counter(), time.process_time()
            done.set()

    signals.task_prerun.connect(pre, weak=False)
    signals.task_postrun.connect(post, weak=False)
    worker = app.Worker(
        pool=pool,
        concurrency=1 if pool == "solo" else 4,
        queues=[queue],
        hostname=f"prof{secrets.token_hex(3)}@localhost",
        without_mingle=True,
        without_gossip=True,
        without_heartbeat=True,
        loglevel="WARNING",
    )

    def stop_when_done() -> None:
        done.wait(600)
        worker.stop(in_sighandler=False)

    threading.Thread(target=stop_when_done, daemon=True).start()
    try:
        worker.start()
    finally:
        signals.task_prerun.disconnect(pre)
        signals.task_postrun.disconnect(post)
    if not done.is_set():
        raise RuntimeError(f"{task.name}: only {seen['post']} of {n} tasks ran")
    stats = pstats.Stats(prof) if prof is not None else None
    return Run(stats, seen["t1"] - seen["t0"], seen["c1"] - seen["c0"], n - WARM_UP)


def report(name: str, run: Run, top: int) -> None:
    out = sys.__stdout__  # the worker redirected sys.stdout to its logger
    print(
        f"\n=== {name}: {run.wall / run.tasks * 1e6:.0f} us per task under the profiler ===",
        file=out,
    )
    text_out = io.StringIO()
    stats = run.stats
    assert stats is not None
    stats.stream = text_out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(
        r"celery_exclusive|celery_once|celery_singleton", top
    )
    text = text_out.getvalue()
    print(text[text.find("   ncalls") :] if "   ncalls" in text else text, file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("contenders", nargs="*", choices=[*CONTENDERS, []])
    parser.add_argument("-n", type=int, default=1000, help="tasks per contender")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    parser.add_argument(
        "--timing",
        type=int,
        metavar="ROUNDS",
        help="no profiler: drain each contender ROUNDS times, interleaved, and print the "
        "median wall and CPU time per task (this process: consumer, task and library)",
    )
    parser.add_argument("--pool", choices=["solo", "threads"], default="solo")
    parser.add_argument("--dump", metavar="DIR", help="also write each profile to DIR/NAME.prof")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one drain, in a child
    args = parser.parse_args(argv)
    args.contenders = args.contenders or list(CONTENDERS)
    if args.one:
        import celery_bench_app

        run = drain(
            celery_bench_app.app,
            getattr(celery_bench_app, args.one),
            args.n,
            not args.timing,
            args.pool,
        )
        if args.timing:
            print(
                "RESULT",
                json.dumps([run.wall / run.tasks, run.cpu / run.tasks]),
                file=sys.__stdout__,
            )
        else:
            report(args.one, run, args.top)
            if args.dump and run.stats is not None:
                run.stats.dump_stats(os.path.join(args.dump, f"{args.one}.prof"))
        return 0
    server = RedisServer().start()
    try:
        base = f"redis://127.0.0.1:{server.port}"
        env = dict(
            os.environ,
            CEXB_BROKER_URL=f"{base}/0",
            CEXB_RESULT_URL=f"{base}/1",
            CEXB_STORE_URL=f"{base}/2",
            CEXB_PREFIX=f"cexprof-{secrets.token_hex(3)}",
        )

        def one(name: str) -> str:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                name,
                "-n",
                str(args.n),
                "--top",
                str(args.top),
            ]
            if args.timing:
                cmd += ["--timing", "1"]
            if args.dump:
                cmd += ["--dump", args.dump]
            cmd += ["--pool", args.pool]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode:
                raise RuntimeError(f"{name}: {done.stderr[-3000:]}")
            return done.stdout

        if not args.timing:
            for name in args.contenders:
                print(one(name))
            return 0
        runs: dict[str, list[list[float]]] = {name: [] for name in args.contenders}
        names = list(args.contenders)
        for r in range(args.timing):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                out = one(name)
                runs[name].append(json.loads(out[out.index("RESULT ") + 7 :].splitlines()[0]))
        print(
            f"{'contender':<16}{'wall us/task':>14}{'cpu us/task':>14}   (median of {args.timing})"
        )
        for name, done in runs.items():
            wall = statistics.median(w for w, _ in done) * 1e6
            cpu = statistics.median(c for _, c in done) * 1e6
            print(f"{name:<16}{wall:>14.0f}{cpu:>14.0f}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
