#!/usr/bin/env python
"""Uncontended acquire+release on every celery-exclusive store, and the plain Django recipe.

Run from the repository root::

    python benchmarks/bench_backends.py            # full run: 5 rounds x 1,000 pairs
    python benchmarks/bench_backends.py --quick    # smoke run: 2 rounds x 200 pairs
    python benchmarks/bench_backends.py --write    # also write benchmarks/results/backends-DATE.md

In one process, side by side, contenders interleaved in rounds (the order rotates each round):

- celery-exclusive leases (one ``Lease`` reused, ``auto_renew=True`` and ``False``) on
  ``memory://``, ``redis://`` (a private redis-server), ``sqlite:///`` (a temp file),
  ``postgresql://`` (a private PostgreSQL, ``tests/pg.py``) and ``django-cache://ALIAS`` on
  Django's ``RedisCache`` (the same redis-server), ``DatabaseCache`` (SQLite in a temp dir, and
  the private PostgreSQL) and ``PyMemcacheCache`` (a private memcached, if one is installed);
- the plain recipe ``cache.add(key, "1", timeout)`` + ``cache.delete(key)`` on each of those
  Django caches.

It reports the median and p99 per pair, the ratio to the ``redis://`` row (auto_renew=True)
measured in the same round, and for each Django cache the ratio of our ``django-cache://`` row
to the plain recipe on the same cache. Every server it starts is private (free loopback port,
temp dir) and is stopped at the end, whatever happens. Every loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import os
import platform
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchreport import log, percentile  # noqa: E402

import celery_exclusive  # noqa: E402
from celery_exclusive import connect  # noqa: E402

TTL = 30  # seconds: the lease ttl and the recipe's cache timeout
REF = "redis://"  # the store of the reference row
RECIPE = "plain cache.add + cache.delete"


# -- contenders -----------------------------------------------------------------------------


@dataclass
class Contender:
    store: str  # e.g. "redis://", "Django RedisCache"
    client: str  # "celery-exclusive" or RECIPE
    renew: bool | None  # auto_renew (None for the recipe)
    pair: Callable[[], None]
    samples: list[int] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        renew = "" if self.renew is None else f", auto_renew={self.renew}"
        return f"{self.store}: {self.client}{renew}"


def _lease_pair(store: Any, key: str, renew: bool, name: str) -> Callable[[], None]:
    lease = store.lease(key, ttl=TTL, auto_renew=renew)
    acquire, release = lease.acquire, lease.release

    def pair() -> None:
        if not acquire(blocking=False):
            raise RuntimeError(f"{name}: uncontended acquire refused")
        release()

    return pair


def _recipe_pair(cache: Any, key: str, name: str) -> Callable[[], None]:
    add, delete = cache.add, cache.delete

    def pair() -> None:
        if not add(key, "1", TTL):
            raise RuntimeError(f"{name}: uncontended cache.add refused")
        delete(key)

    return pair


# -- statistics and output ------------------------------------------------------------------


def _block(pair: Callable[[], None], n: int) -> list[int]:
    clock = time.perf_counter_ns
    samples = [0] * n
    for i in range(n):
        t = clock()
        pair()
        samples[i] = clock() - t
    return samples


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def _git_revision() -> str:
    rev = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"])
    return f"{rev} (+ uncommitted changes in src/)" if dirty else rev


def _pkg(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the servers and Django -----------------------------------------------------------------


class _CacheRouter:
    """Sends the PostgreSQL cache table's model to the ``pg`` database, the rest to default."""

    pg_table = "cex_bench_cache_pg"

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return "pg" if getattr(model._meta, "db_table", "") == self.pg_table else None

    db_for_read = db_for_write


def _configure_django(tmp: str, redis_url: str, pg_dsn: str | None, mc: str | None) -> list[str]:
    """Configure Django in-process; return the cache aliases to benchmark."""
    from urllib.parse import unquote, urlsplit

    import django
    from django.conf import settings
    from django.core.management import call_command

    databases: dict[str, Any] = {
        "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": os.path.join(tmp, "dj.db")}
    }
    caches: dict[str, Any] = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
        "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url},
        "db": {"BACKEND": "django.core.cache.backends.db.DatabaseCache", "LOCATION": "cex_bench"},
    }
    if pg_dsn:
        parts = urlsplit(pg_dsn)
        databases["pg"] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": parts.path.lstrip("/") or "postgres",
            "USER": unquote(parts.username or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
        }
        caches["db_pg"] = {
            "BACKEND": "django.core.cache.backends.db.DatabaseCache",
            "LOCATION": _CacheRouter.pg_table,
        }
    if mc:
        caches["memcached"] = {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": mc,
        }
    settings.configure(
        DATABASES=databases,
        CACHES=caches,
        INSTALLED_APPS=[],
        DATABASE_ROUTERS=[_CacheRouter()],
        USE_TZ=True,
    )
    django.setup()
    call_command("createcachetable", "cex_bench", database="default", verbosity=0)
    if pg_dsn:
        call_command("createcachetable", _CacheRouter.pg_table, database="pg", verbosity=0)
    return [alias for alias in caches if alias != "default"]


CACHE_LABELS = {
    "redis": "Django RedisCache",
    "db": "Django DatabaseCache (SQLite)",
    "db_pg": "Django DatabaseCache (PostgreSQL)",
    "memcached": "Django PyMemcacheCache",
}


# -- the benchmark --------------------------------------------------------------------------


def measure(contenders: list[Contender], rounds: int, pairs: int) -> None:
    warm = max(50, pairs // 20)
    for r in range(rounds):
        k = r % len(contenders)
        order = contenders[k:] + contenders[:k]  # rotate: nobody always runs first
        if r % 2:
            order.reverse()
        t0 = time.monotonic()
        for c in order:
            _block(c.pair, warm)
            gc.collect()
            block = _block(c.pair, pairs)
            c.samples += block
            c.medians.append(statistics.median(block))
        log(f"round {r + 1}/{rounds} done in {time.monotonic() - t0:.1f} s")


def _ratio(a: Contender, b: Contender) -> list[float]:
    return [x / y for x, y in zip(a.medians, b.medians, strict=True)]


def table(contenders: list[Contender]) -> tuple[list[str], list[list[str]]]:
    columns = [
        "store",
        "client",
        "auto_renew",
        "median us",
        "p99 us",
        f"vs {REF}",
        "vs recipe, same cache",
        f"per-round vs {REF}",
    ]
    ref = next(c for c in contenders if c.store == REF and c.renew)
    recipes = {c.store: c for c in contenders if c.client == RECIPE}
    rows = []
    for c in contenders:
        to_ref = _ratio(c, ref)
        recipe = recipes.get(c.store)
        vs_recipe = "-"
        if recipe is not None:
            vs_recipe = f"{statistics.median(_ratio(c, recipe)):.2f}x"
        rows.append(
            [
                c.store,
                c.client,
                "-" if c.renew is None else str(c.renew),
                f"{statistics.median(c.samples) / 1000:.1f}",
                f"{percentile(c.samples, 99) / 1000:.1f}",
                f"{statistics.median(to_ref):.2f}x",
                vs_recipe,
                f"{min(to_ref):.2f}-{max(to_ref):.2f}",
            ]
        )
    return columns, rows


def markdown(env: dict[str, str], title: str, columns: list[str], rows: list[list[str]],
             notes: list[str]) -> str:  # fmt: skip
    out = [f"# Store backends, {env['date']}", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in env.items()]
    out += ["", f"## {title}", ""]
    out.append("| " + " | ".join(columns) + " |")
    out.append("|" + "|".join("---" if i < 3 else "---:" for i in range(len(columns))) + "|")
    out += ["| " + " | ".join(r) + " |" for r in rows]
    out += ["", *(f"- {n}" for n in notes), ""]
    return "\n".join(out)


def show(env: dict[str, str], title: str, columns: list[str], rows: list[list[str]],
         notes: list[str]) -> None:  # fmt: skip
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(env, title, columns, rows, notes))
        return
    console = Console() if Console().is_terminal else Console(width=160)
    t = Table(title="Machine and versions", show_header=False)
    for k, v in env.items():
        t.add_row(k, v)
    console.print(t)
    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < 3 else "right")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    for n in notes:
        console.print(f"  [dim]- {n}[/dim]")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds x 200 pairs")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--pairs", type=int, help="pairs per contender per round (1000 / 200)")
    parser.add_argument(
        "--write", action="store_true", help="write benchmarks/results/backends-YYYY-MM-DD.md"
    )
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    pairs = args.pairs or (200 if args.quick else 1_000)
    started = time.monotonic()
    prefix = f"cexbench-{secrets.token_hex(4)}"

    from tests.django.servers import MemcachedServer, memcached_binary
    from tests.pg import PostgresServer
    from tests.servers import RedisServer

    notes: list[str] = []
    env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:  # every server and temp dir is cleaned up on exit
        tmp = tempfile.mkdtemp(prefix="cex-bench-backends-")
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        log("starting redis-server ...")
        redis_srv = RedisServer()
        stack.callback(redis_srv.cleanup)
        redis_srv.start()
        pg_srv: PostgresServer | None = None
        log("starting PostgreSQL ...")
        try:
            pg_srv = PostgresServer()
            stack.callback(pg_srv.cleanup)
            pg_srv.start()
        except Exception as exc:  # no binaries, or it would not start: skip its rows
            notes.append(f"PostgreSQL rows skipped: {exc}")
            log(f"no PostgreSQL: {exc}")
            pg_srv = None
        mc_srv: MemcachedServer | None = None
        if memcached_binary():
            log("starting memcached ...")
            mc_srv = MemcachedServer()
            stack.callback(mc_srv.cleanup)
            mc_srv.start()
        else:
            notes.append("PyMemcacheCache rows skipped: no memcached binary found")

        aliases = _configure_django(
            tmp, redis_srv.url, pg_srv.dsn if pg_srv else None, mc_srv.location if mc_srv else None
        )
        from django.core.cache import caches
        from django.db import connections

        stack.callback(connections.close_all)  # runs before the servers stop (LIFO)
        stack.callback(caches.close_all)

        urls = {
            "memory://": "memory://",
            "redis://": redis_srv.url,
            "sqlite:///": f"sqlite:///{os.path.join(tmp, 'leases.db')}",
        }
        if pg_srv:
            urls["postgresql://"] = pg_srv.dsn
        contenders: list[Contender] = []

        def add(label: str, client: str, renew: bool | None, store: Any = None) -> None:
            c = Contender(label, client, renew, lambda: None)
            key = f"{prefix}-{len(contenders)}"
            if renew is None:
                c.pair = _recipe_pair(store, key, c.name)
            else:
                c.pair = _lease_pair(store, key, renew, c.name)
            contenders.append(c)

        for label, url in urls.items():
            store = connect(url, prefix=prefix) if label != "memory://" else connect(url)
            stack.callback(store.close)
            for renew in (True, False):
                add(label, "celery-exclusive", renew, store)
        for alias in aliases:
            label = CACHE_LABELS[alias]
            store = connect(f"django-cache://{alias}?prefix={prefix}")
            stack.callback(store.close)
            for renew in (True, False):
                add(label, f"celery-exclusive django-cache://{alias}", renew, store)
            add(label, RECIPE, None, caches[alias])

        env = _environment(redis_srv, pg_srv, mc_srv, rounds, pairs, args.quick)
        log(f"{len(contenders)} contenders, {rounds} rounds x {pairs} pairs ...")
        measure(contenders, rounds, pairs)
        log("stopping the servers ...")
    # every server is stopped here
    title = f"Uncontended acquire+release, {rounds} interleaved rounds x {pairs:,} pairs"
    columns, rows = table(contenders)
    notes += [
        f"median/p99 over every pair of every round, wall time; vs {REF}: median over rounds of "
        f"(row's round median / the {REF} auto_renew=True row's median in the same round)",
        "vs recipe, same cache: median over rounds of (row's round median / the plain recipe's "
        "median on the same Django cache in the same round)",
        "each contender reuses one Lease (or one key for the recipe) and the store's "
        f"connection; ttl / cache timeout {TTL} s; the stores share one process, one "
        "redis-server, one PostgreSQL",
        "the recipe releases with a bare cache.delete: no owner check, no fencing token, no "
        "renewal",
    ]
    env["load average at end"] = _load()
    env["run time"] = f"{time.monotonic() - started:.0f} s"
    show(env, title, columns, rows, notes)
    if args.write:
        out = ROOT / "benchmarks" / "results"
        out /= f"backends-{dt.datetime.now(dt.timezone.utc):%Y-%m-%d}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown(env, title, columns, rows, notes), encoding="utf-8")
        log(f"wrote {out.relative_to(ROOT)}")
    return 0


def _environment(redis_srv: Any, pg_srv: Any, mc_srv: Any, rounds: int, pairs: int,
                 quick: bool) -> dict[str, str]:  # fmt: skip
    import django
    import psycopg
    import redis

    with redis_srv.client() as c:
        redis_version = c.info("server").get("redis_version")
    pg = "not run"
    if pg_srv is not None:
        with psycopg.connect(pg_srv.dsn, connect_timeout=5) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        pg = f"{row[0] if row else '?'} (private, {pg_srv.bin_dir})"
    mc = "not run (no memcached binary)"
    if mc_srv is not None:
        mc = f"{_run([mc_srv.binary, '-V']).removeprefix('memcached ')} (private, {mc_srv.binary})"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if quick else "full",
        "CPU": f"{_cpu_model()}, {os.cpu_count()} logical cores",
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis-server": f"{redis_version} (private, {redis_srv.binary})",
        "PostgreSQL server": pg,
        "memcached": mc,
        "SQLite (library)": sqlite3.sqlite_version,
        "Django": django.get_version(),
        "psycopg": psycopg.__version__,
        "redis-py": redis.__version__,
        "pymemcache": _pkg("pymemcache"),
        "celery-exclusive": f"{celery_exclusive.__version__}, git {_git_revision()}",
        "load average at start": _load(),
        "settings": f"{rounds} rounds x {pairs} pairs per contender (+ warm-up), ttl {TTL} s",
    }


if __name__ == "__main__":
    sys.exit(main())
