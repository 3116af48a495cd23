"""The Redis server dies, restarts empty, or stays down under a held lease.

Each test has a private redis-server (``private_redis``), never the session's, and a store with
a renewer of its own (``private_store``), so what its renewal thread logs is this test's alone.
The store is built with ``socket_timeout=1`` so a dead server is noticed in about a second.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import redis

from celery_exclusive import BackendError, Store
from celery_exclusive.renewal import Renewer

from ..servers import RedisServer, wait_until
from .conftest import LostLog, PrivateStore, assert_lost, renewal_failures, stays_held

pytestmark = pytest.mark.timeout(60)

TTL = 1.0
MARGIN = 3.0


@pytest.fixture
def fault_store(private_redis: RedisServer, private_store: PrivateStore) -> tuple[Store, Renewer]:
    """A store on the private server whose client gives up on a dead server after 1 s."""
    return private_store(f"{private_redis.url}?socket_timeout=1")


def test_server_restarted_empty_reports_the_lease_lost_and_works_again(
    private_redis: RedisServer,
    fault_store: tuple[Store, Renewer],
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[threading.ExceptHookArgs],
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_exclusive")
    store, renewer = fault_store
    # Given a held, renewed lease
    lost = LostLog()
    lease = store.lease("K", ttl=TTL, on_lost=lost)
    assert lease.acquire()
    old_fence = lease.fence
    assert old_fence is not None
    wait_until(lambda: renewer.round_trips >= 1, 5, "a first renewal")

    # When the server is killed -9 and restarted on the same port, with nothing saved
    private_redis.restart()

    # Then the lease is reported lost (renewal refused, or not possible before expiry)
    wait_until(lost.event.is_set, TTL + MARGIN, "on_lost after the restart")
    assert len(lost.reasons) == 1, lost.reasons
    assert lease.lost_reason == lost.reasons[0]
    assert_lost(lease)

    # ...the store works again: the key is free, and its fences still rise
    again = store.lease("K", ttl=TTL)
    wait_until(again.acquire, 5, "an acquire after the restart")
    assert again.fence is not None and again.fence > old_fence

    # ...and the renewal thread survived: the new lease stays held well past its ttl
    stays_held(again, store.lease("K"), 3.5 * TTL)
    assert again.release() is True
    assert lease.release() is False  # the lost lease frees nothing
    assert renewal_failures(caplog) == []
    assert thread_errors == []


def test_server_down_past_the_ttl_marks_the_lease_lost_and_fails_cleanly(
    private_redis: RedisServer,
    fault_store: tuple[Store, Renewer],
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[threading.ExceptHookArgs],
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_exclusive")
    store, _renewer = fault_store
    # Given a held, renewed lease
    lost = LostLog()
    lease = store.lease("K", ttl=TTL, on_lost=lost)
    assert lease.acquire()

    # When the server stops and stays down for longer than the ttl
    stopped_at = time.monotonic()
    private_redis.stop()

    # Then the lease is marked lost, saying it could not be renewed, within ttl (+ margin)
    wait_until(lost.event.is_set, TTL + MARGIN, "on_lost while the server is down")
    assert lost.at[0] - stopped_at <= TTL + MARGIN
    assert "could not renew" in lost.reasons[0], lost.reasons
    assert_lost(lease)

    # ...and store operations raise BackendError (wrapping the driver's error), promptly
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        store.lease("K2").acquire()
    assert not isinstance(info.value, redis.RedisError)
    assert isinstance(info.value.__cause__, (redis.RedisError, OSError))
    with pytest.raises(BackendError):
        store.lease("K2").acquire(blocking=True, timeout=1)
    with pytest.raises(BackendError):
        store.holders("K2")
    assert time.monotonic() - started <= 3 * MARGIN, "a down server hung the caller"

    # When the server comes back (empty), the store works again
    private_redis.start()
    fresh = store.lease("K", ttl=TTL)
    wait_until(fresh.acquire, 5, "an acquire after the server came back")
    assert fresh.held
    assert fresh.release() is True
    assert renewal_failures(caplog) == []
    assert thread_errors == []
