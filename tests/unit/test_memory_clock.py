"""Expiry rules of the memory backend, on a fake clock (no sleeps)."""

from __future__ import annotations

from celery_exclusive.backends.base import Conflict, Grant, RenewRequest
from celery_exclusive.backends.memory import MemoryBackend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_expiry_and_renewal_follow_the_clock() -> None:
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    grant = backend.acquire("k", "a", ttl=10, limit=1, meta="{}")
    assert isinstance(grant, Grant)
    clock.now += 9
    conflict = backend.acquire("k", "b", ttl=10, limit=1, meta="{}")
    assert isinstance(conflict, Conflict) and conflict.retry_in == 1
    assert backend.renew([RenewRequest("k", "a", 10)]) == [True]
    clock.now += 9.5
    assert isinstance(backend.acquire("k", "b", ttl=10, limit=1, meta="{}"), Conflict)
    clock.now += 1
    later = backend.acquire("k", "b", ttl=10, limit=1, meta="{}")
    assert isinstance(later, Grant) and later.fence > grant.fence
    assert backend.renew([RenewRequest("k", "a", 10)]) == [False]
    assert backend.release("k", "a") is False


def test_release_of_an_expired_entry_reports_false() -> None:
    clock = Clock()
    backend = MemoryBackend(clock=clock)
    backend.acquire("k", "a", ttl=1, limit=1, meta="{}")
    clock.now += 2
    assert backend.release("k", "a") is False
