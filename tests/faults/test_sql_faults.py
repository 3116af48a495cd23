"""Faults particular to PostgreSQL: the server restarted or down under a held lease.

(A holder killed -9 or paused, and racing processes, are tested on every store in
test_crash_and_pause.py and test_mutual_exclusion.py.) The restart tests use a
PostgreSQL server of their own (``private_postgres``), never the session's nor one named by
``CELERY_EXCLUSIVE_TEST_POSTGRES_DSN``, and a private renewer.

What a restart does to a lease on PostgreSQL: leases are rows, and rows survive a restart (and a
crash of the server process). So a holder whose renewal gets through before its local deadline
(``ttl`` after its last successful renewal was sent) simply keeps its lease: the failed
renewals are retried every ``ttl / 10`` (at most 1 s). A database down for longer than the ttl
makes the holder report the lease lost ("could not renew before it expired"); when the database
is back, the row has expired by the database's clock, so the key is free for the next acquirer,
with a higher fence, and the old holder's late release frees nothing.
"""

from __future__ import annotations

import logging
import threading
import time

import psycopg
import pytest

from celery_exclusive import BackendError, LeaseLost, Store
from celery_exclusive.renewal import Renewer

from ..pg import PostgresServer
from ..servers import wait_until
from .conftest import LostLog, PrivateStore, renewal_failures, stays_held

pytestmark = pytest.mark.timeout(60)

#: Slack on top of a ttl for a loaded CI box: scheduling, round trips, a waiter's wake-up.
MARGIN = 2.5


@pytest.fixture
def fault_store(
    private_postgres: PostgresServer, private_store: PrivateStore
) -> tuple[Store, Renewer]:
    return private_store(private_postgres.dsn)


# -- a holder killed -9 -----------------------------------------------------------------------


# -- PostgreSQL restarted or down under a held lease ------------------------------------------


@pytest.mark.parametrize("how", ["stop", "crash"])
def test_quick_restart_keeps_the_lease_and_renewal_recovers(
    private_postgres: PostgresServer,
    fault_store: tuple[Store, Renewer],
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[threading.ExceptHookArgs],
    how: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_exclusive")
    store, renewer = fault_store
    ttl = 3.0
    # Given a held, renewed lease
    lost = LostLog()
    lease = store.lease("K", ttl=ttl, on_lost=lost)
    assert lease.acquire()
    fence = lease.fence
    wait_until(lambda: renewer.round_trips >= 1, 5, "a first renewal")
    old_pid = private_postgres.proc.pid if private_postgres.proc else None

    # When the server is stopped (fast shutdown) or crashes (immediate shutdown), a renewal
    # fails meanwhile, and the server comes back well within the ttl
    if how == "stop":
        private_postgres.stop()
    else:
        private_postgres.kill()
    wait_until(
        lambda: any("will retry" in r.getMessage() for r in caplog.records),
        2 * ttl,
        "a renewal to fail while the server is down",
    )
    private_postgres.start()
    assert private_postgres.proc is not None and private_postgres.proc.pid != old_pid
    trips = renewer.round_trips

    # Then the lease is still held (the row survived; renewal got through before the deadline)
    wait_until(lambda: renewer.round_trips >= trips + 2, 2 * ttl, "renewals after the restart")
    stays_held(lease, store.lease(lease.key), ttl)
    assert not lost.event.is_set(), lost.reasons
    assert [(h.token, h.fence) for h in store.holders("K")] == [(lease.token, fence)]
    assert lease.release() is True
    assert renewal_failures(caplog) == []
    assert thread_errors == []


def test_down_past_the_ttl_reports_the_lease_lost_and_works_after(
    private_postgres: PostgresServer,
    fault_store: tuple[Store, Renewer],
    caplog: pytest.LogCaptureFixture,
    thread_errors: list[threading.ExceptHookArgs],
) -> None:
    caplog.set_level(logging.WARNING, logger="celery_exclusive")
    store, _renewer = fault_store
    ttl = 1.0
    # Given a held, renewed lease, and a blocked waiter listening for its release
    lost = LostLog()
    lease = store.lease("K", ttl=ttl, on_lost=lost)
    assert lease.acquire()
    old_fence = lease.fence
    assert old_fence is not None
    assert store.backend.wait("K", 0.5) in (True, False)  # starts the LISTEN connection

    # When the server stops and stays down for longer than the ttl
    stopped_at = time.monotonic()
    private_postgres.stop()

    # Then the lease is reported lost, "could not renew", within the ttl (+ margin)...
    wait_until(lost.event.is_set, ttl + MARGIN, "on_lost while the server is down")
    assert lost.at[0] - stopped_at <= ttl + MARGIN
    assert len(lost.reasons) == 1 and "could not renew" in lost.reasons[0], lost.reasons
    assert not lease.held
    with pytest.raises(LeaseLost):
        lease.ensure_held()

    # ...and store operations raise BackendError (wrapping psycopg's error), promptly
    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        store.lease("K2").acquire()
    assert isinstance(info.value.__cause__, (psycopg.Error, OSError))
    with pytest.raises(BackendError):
        store.lease("K2").acquire(blocking=True, timeout=1)
    with pytest.raises(BackendError):
        store.holders("K2")
    assert store.backend.wait("K2", 0.3) is False  # no listener: a short wait, no error
    assert time.monotonic() - started <= 3 * MARGIN, "a down server hung the caller"

    # When the server comes back, the old row has expired by the database's clock: the store
    # works again, the key is free, for a higher fence, and the renewal thread still runs
    private_postgres.start()
    again = store.lease("K", ttl=ttl)
    wait_until(again.acquire, 5, "an acquire after the server came back")
    assert again.fence is not None and again.fence > old_fence
    stays_held(again, store.lease(again.key), 2.5 * ttl)
    assert lease.release() is False  # the lost lease frees nothing
    assert [h.token for h in store.holders("K")] == [again.token]

    # ...and a blocked waiter is woken by a release again (the listener reconnected)
    got: list[float] = []

    def wait() -> None:
        if store.lease("K", ttl=ttl).acquire(blocking=True, timeout=20):
            got.append(time.monotonic())

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)
    released_at = time.monotonic()
    assert again.release() is True
    waiter.join(20)
    assert got and got[0] - released_at < 2.0, "the waiter was not woken by the release"
    assert renewal_failures(caplog) == []
    assert thread_errors == []
