"""The lease operations once, over any compare-and-swap store: records, cells, the backend.

Database and Memcached caches keep one *record* per lease key, a JSON document with the key's
last fence and its holders (token -> expiry, fence, acquired, renewed, metadata)::

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

What a store must offer is :class:`Cells` (compare-and-swap registers); ``database.py`` and
``memcached.py`` are its two implementations.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ...exceptions import BackendError, ConfigurationError, LimitMismatch
from ..base import (
    DEFAULT_FENCE_RETENTION,
    DEFAULT_PREFIX,
    DONE,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    RenewRequest,
)

__all__ = [
    "CLEANUP_INTERVAL",
    "DEFAULT_POLL",
    "MAX_ATTEMPTS",
    "MAX_CELL_KEY",
    "Cells",
    "DjangoCacheBackend",
    "Record",
    "import_django",
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

_EXTRA = "pip install 'celery-exclusive[django]'"


def import_django() -> Any:
    """Return the ``django`` module, or say which extra installs it."""
    try:
        import django
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(f"django-cache:// needs Django: {_EXTRA}") from exc
    return django


# -- records ---------------------------------------------------------------------------------


class Record:
    """One lease key's record: its last fence, its holders (times in microseconds) and the
    limit they were granted under (0: not recorded, by an older version)."""

    __slots__ = ("fence", "holders", "key", "limit")

    def __init__(self, key: str, fence: int, holders: dict[str, list[Any]], limit: int = 0) -> None:
        self.key = key
        self.fence = fence
        self.holders = holders  # token -> [expires, fence, acquired, renewed, meta json]
        self.limit = limit

    @classmethod
    def load(cls, text: str) -> Record:
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


class Cells(Protocol):
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
        cells: Cells,
        *,
        prefix: str = DEFAULT_PREFIX,
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

    def _keep(self, record: Record, now: int) -> float:
        longest = max((int(h[0]) - now for h in record.holders.values()), default=0)
        return max(self.fence_retention, 2 * longest / 1e6)

    def _load(self, key: str, value: str) -> Record:
        try:
            record = Record.load(value)
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
            record: Record | None, now: int
        ) -> tuple[Record | None, Grant | Conflict | LimitMismatch]:
            if record is None:
                # A new (or expired, evicted, cleared) counter starts from the clock, so it
                # still rises above every fence handed out before (docs/guarantees.md, rule 5).
                record = Record(key, now, {})
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
        def change(record: Record | None, now: int) -> tuple[Record | None, bool]:
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
                record: Record | None, now: int, idx: list[int] = indexes
            ) -> tuple[Record | None, list[bool]]:
                if record is None:
                    return None, [False] * len(idx)
                outcome = self._renew_record(record, [requests[i] for i in idx], now)
                return (record if any(outcome) else None), outcome

            for i, ok in zip(indexes, self._update(requests[indexes[0]].key, change), strict=True):
                results[i] = ok
        return results

    @staticmethod
    def _renew_record(record: Record, requests: Sequence[RenewRequest], now: int) -> list[bool]:
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
                record = Record.load(value)
            except (ValueError, KeyError, TypeError):
                logger.debug("skipping %r in %s: not a lease record", cell, self._description)
                continue
            if match is not None and not fnmatch.fnmatchcase(record.key, match):
                continue
            found = record.holder_list(self._now())
            if found:
                yield LeaseInfo(key=record.key, holders=found)

    def force_release(self, key: str, token: str | None = None) -> int:
        def change(record: Record | None, now: int) -> tuple[Record | None, int]:
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
        def change(record: Record | None, now: int) -> tuple[Record | None, bool]:
            holder = record.live(now).get(token) if record is not None else None
            if record is None or holder is None:
                return None, False
            holder[4] = meta
            return record, True

        updated: bool = self._update(key, change)
        return updated

    def take(self, key: str, token: str) -> str | None:
        def change(record: Record | None, now: int) -> tuple[Record | None, str | None]:
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
