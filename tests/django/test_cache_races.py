"""The compare-and-swap of the database and Memcached caches, raced deterministically.

A fake store of records (a dict with a version per cell) lets a test change a record between
the backend's read and its write, the window a real second process would hit, with a fake
clock for expiry: no server, no sleep.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from celery_exclusive.backends.base import Conflict, Grant, RenewRequest
from celery_exclusive.backends.django_cache import DjangoCacheBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Cells:
    """Records with versions; ``meddle`` runs once before the next write, as another process."""

    description = "fake"

    def __init__(self) -> None:
        self.data: dict[str, tuple[str, int]] = {}
        self.meddle: Callable[[], object] | None = None
        self.refused = 0

    def _before_write(self) -> None:
        meddle, self.meddle = self.meddle, None
        if meddle is not None:
            meddle()

    def read(self, cell: str) -> tuple[str, Any] | None:
        return self.data.get(cell)

    def read_many(self, cells: Sequence[str]) -> dict[str, tuple[str, Any]]:
        return {c: self.data[c] for c in cells if c in self.data}

    def create(self, cell: str, value: str, keep: float, *, listed: bool = True) -> bool:
        self._before_write()
        if cell in self.data:
            self.refused += 1
            return False
        self.data[cell] = (value, 1)
        return True

    def replace(self, cell: str, value: str, version: Any, keep: float) -> bool:
        self._before_write()
        if cell not in self.data or self.data[cell][1] != version:
            self.refused += 1
            return False
        self.data[cell] = (value, version + 1)
        return True

    def replace_many(self, writes: Sequence[tuple[str, str, Any]], keep: float) -> list[bool]:
        return [self.replace(c, v, ver, keep) for c, v, ver in writes]

    def scan(self, prefix: str) -> Iterator[tuple[str, str]]:
        yield from ((c, v) for c, (v, _) in list(self.data.items()) if c.startswith(prefix))

    def cleanup(self, prefix: str) -> None:
        pass

    def close(self) -> None:
        pass


def backend() -> tuple[DjangoCacheBackend, Cells, Clock]:
    cells, clock = Cells(), Clock()
    return DjangoCacheBackend(cells, prefix="t", clock=clock), cells, clock


def test_two_first_grants_at_once_give_one_holder() -> None:
    b, cells, _ = backend()
    # Given B creates the record between A's read (nothing there) and A's insert
    cells.meddle = lambda: b.acquire("k", "B", ttl=10, limit=1, meta="{}")
    # When A acquires
    result = b.acquire("k", "A", ttl=10, limit=1, meta="{}")
    # Then A's insert was refused, A read again and found B
    assert cells.refused == 1
    assert isinstance(result, Conflict)
    assert [h.token for h in result.holders] == ["B"]


def test_a_late_release_never_frees_the_next_holder() -> None:
    b, cells, clock = backend()
    a = b.acquire("k", "A", ttl=1, limit=1, meta="{}")
    assert isinstance(a, Grant)
    clock.now += 2  # A's lease expired, nobody released it
    # Given B takes the key between A's read and A's write of its release
    granted: list[Grant | Conflict] = []
    cells.meddle = lambda: granted.append(b.acquire("k", "B", ttl=10, limit=1, meta="{}"))
    # When A releases late
    assert b.release("k", "A") is False
    # Then B holds, with a higher fence
    (g,) = granted
    assert isinstance(g, Grant) and g.fence > a.fence
    assert [h.token for h in b.holders("k")] == ["B"]


def test_a_renewal_racing_another_grant_keeps_both_holders() -> None:
    b, cells, _ = backend()
    b.acquire("pool", "A", ttl=10, limit=2, meta="{}")
    # Given B joins the semaphore between A's renewal read and write
    cells.meddle = lambda: b.acquire("pool", "B", ttl=10, limit=2, meta="{}")
    # When A renews
    assert b.renew([RenewRequest("pool", "A", 10.0)]) == [True]
    # Then the renewal was retried on the new record, and both hold
    assert cells.refused == 1
    assert sorted(h.token for h in b.holders("pool")) == ["A", "B"]


def test_a_renewal_after_a_force_release_in_the_window_is_refused() -> None:
    b, cells, _ = backend()
    b.acquire("k", "A", ttl=10, limit=1, meta="{}")
    cells.meddle = lambda: b.force_release("k")
    assert b.renew([RenewRequest("k", "A", 10.0)]) == [False]
    assert b.holders("k") == []


def test_fences_rise_across_a_lost_record() -> None:
    b, cells, clock = backend()
    first = b.acquire("k", "A", ttl=10, limit=1, meta="{}")
    b.release("k", "A")
    cells.data.clear()  # evicted, cleared or expired after its retention
    clock.now += 1
    second = b.acquire("k", "B", ttl=10, limit=1, meta="{}")
    assert isinstance(first, Grant) and isinstance(second, Grant)
    assert second.fence > first.fence


def test_long_keys_are_hashed_and_still_listed() -> None:
    b, cells, _ = backend()
    key = "report:" + "x" * 400
    b.acquire(key, "A", ttl=10, limit=1, meta='{"task_id": "t"}')
    (cell,) = cells.data
    assert len(cell) < 100
    (info,) = list(b.scan("report:*"))
    assert info.key == key and info.holders[0].meta == {"task_id": "t"}
