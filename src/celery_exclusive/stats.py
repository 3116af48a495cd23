"""What a store holds, summed up per task, and how healthy the store is: for ``stats``.

:func:`collect` reads the store (a listing, plus what the store can tell of waiters and lost
leases) and measures its round trip; the ``stats`` commands print the result. Nothing here is
kept in the process: every number is read from the store when asked, so any host that can
reach the store sees the same.

Lost leases are counted in the store by the processes that lose them (:func:`record_lost`,
called by the Celery worker when a task's lease is lost), in a small record of at most
:data:`~celery_exclusive.backends.base.MAX_LOST_TASKS` task names. Best effort: a lease is
lost most often *because* the store is unreachable, so the count is sent from a background
thread, tried again for a moment, and dropped if the store does not answer; Prometheus'
``celery_exclusive_lost_total`` (see ``docs/metrics.md``) counts every loss in the process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import ExclusiveError
from .releasing import get_releaser

if TYPE_CHECKING:
    from .backends.base import Backend, LeaseInfo
    from .store import Store

__all__ = ["StoreStats", "TaskStats", "collect", "record_lost"]

#: The key read to measure the store's round trip (never held: a read of a free key).
PING_KEY = "celery-exclusive-ping"
#: Task name shown for leases whose holder named no task (leases taken outside Celery).
NO_TASK = "(no task)"


@dataclass
class TaskStats:
    """The leases of one task, as the store holds them now."""

    task: str
    #: Holders of every lease of the task (a semaphore key counts each holder).
    held: int = 0
    #: Of those: runs holding their lease, and copies waiting in the queue (enqueue leases).
    running: int = 0
    queued: int = 0
    #: Seconds since the oldest of those holders was granted (store clock vs. this host's).
    oldest_hold: float = 0.0
    #: Keys of the task on which a refused caller waits (None: the store cannot tell).
    keys_waited_on: int | None = None
    #: Leases of the task lost so far, and when last (None: the store keeps no counts).
    lost: int | None = None
    last_lost_at: float | None = None


@dataclass
class StoreStats:
    """A store's health, round trip and leases per task."""

    store: str
    healthy: bool
    error: str | None = None
    #: Round trip of a one-key read, in milliseconds: the best and the median of a few.
    latency_ms: float | None = None
    latency_median_ms: float | None = None
    tasks: list[TaskStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with totals."""
        data = asdict(self)
        data["totals"] = {
            name: sum(getattr(t, name) for t in self.tasks)
            for name in ("held", "running", "queued")
        }
        return data


def collect(store: Store, *, match: str | None = None, samples: int = 5) -> StoreStats:
    """Read ``store`` (keys matching the glob ``match``) and measure its round trip.

    A store that cannot be reached gives ``healthy=False`` and the error, not an exception.
    """
    backend = store.backend
    stats = StoreStats(store=backend.describe(), healthy=True)
    try:
        stats.latency_ms, stats.latency_median_ms = _ping(backend, samples)
        infos = list(store.leases(match))
        waited = backend.waiting([info.key for info in infos])
        lost = backend.lost_counts()
    except ExclusiveError as exc:
        stats.healthy, stats.error = False, str(exc)
        return stats
    stats.tasks = _per_task(infos, waited, lost or {}, counts_kept=lost is not None)
    return stats


def _ping(backend: Backend, samples: int) -> tuple[float, float]:
    times = []
    for _ in range(max(samples, 1)):
        start = time.perf_counter()
        backend.holders(PING_KEY)
        times.append((time.perf_counter() - start) * 1000)
    return round(min(times), 3), round(statistics.median(times), 3)


def _per_task(
    infos: Iterable[LeaseInfo],
    waited: list[bool] | None,
    lost: Mapping[str, Any],
    *,
    counts_kept: bool,
) -> list[TaskStats]:
    tasks: dict[str, TaskStats] = {}

    def entry(name: str) -> TaskStats:
        if name not in tasks:
            tasks[name] = TaskStats(task=name, keys_waited_on=None if waited is None else 0)
            if counts_kept:
                tasks[name].lost = 0
        return tasks[name]

    now = time.time()
    for i, info in enumerate(infos):
        names = set()
        for holder in info.holders:
            name = str(holder.meta.get("task_name") or NO_TASK)
            names.add(name)
            row = entry(name)
            row.held += 1
            state = holder.meta.get("state")
            row.running += state == "running"
            row.queued += state == "queued"
            row.oldest_hold = max(row.oldest_hold, round(max(now - holder.acquired_at, 0.0), 1))
        if waited is not None and waited[i]:
            for name in names:
                row = entry(name)
                row.keys_waited_on = (row.keys_waited_on or 0) + 1
    for name, count in lost.items():
        row = entry(name)
        row.lost, row.last_lost_at = count.count, count.last_at
    return sorted(tasks.values(), key=lambda t: t.task)


# -- counting lost leases in the store, from a background thread -------------------------------

#: How long a count is tried again (with backoff) while the store does not answer.
LOST_COUNT_TRIES_FOR = 1.5


def record_lost(backend: Backend, task: str) -> None:
    """Count a lost lease of ``task`` in the store, soon, from a background thread.

    Never blocks the caller (the renewal thread, which reports losses) and never raises. The
    thread is the one that retries failed releases (:mod:`celery_exclusive.releasing`), which
    also sends what is still queued at a worker's shutdown.
    """
    get_releaser().send_later(
        lambda: backend.record_lost(task),
        f"counting a lost lease of {task}",
        expires_in=LOST_COUNT_TRIES_FOR,
    )
