"""In-process backend for your own unit tests.

**One process only.** Leases live in a dict of this process: another worker process, or a
forked child, sees none of them. Use it to test code that takes leases without a server
(``connect("memory://")``), never to protect a real task. ``memory://NAME`` gives the store
registered under NAME in this process, so two ``connect`` calls can share one.
"""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .. import forking
from ..exceptions import LimitMismatch
from .base import (
    MAX_LOST_TASKS,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    LostCount,
    RenewRequest,
)

__all__ = ["MemoryBackend"]


@dataclass
class _Entry:
    expires: float
    fence: int
    acquired: float
    renewed: float
    meta: str
    limit: int = 1


class MemoryBackend(Backend):
    """Leases in a dict guarded by a lock; ``clock`` (seconds) can be replaced in tests.

    Fences are seeded from the wall clock in microseconds, like the Redis backend, so they
    look the same; counters are kept for the life of the backend.
    """

    scheme = "memory"

    def __init__(self, *, clock: Callable[[], float] = time.time, name: str = "") -> None:
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        forking.replace_after_fork(self, "_cond", threading.Condition)
        self._leases: dict[str, dict[str, _Entry]] = {}
        self._fences: dict[str, int] = {}
        self._signals: dict[str, int] = {}
        self._done: dict[tuple[str, str], float] = {}
        self._waiters: dict[str, int] = {}
        self._lost: dict[str, LostCount] = {}

    def _live(self, key: str, now: float) -> dict[str, _Entry]:
        entries = self._leases.get(key, {})
        for token in [t for t, e in entries.items() if e.expires <= now]:
            del entries[token]
        if not entries:
            self._leases.pop(key, None)
        return entries

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        with self._cond:
            now = self._clock()
            entries = self._live(key, now)
            for other, entry in entries.items():
                if other != token and entry.limit != limit:
                    raise LimitMismatch(key=key, limit=entry.limit, requested=limit)
            mine = entries.get(token)
            if mine is not None:
                mine.expires, mine.renewed = now + ttl, now
                return Grant(fence=mine.fence, reentered=True)
            if len(entries) >= limit:
                holders = [self._holder(t, e, now) for t, e in entries.items()]
                retry_in = min(e.expires for e in entries.values()) - now
                return Conflict(holders=holders, retry_in=retry_in)
            fence = self._fences.get(key, int(time.time() * 1_000_000)) + 1
            self._fences[key] = fence
            self._leases.setdefault(key, {})[token] = _Entry(
                now + ttl, fence, now, now, meta, limit
            )
            return Grant(fence=fence)

    def release(self, key: str, token: str) -> bool:
        with self._cond:
            entries = self._leases.get(key, {})
            entry = entries.pop(token, None)
            if entry is None:
                return False
            if not entries:
                self._leases.pop(key, None)
            self._signal(key, 1)
            return entry.expires > self._clock()

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        with self._cond:
            now = self._clock()
            out = []
            for r in requests:
                entry = self._live(r.key, now).get(r.token)
                if entry is not None:
                    entry.expires, entry.renewed = now + r.ttl, now
                out.append(entry is not None)
            return out

    def wait(self, key: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters[key] = self._waiters.get(key, 0) + 1
            try:
                while self._signals.get(key, 0) == 0:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                self._signals[key] -= 1
                return True
            finally:
                self._waiters[key] -= 1
                if not self._waiters[key]:
                    del self._waiters[key]

    def waiting(self, keys: Sequence[str]) -> list[bool] | None:
        with self._cond:
            return [self._waiters.get(key, 0) > 0 for key in keys]

    def record_lost(self, task: str) -> bool:
        with self._cond:
            known = self._lost.get(task)
            if known is None and len(self._lost) >= MAX_LOST_TASKS:
                return False
            count = known.count if known is not None else 0
            self._lost[task] = LostCount(count=count + 1, last_at=self._clock())
            return True

    def lost_counts(self) -> dict[str, LostCount] | None:
        with self._cond:
            return dict(self._lost)

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        with self._cond:
            now = self._clock()
            if len(self._done) >= 1024:  # drop expired marks now and then, not on every call
                self._done = {k: exp for k, exp in self._done.items() if exp > now}
            self._done[key, task_id] = now + ttl

    def is_done(self, key: str, task_id: str) -> bool:
        with self._cond:
            return self._done.get((key, task_id), 0.0) > self._clock()

    def holders(self, key: str) -> list[Holder]:
        with self._cond:
            now = self._clock()
            return [self._holder(t, e, now) for t, e in self._live(key, now).items()]

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        with self._cond:
            keys = [k for k in self._leases if match is None or fnmatch.fnmatchcase(k, match)]
        for key in keys:
            found = self.holders(key)
            if found:
                yield LeaseInfo(key=key, holders=found)

    def force_release(self, key: str, token: str | None = None) -> int:
        with self._cond:
            entries = self._live(key, self._clock())
            if token is None:
                removed = len(entries)
                entries.clear()
            else:
                removed = 1 if entries.pop(token, None) is not None else 0
            if not entries:
                self._leases.pop(key, None)
            self._signal(key, removed)
            return removed

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        with self._cond:
            entry = self._live(key, self._clock()).get(token)
            if entry is not None:
                entry.meta = meta
            return entry is not None

    def take(self, key: str, token: str) -> str | None:
        with self._cond:
            entry = self._live(key, self._clock()).pop(token, None)
            if not self._leases.get(key):
                self._leases.pop(key, None)
            if entry is None:
                return None
            self._signal(key, 1)
            return entry.meta

    def hand_over(
        self, key: str, token: str, new_token: str, ttl: float, *, meta: str | None = None
    ) -> bool:
        with self._cond:
            now = self._clock()
            entries = self._live(key, now)
            entry = entries.pop(token, None)
            if entry is None:
                return False
            entry.expires, entry.renewed = now + ttl, now
            if meta is not None:
                entry.meta = meta
            entries[new_token] = entry
            return True

    def describe(self) -> str:
        return f"memory://{self._name}"

    def _signal(self, key: str, count: int) -> None:
        if count:
            self._signals[key] = min(self._signals.get(key, 0) + count, 64)
            self._cond.notify_all()

    @staticmethod
    def _holder(token: str, entry: _Entry, now: float) -> Holder:
        return Holder.stored(
            token, entry.fence, entry.expires, entry.acquired, entry.renewed, entry.meta, now=now
        )
