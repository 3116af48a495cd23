"""Django cache backend: leases in a cache of your Django project (``django-cache://ALIAS``).

Which caches, and how each one keeps the lease contract (see ``docs/django.md``)::

    django.core.cache.backends.redis.RedisCache   the Redis backend, on the cache's own
    django_redis.cache.RedisCache                 redis-py client: every operation is one Lua
                                                  script, expiry on the Redis clock
    django.core.cache.backends.db.DatabaseCache   compare-and-swap on the cache table, on a
                                                  connection of its own (autocommit)
    django.core.cache.backends.memcached
        .PyMemcacheCache                          compare-and-swap with memcached gets/cas

Refused with :class:`ConfigurationError` (and reported by the Django system check
``celery_exclusive.E001``): ``LocMemCache`` (each process has its own: a lease would protect
one process only), ``DummyCache`` (stores nothing: everyone would get the lease) and
``FileBasedCache`` (``add`` checks for the file, then writes it: two processes can both win).
``PyLibMCCache``, django-redis's ``ShardClient`` and unknown cache classes are refused too
(``celery_exclusive.E003``): no atomic compare-and-swap is known for them, and this project
offers no non-atomic fallback.

Database and Memcached keep one *record* per lease key, a JSON document with the key's last
fence and its holders (token -> expiry, fence, acquired, renewed, metadata)::

    {"k": "<lease key>", "f": <last fence>, "h": {"<token>": [exp_us, fence, acq_us, ren_us, meta]}}

Every change (acquire, release, renewal, force-release) reads the record and writes it back
only if it is unchanged since the read: ``UPDATE ... WHERE cache_key = %s AND value = %s`` on
the database, ``cas`` with the ``gets`` unique on Memcached; a first grant inserts it
(``INSERT``, Memcached ``add``), which fails if another process inserted first. A refused write
means another process changed the record in between: the operation reads again and retries.
The fence counter lives in the same record, so it rises in the same atomic step as the grant;
a record that is gone (expired after ``fence_retention``, evicted, cleared) is created again
seeded from the clock in microseconds, as on Redis. Expiry on these two stores is judged by
the workers' clocks (as Django's own database cache does), so their clocks must agree (NTP).

Neither has a release notification: :meth:`DjangoCacheBackend.wait` sleeps for at most
``poll`` seconds (default 0.1) and the caller re-checks.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import math
import os
import random
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from .. import forking
from ..exceptions import BackendError, ConfigurationError, LimitMismatch
from .base import (
    DEFAULT_FENCE_RETENTION,
    DONE,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    RenewRequest,
)

__all__ = [
    "DEFAULT_POLL",
    "CacheSupport",
    "DjangoCacheBackend",
    "backend_for_cache",
    "from_url",
    "inspect_cache",
]

logger = logging.getLogger(__name__)

#: A waiter on a cache without notifications sleeps at most this long before re-checking.
DEFAULT_POLL = 0.1

#: How often one operation retries after another process changed the record under it.
MAX_ATTEMPTS = 100

#: Longest store key (bytes) we write as is; longer lease keys are hashed (Memcached: 250).
MAX_CELL_KEY = 240

#: Records whose retention has passed are deleted from the cache table at most this often.
CLEANUP_INTERVAL = 300.0

# Memcached's index of record names, for listings: each name is in one of these items (an
# item holds at most 1 MB, about 15,000 names; 16 items list about 250,000 keys).
INDEX_SHARDS = 16
INDEX_CELL = "celery-exclusive#index:{}"

_EXTRA = "pip install 'celery-exclusive[django]'"

_HINT = (
    "Point CELERY_EXCLUSIVE_CACHE at a Redis, database or Memcached (PyMemcacheCache) cache "
    "that every web and worker process shares, or set CELERY_EXCLUSIVE_URL to a store URL "
    "(redis://..., postgresql://...)."
)

#: Cache classes (by the path of a class in their MRO) that can never hold a lease.
_REFUSED = {
    "django.core.cache.backends.locmem.LocMemCache": (
        "E001",
        "keeps its entries in the memory of each process: a lease in it would protect one "
        "process only, while every other web or worker process takes the same key.",
    ),
    "django.core.cache.backends.dummy.DummyCache": (
        "E001",
        "stores nothing: its add() always succeeds, so every caller would get the lease.",
    ),
    "django.core.cache.backends.filebased.FileBasedCache": (
        "E001",
        "is not atomic: its add() checks whether the file exists and then writes it, so two "
        "processes can both get the lease.",
    ),
    "django.core.cache.backends.memcached.PyLibMCCache": (
        "E003",
        "is not supported: the lease needs Memcached's gets/cas, which this project drives "
        "through pymemcache. Use django.core.cache.backends.memcached.PyMemcacheCache with "
        "the same servers.",
    ),
}

#: Cache classes that can, and which implementation serves them.
_SUPPORTED = {
    "django.core.cache.backends.redis.RedisCache": "redis",
    "django_redis.cache.RedisCache": "django-redis",
    "django.core.cache.backends.db.DatabaseCache": "database",
    "django.core.cache.backends.memcached.PyMemcacheCache": "memcached",
}


def _import_django() -> Any:
    try:
        import django
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(f"django-cache:// needs Django: {_EXTRA}") from exc
    return django


# -- which caches are supported: a static look at the settings, no connection ----------------


@dataclass(frozen=True)
class CacheSupport:
    """Whether a cache alias can hold leases, found from the settings alone (no network).

    ``kind`` is ``redis``, ``django-redis``, ``database`` or ``memcached`` when it can;
    otherwise ``problem`` says why not, ``check_id`` is the system check's id (``E001``: not
    shared or not atomic; ``E003``: not supported), and ``hint`` what to configure instead.
    """

    alias: str
    backend: str = ""
    kind: str = ""
    problem: str = ""
    check_id: str = ""
    hint: str = _HINT

    @property
    def supported(self) -> bool:
        return not self.problem

    def error(self) -> ConfigurationError:
        """The error to raise for an unsupported cache."""
        return ConfigurationError(f"{self.problem} {self.hint}")


def inspect_cache(alias: str) -> CacheSupport:
    """Tell whether the cache ``alias`` of ``settings.CACHES`` can hold leases.

    Reads the settings and imports the cache class; never connects to anything, so system
    checks can call it.
    """
    _import_django()
    from django.conf import settings
    from django.utils.module_loading import import_string

    caches_setting = getattr(settings, "CACHES", None) or {}
    config = caches_setting.get(alias)
    if not isinstance(config, Mapping):
        known = ", ".join(repr(a) for a in caches_setting) or "none"
        return CacheSupport(
            alias,
            problem=f"There is no cache {alias!r} in settings.CACHES (aliases: {known}).",
            check_id="E003",
            hint="Name an alias of settings.CACHES in CELERY_EXCLUSIVE_CACHE.",
        )
    path = str(config.get("BACKEND", ""))
    try:
        cls = import_string(path)
    except ImportError as exc:
        return CacheSupport(
            alias,
            backend=path,
            problem=f"The cache {alias!r} has a BACKEND that cannot be imported ({exc}).",
            check_id="E003",
            hint="Install the cache's package, or fix settings.CACHES.",
        )
    label = f"The cache {alias!r} ({path})"
    for klass in getattr(cls, "__mro__", ()):
        name = f"{klass.__module__}.{klass.__qualname__}"
        if name in _REFUSED:
            check_id, why = _REFUSED[name]
            return CacheSupport(alias, backend=path, problem=f"{label} {why}", check_id=check_id)
        kind = _SUPPORTED.get(name)
        if kind is None:
            continue
        if kind == "django-redis":
            options = config.get("OPTIONS") or {}
            client_class = options.get("CLIENT_CLASS", "django_redis.client.DefaultClient")
            client_name = client_class if isinstance(client_class, str) else client_class.__name__
            if client_name.rsplit(".", 1)[-1] == "ShardClient":
                return CacheSupport(
                    alias,
                    backend=path,
                    problem=(
                        f"{label} uses django-redis's ShardClient, which spreads keys over "
                        "servers by its own hashing; a lease needs one server per key that "
                        "runs its scripts."
                    ),
                    check_id="E003",
                    hint="Set CELERY_EXCLUSIVE_URL to one Redis (redis://...) or a Redis "
                    "Cluster (redis+cluster://...) instead.",
                )
        return CacheSupport(alias, backend=path, kind=kind)
    return CacheSupport(
        alias,
        backend=path,
        problem=(
            f"{label} is not a cache celery-exclusive knows how to lock atomically (supported: "
            "Django's RedisCache, django-redis, DatabaseCache, PyMemcacheCache)."
        ),
        check_id="E003",
    )


# -- construction ---------------------------------------------------------------------------


def from_url(url: str, **options: Any) -> Backend:
    """Build the backend of ``django-cache://ALIAS[?poll=0.1&fence_retention=604800]``.

    ``prefix`` (an option, or a query parameter) starts every store key, after the cache's
    own ``KEY_PREFIX``.
    """
    alias, values = parse_url(url, **options)
    return backend_for_cache(alias, **values)


#: The query parameters (and keyword options) of a django-cache:// URL.
URL_OPTIONS = ("prefix", "poll", "fence_retention")


def parse_url(url: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """Parse and check a ``django-cache://`` URL (Django is not needed for this).

    Returns the cache alias and the keyword arguments of :func:`backend_for_cache`; raises
    :class:`ConfigurationError` naming the bad option and the URL.
    """
    parts = urlsplit(url)
    alias = unquote(parts.netloc or parts.path.strip("/"))
    shown = parts._replace(query="", fragment="").geturl()
    if not alias:
        raise ConfigurationError(f"name a cache alias: django-cache://default, not {url!r}")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = set(query) - set(URL_OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown django-cache:// parameter(s) {sorted(unknown)} in {shown!r}; known: "
            + ", ".join(URL_OPTIONS)
        )
    extra = set(options) - set(URL_OPTIONS)
    if extra:
        raise ConfigurationError(
            f"django-cache:// takes no option(s) {sorted(extra)}; configure the cache in "
            "settings.CACHES"
        )
    values: dict[str, Any] = {"prefix": query.get("prefix", options.get("prefix", "exclusive"))}
    defaults = {"poll": DEFAULT_POLL, "fence_retention": DEFAULT_FENCE_RETENTION}
    for name, default in defaults.items():
        given = query.get(name, options.get(name, default))
        try:
            number = float(given)
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"django-cache:// {name} must be a number of seconds, not {given!r} (in {shown!r})"
            ) from None
        if not math.isfinite(number) or number <= 0:
            raise ConfigurationError(
                f"django-cache:// {name} must be > 0, not {given!r} (in {shown!r})"
            )
        values[name] = number
    prefix = values["prefix"]
    if not isinstance(prefix, str) or not prefix or "{" in prefix:
        raise ConfigurationError(f"prefix must be a non-empty str without braces: {prefix!r}")
    return alias, values


def backend_for_cache(
    alias: str,
    *,
    prefix: str = "exclusive",
    poll: float = DEFAULT_POLL,
    fence_retention: float = DEFAULT_FENCE_RETENTION,
) -> Backend:
    """Return the backend for the Django cache ``alias`` (refusing caches that can't lock).

    Redis caches get a :class:`~celery_exclusive.backends.redis.RedisBackend` on the cache's
    own redis-py client: the same keys and scripts as ``connect("redis://...")`` on that
    server (with the cache's ``KEY_PREFIX`` in front of ``prefix``). Database and Memcached
    caches get a :class:`DjangoCacheBackend`.
    """
    _import_django()
    from django.conf import settings

    if not settings.configured:
        raise ConfigurationError(
            "django-cache:// needs Django's settings: set DJANGO_SETTINGS_MODULE (and call "
            "django.setup()) before the first lease is taken"
        )
    if not isinstance(prefix, str) or not prefix or "{" in prefix:
        raise ConfigurationError(f"prefix must be a non-empty str without braces: {prefix!r}")
    for name, value in (("poll", poll), ("fence_retention", fence_retention)):
        if not math.isfinite(value) or value <= 0:
            raise ConfigurationError(f"django-cache:// {name} must be > 0, not {value!r}")
    support = inspect_cache(alias)
    if not support.supported:
        raise support.error()
    new_cache = _cache_factory(alias)
    cache = new_cache()
    key_prefix = getattr(cache, "key_prefix", "") or ""
    full_prefix = f"{key_prefix}:{prefix}" if key_prefix else prefix
    description = f"django-cache://{alias} ({support.backend})"
    if support.kind in ("redis", "django-redis"):
        from .redis import RedisBackend

        if support.kind == "redis":
            client = cache._cache.get_client(None, write=True)
        else:
            client = cache.client.get_client(write=True)
        return RedisBackend(
            client,
            prefix=full_prefix,
            fence_retention=fence_retention,
            description=description,
        )
    cells: _Cells
    if support.kind == "database":
        cells = _DatabaseCells(cache, description)
    else:
        cells = _MemcachedCells(new_cache, description)
    return DjangoCacheBackend(
        cells,
        prefix=full_prefix,
        poll=poll,
        fence_retention=fence_retention,
        description=description,
    )


def _cache_factory(alias: str) -> Any:
    """Return a function building new instances of cache ``alias``, as configured now.

    Ours, not Django's ``caches[alias]``: those are per thread and closed at the end of each
    request, and a later ``override_settings`` must not move a store that already exists.
    """
    from django.core.cache import caches
    from django.utils.module_loading import import_string

    params = dict(caches.settings[alias])
    backend_cls = import_string(params.pop("BACKEND"))
    location = params.pop("LOCATION", "")

    def new_cache() -> Any:
        return backend_cls(location, dict(params))

    return new_cache


# -- records ---------------------------------------------------------------------------------


class _Record:
    """One lease key's record: its last fence, its holders (times in microseconds) and the
    limit they were granted under (0: not recorded, by an older version)."""

    __slots__ = ("fence", "holders", "key", "limit")

    def __init__(self, key: str, fence: int, holders: dict[str, list[Any]], limit: int = 0) -> None:
        self.key = key
        self.fence = fence
        self.holders = holders  # token -> [expires, fence, acquired, renewed, meta json]
        self.limit = limit

    @classmethod
    def load(cls, text: str) -> _Record:
        data = json.loads(text)
        return cls(str(data["k"]), int(data["f"]), dict(data["h"]), int(data.get("l", 0)))

    def dump(self) -> str:
        return json.dumps(
            {"k": self.key, "f": self.fence, "h": self.holders, "l": self.limit},
            separators=(",", ":"),
        )

    def live(self, now: int) -> dict[str, list[Any]]:
        return {t: h for t, h in self.holders.items() if int(h[0]) > now}

    def drop_expired(self, now: int) -> None:
        self.holders = self.live(now)

    def holder_list(self, now: int) -> list[Holder]:
        return [
            Holder.stored(token, fence, expires, acquired, renewed, meta, now=now, per_second=1e6)
            for token, (expires, fence, acquired, renewed, meta) in self.live(now).items()
        ]


class _Cells(Protocol):
    """Compare-and-swap registers in a cache: what a record needs from its store."""

    description: str

    def read(self, cell: str) -> tuple[str, Any] | None:
        """Return ``(value, version)`` of ``cell``, or None when it does not exist."""

    def read_many(self, cells: Sequence[str]) -> dict[str, tuple[str, Any]]:
        """Return ``{cell: (value, version)}`` for the cells that exist, in one round trip."""

    def create(self, cell: str, value: str, keep: float, *, listed: bool = True) -> bool:
        """Create ``cell``; False if it already exists. ``listed``: :meth:`scan` must find it."""

    def replace(self, cell: str, value: str, version: Any, keep: float) -> bool:
        """Write ``cell`` only if it is still at ``version``; False if it changed or is gone."""

    def replace_many(self, writes: Sequence[tuple[str, str, Any]], keep: float) -> list[bool]:
        """:meth:`replace` each ``(cell, value, version)``, in as few round trips as can be."""

    def scan(self, prefix: str) -> Iterator[tuple[str, str]]:
        """Yield ``(cell, value)`` for every cell whose name starts with ``prefix``."""

    def cleanup(self, prefix: str) -> None:
        """Delete cells past their retention (where the store does not do it by itself)."""

    def close(self) -> None:
        """Close connections."""


# -- the lease operations, once, over any cells ---------------------------------------------


class DjangoCacheBackend(Backend):
    """Leases in a Django database or Memcached cache, by compare-and-swap on one record per key.

    Get it with ``connect("django-cache://ALIAS")`` (Redis caches get the Redis backend
    instead). Semaphores (``limit`` > 1) work as everywhere: the record holds every holder.
    Renewal is one round trip to read all records plus one write per renewed key (database:
    all writes in one transaction).
    """

    scheme = "django-cache"

    def __init__(
        self,
        cells: _Cells,
        *,
        prefix: str = "exclusive",
        poll: float = DEFAULT_POLL,
        fence_retention: float = DEFAULT_FENCE_RETENTION,
        description: str = "django-cache",
        clock: Any = time.time,
    ) -> None:
        self._cells = cells
        self.prefix = prefix
        self.poll = poll
        self.fence_retention = fence_retention
        self._description = description
        self._clock = clock
        self._next_cleanup = 0.0

    # -- keys and records ---------------------------------------------------------------

    def _cell(self, key: str) -> str:
        cell = f"{self.prefix}:{key}"
        if len(cell.encode()) <= MAX_CELL_KEY:
            return cell
        # The record keeps the full key, so listings still show it.
        return f"{self.prefix}:#{hashlib.sha256(key.encode()).hexdigest()}"

    def _done_cell(self, key: str, task_id: str) -> str:
        return self._cell(f"{key}{DONE}:{task_id}")

    def _now(self) -> int:
        return int(self._clock() * 1_000_000)

    def _keep(self, record: _Record, now: int) -> float:
        longest = max((int(h[0]) - now for h in record.holders.values()), default=0)
        return max(self.fence_retention, 2 * longest / 1e6)

    def _load(self, key: str, value: str) -> _Record:
        try:
            record = _Record.load(value)
        except (ValueError, KeyError, TypeError) as exc:
            raise BackendError(
                f"{self._description} holds a record for {key!r} that is not ours: {exc}"
            ) from exc
        if record.key != key:  # a hashed cell name shared by two keys: refuse, never mix them
            raise BackendError(f"{self._description}: {key!r} and {record.key!r} share a record")
        return record

    def _update(self, key: str, change: Any) -> Any:
        """Apply ``change(record or None, now) -> (new record or None, result)`` atomically.

        ``None`` as the new record means "write nothing". Retries while another process
        changes the record between our read and our write. Why not read, then write blindly
        (the classic get-then-set)::

            A's lease expired; A reads the record to release it (A listed, expired)
            B reads it too, drops A, adds itself, writes: granted
            A writes its copy without A          -> a blind write would erase B's grant;
                                                    here it is refused (the row changed),
                                                    A reads again, finds no A: returns False
        """
        cell = self._cell(key)
        for attempt in range(MAX_ATTEMPTS):
            now = self._now()
            got = self._cells.read(cell)
            record = self._load(key, got[0]) if got is not None else None
            new, result = change(record, now)
            if new is None:
                return result
            keep = self._keep(new, now)
            if got is None:
                if self._cells.create(cell, new.dump(), keep):
                    return result
            elif self._cells.replace(cell, new.dump(), got[1], keep):
                return result
            logger.debug("record of %r changed under us (attempt %d)", key, attempt + 1)
            if attempt >= 3:
                time.sleep(random.uniform(0, 0.002 * min(attempt, 20)))
        raise BackendError(
            f"{self._description}: the record of {key!r} kept changing under us "
            f"({MAX_ATTEMPTS} attempts); too much contention on one key"
        )

    # -- the contract ---------------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        ttl_us = max(1, math.ceil(ttl * 1e6))

        def change(
            record: _Record | None, now: int
        ) -> tuple[_Record | None, Grant | Conflict | LimitMismatch]:
            if record is None:
                # A new (or expired, evicted, cleared) counter starts from the clock, so it
                # still rises above every fence handed out before (docs/guarantees.md, rule 5).
                record = _Record(key, now, {})
            record.drop_expired(now)
            others = len(record.holders) - (token in record.holders)
            if others and record.limit and record.limit != limit:
                return None, LimitMismatch(key=key, limit=record.limit, requested=limit)
            mine = record.holders.get(token)
            if mine is not None:
                mine[0], mine[3] = now + ttl_us, now
                return record, Grant(fence=int(mine[1]), reentered=True)
            if len(record.holders) >= limit:
                retry_in = min(int(h[0]) for h in record.holders.values()) - now
                return None, Conflict(holders=record.holder_list(now), retry_in=retry_in / 1e6)
            record.fence += 1
            record.limit = limit
            record.holders[token] = [now + ttl_us, record.fence, now, now, meta]
            return record, Grant(fence=record.fence)

        result: Grant | Conflict | LimitMismatch = self._update(key, change)
        if isinstance(result, LimitMismatch):
            raise result
        if isinstance(result, Grant) and not result.reentered:
            self._maybe_cleanup()
        return result

    def release(self, key: str, token: str) -> bool:
        def change(record: _Record | None, now: int) -> tuple[_Record | None, bool]:
            if record is None or token not in record.holders:
                return None, False
            was_live = int(record.holders.pop(token)[0]) > now
            return record, was_live

        released: bool = self._update(key, change)
        return released

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        if not requests:
            return []
        by_cell: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            by_cell.setdefault(self._cell(r.key), []).append(i)
        results = [False] * len(requests)
        # One read for every record, then one conditional write per record that changed.
        now = self._now()
        found = self._cells.read_many(list(by_cell))
        writes: list[tuple[str, str, Any]] = []
        planned: dict[str, list[tuple[int, bool]]] = {}
        keep = self.fence_retention
        for cell, indexes in by_cell.items():
            got = found.get(cell)
            if got is None:
                continue  # gone: every lease in it is lost
            record = self._load(requests[indexes[0]].key, got[0])
            outcome = self._renew_record(record, [requests[i] for i in indexes], now)
            planned[cell] = list(zip(indexes, outcome, strict=True))
            if any(outcome):
                keep = max(keep, self._keep(record, now))
                writes.append((cell, record.dump(), got[1]))
        written = dict(
            zip((w[0] for w in writes), self._cells.replace_many(writes, keep), strict=True)
        )
        for cell, outcomes in planned.items():
            if written.get(cell, True):
                for i, ok in outcomes:
                    results[i] = ok
                continue
            # Changed between our read and write (another holder came or went): one by one.
            indexes = [i for i, _ in outcomes]

            def change(
                record: _Record | None, now: int, idx: list[int] = indexes
            ) -> tuple[_Record | None, list[bool]]:
                if record is None:
                    return None, [False] * len(idx)
                outcome = self._renew_record(record, [requests[i] for i in idx], now)
                return (record if any(outcome) else None), outcome

            for i, ok in zip(indexes, self._update(requests[indexes[0]].key, change), strict=True):
                results[i] = ok
        return results

    @staticmethod
    def _renew_record(record: _Record, requests: Sequence[RenewRequest], now: int) -> list[bool]:
        record.drop_expired(now)
        outcome = []
        for r in requests:
            holder = record.holders.get(r.token)
            if holder is not None:
                holder[0], holder[3] = now + max(1, math.ceil(r.ttl * 1e6)), now
            outcome.append(holder is not None)
        return outcome

    def wait(self, key: str, timeout: float) -> bool:
        # No notification in a cache: sleep briefly; the caller re-checks.
        if timeout > 0:
            time.sleep(min(timeout, self.poll))
        return False

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        # A cell of its own, "done:<expiry us>": no lease record, so listings skip it. The
        # expiry is in the value because the database cache reads rows past their expiry.
        value = f"done:{self._now() + int(ttl * 1_000_000)}"
        self._cells.create(self._done_cell(key, task_id), value, ttl, listed=False)

    def is_done(self, key: str, task_id: str) -> bool:
        got = self._cells.read(self._done_cell(key, task_id))
        return got is not None and int(got[0].rpartition(":")[2]) > self._now()

    def holders(self, key: str) -> list[Holder]:
        got = self._cells.read(self._cell(key))
        if got is None:
            return []
        return self._load(key, got[0]).holder_list(self._now())

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        for cell, value in self._cells.scan(f"{self.prefix}:"):
            try:
                record = _Record.load(value)
            except (ValueError, KeyError, TypeError):
                logger.debug("skipping %r in %s: not a lease record", cell, self._description)
                continue
            if match is not None and not fnmatch.fnmatchcase(record.key, match):
                continue
            found = record.holder_list(self._now())
            if found:
                yield LeaseInfo(key=record.key, holders=found)

    def force_release(self, key: str, token: str | None = None) -> int:
        def change(record: _Record | None, now: int) -> tuple[_Record | None, int]:
            if record is None:
                return None, 0
            record.drop_expired(now)
            if token is None:
                removed = len(record.holders)
                record.holders = {}
            else:
                removed = 1 if record.holders.pop(token, None) is not None else 0
            return (record if removed else None), removed

        removed: int = self._update(key, change)
        return removed

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        def change(record: _Record | None, now: int) -> tuple[_Record | None, bool]:
            holder = record.live(now).get(token) if record is not None else None
            if record is None or holder is None:
                return None, False
            holder[4] = meta
            return record, True

        updated: bool = self._update(key, change)
        return updated

    def take(self, key: str, token: str) -> str | None:
        def change(record: _Record | None, now: int) -> tuple[_Record | None, str | None]:
            if record is None or token not in record.live(now):
                return None, None
            return record, str(record.holders.pop(token)[4])

        taken: str | None = self._update(key, change)
        return taken

    def close(self) -> None:
        self._cells.close()

    def describe(self) -> str:
        return self._description

    def _maybe_cleanup(self) -> None:
        now = time.monotonic()
        if now < self._next_cleanup:
            return
        self._next_cleanup = now + CLEANUP_INTERVAL
        try:
            self._cells.cleanup(f"{self.prefix}:")
        except BackendError:
            logger.debug("cleanup of %s failed", self._description, exc_info=True)


# -- connections: one per thread and process ------------------------------------------------


class _PerThread:
    """One connection (or client) per thread and per process, each used under its own lock.

    The lock is uncontended in normal use; it lets :meth:`close`, called from any thread,
    wait for a call in flight instead of closing a connection under it (SQLite crashes the
    process on that). A thread that ended leaves its connection behind; the next thread that
    opens one closes those first, so threads that come and go (a thread per request, per
    blocking acquire) never hold more connections than there are live threads. A forked
    child never touches its parent's connections (closing one there would end the parent's
    session): it opens its own and keeps the parent's referenced.
    """

    def __init__(self, make: Any, close: Any) -> None:
        self._make = make
        self._close = close
        self._local = threading.local()
        self._lock = threading.Lock()
        forking.replace_after_fork(self, "_lock", threading.Lock)
        self._slots: list[_Slot] = []

    @contextlib.contextmanager
    def use(self, broken: tuple[type[BaseException], ...] = ()) -> Iterator[Any]:
        """Yield this thread's connection; drop it when the block raises one of ``broken``."""
        pid = os.getpid()
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None or slot.pid != pid:
            slot = _Slot(pid, threading.current_thread())
            self._local.slot = slot
            with self._lock:
                ended = [s for s in self._slots if s.pid == pid and not s.thread_alive()]
                self._slots = [s for s in self._slots if s not in ended] + [slot]
            for old in ended:
                old.close(self._close, wait=False)
        with slot.lock:
            if slot.conn is None:
                slot.conn = self._make()
            try:
                yield slot.conn
            except broken:
                with contextlib.suppress(Exception):
                    self._close(slot.conn)
                slot.conn = None  # replaced at the next call
                raise

    def close(self) -> None:
        """Close every connection of this process (each after the call using it, if any)."""
        pid = os.getpid()
        with self._lock:
            slots = [slot for slot in self._slots if slot.pid == pid]
        for slot in slots:
            slot.close(self._close, wait=True)


class _Slot:
    """One thread's connection in one process, and the lock its calls hold."""

    __slots__ = ("conn", "lock", "pid", "thread")

    def __init__(self, pid: int, thread: threading.Thread) -> None:
        self.pid = pid
        self.thread = weakref.ref(thread)
        self.lock = threading.Lock()
        self.conn: Any = None

    def thread_alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()

    def close(self, close: Any, *, wait: bool) -> None:
        """Close the connection; without ``wait``, only if no call holds it."""
        if not self.lock.acquire(blocking=wait):
            return
        try:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    close(self.conn)
                self.conn = None
        finally:
            self.lock.release()


# -- SQL on the cache table: {t} the table, {k} cache_key, {v} value, {e} expires ----------
# (names quoted for the database at hand; %s are the parameters, in order)

#: Parameters: the cells ({marks}: one %s each). Returns (cache_key, value) rows.
SQL_READ = "SELECT {k}, {v} FROM {t} WHERE {k} IN ({marks})"
#: Parameters: cell, record, expires. Raises IntegrityError when the row exists already.
SQL_CREATE = "INSERT INTO {t} ({k}, {v}, {e}) VALUES (%s, %s, %s)"
#: Parameters: new record, expires, cell, the record as read. Changes 1 row, or 0 when the row
#: changed (or went) since it was read: the compare-and-swap.
SQL_SWAP = "UPDATE {t} SET {v} = %s, {e} = %s WHERE {k} = %s AND {v} = %s"
#: Parameters: a LIKE pattern (escape character !). Returns (cache_key, value) rows.
SQL_SCAN = "SELECT {k}, {v} FROM {t} WHERE {k} LIKE %s ESCAPE '!'"
#: Parameters: a LIKE pattern, now. Deletes our records past their retention.
SQL_CLEANUP = "DELETE FROM {t} WHERE {k} LIKE %s ESCAPE '!' AND {e} < %s"


# -- the database cache ---------------------------------------------------------------------


class _DatabaseCells:
    """Records as rows of a ``DatabaseCache`` table, on connections of our own.

    Why our own connections (one per thread, autocommit) rather than Django's: a lease taken
    inside ``transaction.atomic()`` (``ATOMIC_REQUESTS``, a test case) on Django's connection
    would stay invisible to other processes until that transaction commits, and a rollback
    would undo a release. The row's ``value`` is the record's JSON and is the compare-and-swap
    version; ``expires`` is when the record's retention ends, in Django's format, so Django's
    own culling of expired entries removes idle records too.
    """

    def __init__(self, cache: Any, description: str) -> None:
        from django.db import router

        self.description = description
        self._table = cache._table
        self._db = router.db_for_write(cache.cache_model_class)
        self._conns = _PerThread(self._connect, lambda conn: conn.close())

    def _connect(self) -> Any:
        from django.db import connections

        conn = connections.create_connection(self._db)
        conn.inc_thread_sharing()  # close() may run in another thread
        return conn

    @contextlib.contextmanager
    def _cursor(self, what: str) -> Iterator[tuple[Any, Any, Any]]:
        from django.db import DatabaseError

        try:
            with self._conns.use(broken=(DatabaseError,)) as conn, conn.cursor() as cursor:
                yield conn, cursor, conn.ops.quote_name
        except DatabaseError as exc:
            raise BackendError(f"{what} on {self.description} failed: {exc}") from exc

    def _sql(self, template: str, quote: Any, **extra: str) -> str:
        return template.format(
            t=quote(self._table),
            k=quote("cache_key"),
            v=quote("value"),
            e=quote("expires"),
            **extra,
        )

    def _expires(self, conn: Any, keep: float) -> Any:
        from django.conf import settings

        tz = timezone.utc if settings.USE_TZ else None
        return conn.ops.adapt_datetimefield_value(datetime.fromtimestamp(time.time() + keep, tz))

    def read(self, cell: str) -> tuple[str, Any] | None:
        return self.read_many([cell]).get(cell)

    def read_many(self, cells: Sequence[str]) -> dict[str, tuple[str, Any]]:
        out: dict[str, tuple[str, Any]] = {}
        with self._cursor("read") as (conn, cursor, quote):
            for n in range(0, len(cells), 500):
                chunk = list(cells[n : n + 500])
                marks = ", ".join(["%s"] * len(chunk))
                cursor.execute(
                    self._sql(SQL_READ, quote, marks=marks),
                    chunk,
                )
                for cell, value in cursor.fetchall():
                    value = conn.ops.process_clob(value)
                    out[cell] = (value, value)
        return out

    def create(self, cell: str, value: str, keep: float, *, listed: bool = True) -> bool:
        from django.db import IntegrityError

        with self._cursor("insert") as (conn, cursor, quote):
            try:
                cursor.execute(
                    self._sql(SQL_CREATE, quote),
                    [cell, value, self._expires(conn, keep)],
                )
            except IntegrityError:
                return False  # another process created it first
        return True

    def replace(self, cell: str, value: str, version: Any, keep: float) -> bool:
        return self.replace_many([(cell, value, version)], keep)[0]

    def replace_many(self, writes: Sequence[tuple[str, str, Any]], keep: float) -> list[bool]:
        if not writes:
            return []
        with self._cursor("update") as (conn, cursor, quote):
            sql = self._sql(SQL_SWAP, quote)
            expires = self._expires(conn, keep)
            if len(writes) == 1:
                cell, value, version = writes[0]
                cursor.execute(sql, [value, expires, cell, version])
                return [cursor.rowcount == 1]
            # Many renewals: one transaction, one commit.
            conn.set_autocommit(False)
            try:
                done = []
                for cell, value, version in writes:
                    cursor.execute(sql, [value, expires, cell, version])
                    done.append(cursor.rowcount == 1)
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise
            finally:
                with contextlib.suppress(Exception):
                    conn.set_autocommit(True)
            return done

    def scan(self, prefix: str) -> Iterator[tuple[str, str]]:
        pattern = _like_prefix(prefix)
        with self._cursor("scan") as (conn, cursor, quote):
            cursor.execute(
                self._sql(SQL_SCAN, quote),
                [pattern],
            )
            rows = cursor.fetchall()
            found = [(str(k), conn.ops.process_clob(v)) for k, v in rows]
        # LIKE ignores case on some databases (SQLite): compare exactly here.
        yield from ((k, v) for k, v in found if k.startswith(prefix))

    def cleanup(self, prefix: str) -> None:
        with self._cursor("cleanup") as (conn, cursor, quote):
            cursor.execute(
                self._sql(SQL_CLEANUP, quote),
                [_like_prefix(prefix), self._expires(conn, 0.0)],
            )

    def close(self) -> None:
        self._conns.close()


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped + "%"


# -- Memcached ------------------------------------------------------------------------------


class _MemcachedCells:
    """Records as Memcached items, changed with ``gets``/``cas``; created with ``add``.

    pymemcache clients are not thread-safe: each thread (and each forked child) builds its
    own from the cache's settings.

    Listing cannot rely on Memcached's own walk of its items (``lru_crawler metadump all``):
    the crawler is no snapshot, and items that a write moves between LRU segments while it
    runs are not dumped (measured: 26 of 60 listings of 50 held, renewed keys missed 18-31
    of them). So each record's name is also appended (``append``, atomic on the server) to
    one of :data:`INDEX_SHARDS` index items right after the ``add`` that created it; a
    listing reads the index (one ``get_many``) and also the crawler's dump where the server
    has one (records created before the index existed, or whose index entry was lost with a
    crash between ``add`` and ``append`` or an eviction), and prunes from the index the
    names whose record is gone, by ``cas``.
    """

    def __init__(self, new_cache: Any, description: str) -> None:
        self.description = description
        self._new_cache = new_cache
        self._servers: list[str] = list(new_cache()._servers)
        # A pymemcache HashClient of our own per thread: they are not thread-safe.
        self._clients = _PerThread(lambda: new_cache()._cache, lambda client: client.close())

    @contextlib.contextmanager
    def _client(self, what: str) -> Iterator[Any]:
        from pymemcache.exceptions import MemcacheError

        try:
            with self._clients.use(broken=(MemcacheError, OSError)) as client:
                yield client
        except (MemcacheError, OSError) as exc:
            raise BackendError(f"{what} on {self.description} failed: {exc}") from exc

    @staticmethod
    def _expire(keep: float) -> int:
        seconds = max(1, math.ceil(keep))
        # Memcached reads more than 30 days as a Unix time.
        return seconds if seconds <= 30 * 24 * 3600 else int(time.time()) + seconds

    def read(self, cell: str) -> tuple[str, Any] | None:
        with self._client("gets") as client:
            got = client.gets(cell)
        if not got or got[0] is None:
            return None
        return str(got[0]), got[1]

    def read_many(self, cells: Sequence[str]) -> dict[str, tuple[str, Any]]:
        with self._client("gets") as client:
            got = client.gets_many(list(cells)) or {}
        return {k: (str(v), cas) for k, (v, cas) in got.items() if v is not None}

    def create(self, cell: str, value: str, keep: float, *, listed: bool = True) -> bool:
        with self._client("add") as client:
            created = bool(client.add(cell, value, expire=self._expire(keep), noreply=False))
            if created and listed:
                self._index(client, cell)
        return created

    @staticmethod
    def _index(client: Any, cell: str) -> None:
        """Add ``cell`` to its index item (created on first use; it never expires)."""
        shard = _index_shard(cell)
        line = cell + "\n"
        try:
            for _ in range(3):  # append fails while the item is missing; add, if it appeared
                if client.append(shard, line, noreply=False) or client.add(
                    shard, line, expire=0, noreply=False
                ):
                    return
        except Exception:  # the record exists: its grant stands, only listings may miss it
            pass
        logger.warning("could not index %r in %s: listings may miss it", cell, shard, exc_info=True)

    def replace(self, cell: str, value: str, version: Any, keep: float) -> bool:
        with self._client("cas") as client:
            done = client.cas(cell, value, version, expire=self._expire(keep), noreply=False)
        return done is True  # False: changed since our gets; None: gone

    def replace_many(self, writes: Sequence[tuple[str, str, Any]], keep: float) -> list[bool]:
        return [self.replace(cell, value, version, keep) for cell, value, version in writes]

    def scan(self, prefix: str) -> Iterator[tuple[str, str]]:
        shards = [INDEX_CELL.format(n) for n in range(INDEX_SHARDS)]
        with self._client("gets") as client:
            indexes = {k: (str(v), cas) for k, (v, cas) in (client.gets_many(shards) or {}).items()}
        indexed = {c for text, _ in indexes.values() for c in text.split("\n") if c}
        crawled: set[str] = set()
        for server in self._servers:
            try:
                crawled.update(_metadump(server))
            except BackendError:
                logger.debug("no crawler dump from %s: the index alone", server, exc_info=True)
        cells = sorted(c for c in indexed | crawled if c.startswith(prefix))
        gone: set[str] = set()
        for n in range(0, len(cells), 200):
            with self._client("get") as client:
                values = client.get_many(cells[n : n + 200]) or {}
            for cell in cells[n : n + 200]:
                value = values.get(cell)
                if value is None:
                    gone.add(cell)
                else:
                    yield cell, str(value)
        self._prune(indexes, gone)

    def _prune(self, indexes: Mapping[str, tuple[str, Any]], gone: set[str]) -> None:
        """Drop names of records that are gone from the index items read at ``version``.

        ``cas`` fails if a record was indexed since the read: that shard is pruned next time.
        A record created after our read of it is appended after its ``add``, so it is never
        pruned away.
        """
        for shard, (text, version) in indexes.items():
            names = [c for c in text.split("\n") if c]
            kept = [c for c in names if c not in gone]
            if len(kept) < len(names):
                value = "".join(c + "\n" for c in kept)
                with contextlib.suppress(BackendError), self._client("cas") as client:
                    client.cas(shard, value, version, expire=0, noreply=False)

    def cleanup(self, prefix: str) -> None:
        """Memcached drops expired items by itself."""

    def close(self) -> None:
        self._clients.close()


def _index_shard(cell: str) -> str:
    """The index item that lists ``cell`` (see :class:`_MemcachedCells`)."""
    return INDEX_CELL.format(zlib.crc32(cell.encode()) % INDEX_SHARDS)


def _metadump(server: str, timeout: float = 10.0) -> list[str]:
    """Return the keys of every item on one Memcached server (``lru_crawler metadump all``)."""
    if server.startswith("unix:"):
        address: Any = server[len("unix:") :]
        family = socket.AF_UNIX
    else:
        host, _, port = server.rpartition(":")
        if not host:
            host, port = server, "11211"
        address = (host.strip("[]"), int(port))
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    keys: list[str] = []
    for attempt in range(20):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.sendall(b"lru_crawler metadump all\r\n")
                data = b""
                while not (data.endswith(b"END\r\n") or data.startswith((b"BUSY", b"ERROR"))):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            raise BackendError(f"listing keys on memcached {server} failed: {exc}") from exc
        if data.startswith(b"BUSY"):  # another crawl is running: it ends soon
            time.sleep(0.05 * (attempt + 1))
            continue
        if not data.endswith(b"END\r\n"):
            raise BackendError(
                f"memcached {server} cannot list its keys (needs memcached 1.4.31+ with the "
                f"LRU crawler): {data[:200]!r}"
            )
        for line in data.splitlines():  # item lines end in \n, the END line in \r\n
            if line.startswith(b"key="):
                keys.append(unquote(line.split(b" ", 1)[0][4:].decode()))
        return keys
    raise BackendError(f"memcached {server} stayed busy crawling; try listing again")
