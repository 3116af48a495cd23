"""Renewal under faults: one store that stops answering, and ``fork()``.

A hung store is a private redis-server frozen with SIGSTOP: it accepts connections but never
answers, so each request waits for the client's socket timeout (10 s by default). Leases on other
stores must still be renewed meanwhile, and the lease on the hung store must be reported lost
before the store itself could free it.

A forked child is a copy of a process whose renewal thread did not come along. The parent's
grants stay the parent's: in the child they are not held, are not released and are not
renewed. Every child here ends with ``os._exit()`` and a status the test checks, and is killed
when it misses its deadline (a deadlocked child).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from celery_exclusive import Lease, LeaseLost, Store, connect, events
from celery_exclusive.renewal import Renewer

from ..conftest import started, url_for_kind
from ..forks import reap, run_forked
from ..servers import RedisServer, frozen, wait_until
from .conftest import LostLog, stays_held

pytestmark = pytest.mark.timeout(120)

#: The ttl of the leases on the hung and healthy stores: one renewal every second.
TTL = 3.0
#: Slack on top of a ttl for a loaded CI box: scheduling, round trips, a waiter's wake-up.
MARGIN = 2.0
#: How long a forked child may take to do its checks before it counts as deadlocked.
CHILD_DEADLINE = 20.0
#: How many times the deadlock test forks (each child has a deadline).
FORKS = 60


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture(params=["redis", "memory"])
def healthy_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A store that keeps answering: another private redis-server, or memory://."""
    if request.param == "memory":
        yield "memory://"
        return
    with started(RedisServer) as server:
        yield server.url


@pytest.fixture(params=["memory", "redis", "sqlite", "postgres"])
def fork_store_url(request: pytest.FixtureRequest) -> str:
    """Every store: memory:// (the child gets a copy of it) and the server-backed ones."""
    return url_for_kind(request, request.param, sqlite="sqlite_file_url")


def in_child(body: Callable[[], None], what: str, timeout: float = CHILD_DEADLINE) -> None:
    """Run ``body`` in a forked child; fail with its traceback if it raised, or if it did not
    exit within ``timeout`` (then it is killed: a deadlock)."""
    code, report = run_forked(body, timeout)
    assert code is not None, f"{what}: the child hung for {timeout} s (deadlocked) and was killed"
    assert code == 0, f"{what}: the child exited with {code}:\n{report}"


def read_lines(fd: int, count: int, timeout: float) -> list[str]:
    """Read ``count`` lines from a pipe within ``timeout`` (fewer if its writers all exit)."""
    deadline = time.monotonic() + timeout
    data = b""
    while data.count(b"\n") < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").splitlines()


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie does not)."""
    try:
        running: bool = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return running
    except psutil.NoSuchProcess:
        return False


# -- one store hangs --------------------------------------------------------------------------


def test_a_hung_store_does_not_stop_renewals_on_a_healthy_one(
    private_redis: RedisServer, healthy_url: str, prefix: str
) -> None:
    # Given one renewal thread renewing a lease on a store that will hang and one on a
    # store that keeps answering (the hung one's client waits up to 10 s for a reply)
    renewer = Renewer()
    hung_store = Store(connect(private_redis.url, prefix=prefix).backend, renewer=renewer)
    healthy = Store(connect(healthy_url, prefix=prefix).backend, renewer=renewer)
    stuck = hung_store.lease("K", ttl=TTL)
    kept = healthy.lease("K", ttl=TTL)
    try:
        assert stuck.acquire()
        assert kept.acquire()
        rival = healthy.lease("K", ttl=TTL)
        # When the first store hangs, for twice the ttl
        with frozen(private_redis):
            hung_at = time.monotonic()
            until = hung_at + 2 * TTL
            while time.monotonic() < until:
                # Then the healthy store's lease stays held, and nobody else gets its key
                after = time.monotonic() - hung_at
                assert kept.held, (
                    f"the healthy store's lease lapsed {after:.1f} s after the other store hung "
                    f"(not renewed; lost_reason {kept.lost_reason!r})"
                )
                assert not rival.acquire(), (
                    f"a second owner got the healthy store's key {after:.1f} s after the other "
                    f"store hung: its lease (ttl {TTL} s) was not renewed"
                )
                time.sleep(0.1)
            assert kept.lost_reason is None
            assert [h.token for h in healthy.holders("K")] == [kept.token]
    finally:
        stuck.detach()
        kept.detach()
        hung_store.close()
        healthy.close()


def test_a_lease_on_a_hung_store_is_reported_lost_before_the_store_could_free_it(
    private_redis: RedisServer, prefix: str
) -> None:
    # Given a renewed lease (ttl 3 s; the client waits up to 10 s for a reply)
    renewer = Renewer()
    store = Store(connect(private_redis.url, prefix=prefix).backend, renewer=renewer)
    lost = LostLog()
    lease = store.lease("K", ttl=TTL, on_lost=lost)
    hooked: list[str] = []

    def receiver(**kwargs: Any) -> None:
        if kwargs["lease"] is lease:
            hooked.append(kwargs["reason"])

    events.lease_lost.connect(receiver)
    try:
        assert lease.acquire()
        # The grant was confirmed by now, so the store frees the key no earlier than
        # ttl after the store handled it, which was before this instant
        confirmed_at = time.monotonic()
        # When the store hangs before any renewal went out
        with frozen(private_redis):
            assert renewer.round_trips == 0, "a renewal went out before the store hung"
            wait_until(lost.event.is_set, TTL + 10 + MARGIN, "the lease to be reported lost")
            reported_after = lost.at[0] - confirmed_at
            # Then it is reported lost before ttl has passed since its last confirmed renewal
            assert reported_after < TTL, (
                f"reported lost {reported_after:.1f} s after its last confirmed renewal; the "
                f"store could free it (and another owner take it) after {TTL} s"
            )
            assert not lease.held
            assert lease.lost_reason == lost.reasons[0]
            assert hooked == lost.reasons
    finally:
        events.lease_lost.disconnect(receiver)
        lease.detach()
        store.close()


@pytest.mark.parametrize("url_fixture", ["redis_url", "memory"])
def test_reaching_max_hold_is_a_lost_lease_reported_before_the_store_frees_it(
    request: pytest.FixtureRequest, url_fixture: str, prefix: str
) -> None:
    url = "memory://" if url_fixture == "memory" else str(request.getfixturevalue(url_fixture))
    store = connect(url, prefix=prefix)
    lost = LostLog()
    held_when_lost: list[int] = []

    def on_lost(lease: Lease, reason: str) -> None:
        held_when_lost.append(len(store.holders(lease.key)))
        lost(lease, reason)

    # Given a renewed lease that may be held for 1.5 s at most
    lease = store.lease("K", ttl=1.0, max_hold=1.5, on_lost=on_lost)
    try:
        assert lease.acquire()
        granted_at = time.monotonic()
        # Then once max_hold has passed it is reported lost (log, lease_lost, on_lost): it is
        # not left to expire silently while its holder goes on
        wait_until(lost.event.is_set, 1.5 + 1.0 + MARGIN, "the lease to be reported lost")
        assert "max_hold" in lost.reasons[0], lost.reasons
        assert lost.at[0] - granted_at >= 1.5 - 0.05
        assert not lease.held
        # while the store still held it: nobody else could have taken it yet
        assert held_when_lost == [1]
        with pytest.raises(LeaseLost, match="max_hold"):
            lease.ensure_held()
    finally:
        lease.release()
        store.close()


# -- fork -------------------------------------------------------------------------------------


def test_a_lease_granted_before_a_fork_is_the_parents_alone(
    fork_store_url: str, prefix: str
) -> None:
    # Given a lease granted in the parent, and one created there but never acquired
    store = connect(fork_store_url, prefix=prefix)
    try:
        lease = store.lease("K", ttl=30)
        assert lease.acquire()
        spare = store.lease("spare", ttl=0.5)

        def child() -> None:
            # In the child, the parent's grant is not held, and nothing frees or renews it
            assert not lease.held, "a lease granted in the parent is held in the child"
            assert lease.renew() is False, "the child renewed the parent's lease"
            assert lease.release() is False, "the child released the parent's lease"
            holders = [h.token for h in store.holders("K")]
            assert holders == [lease.token], f"the child's release touched the store: {holders}"
            # ...and the child's own leases work, renewed by its own renewal thread
            own = store.lease("own", ttl=0.5)
            assert own.acquire()
            assert spare.acquire()
            stays_held(own, store.lease("own"), 1.5)
            stays_held(spare, store.lease("spare"), 0.5)
            assert own.release()
            assert spare.release()

        in_child(child, "a child checking the parent's lease")

        # Then the parent still holds its lease, in the store too
        assert lease.held
        assert [h.token for h in store.holders("K")] == [lease.token]
        assert lease.release()
    finally:
        store.close()


def test_a_parent_killed_after_a_fork_loses_its_lease_though_the_child_lives(
    store_url: str, prefix: str
) -> None:
    ttl = 1.0
    store = connect(store_url, prefix=prefix)
    lines_r, lines_w = os.pipe()
    stop_r, stop_w = os.pipe()
    grandchild = 0
    try:
        middle = os.fork()
        if middle == 0:
            # The parent of the fork: take K, fork a child that lives on, then die at once
            code = 1
            try:
                os.close(lines_r)
                os.close(stop_w)
                lease = store.lease("K", ttl=ttl)
                spare = store.lease("spare", ttl=ttl)  # first acquired by the child
                assert lease.acquire()
                # (once its renewal thread has settled: a fork while that thread holds its
                # lock is the deadlock of the next test, not what this one is about)
                wait_until(lambda: store.renewer.round_trips >= 1, 5, "a first renewal")
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        # The child takes leases of its own, then lives until told to stop
                        assert spare.acquire()
                        assert store.lease("own", ttl=ttl).acquire()
                        os.write(lines_w, b"child-ready\n")
                        select.select([stop_r], [], [], 60)
                        code = 0
                    finally:
                        os._exit(code)
                os.write(lines_w, f"child {pid}\n".encode())
                code = 0
            finally:
                os._exit(code)  # no release: as if killed
        os.close(lines_w)
        os.close(stop_r)
        lines = read_lines(lines_r, 2, CHILD_DEADLINE)
        words: dict[str, str] = {}
        for line in lines:
            word, _, rest = line.partition(" ")
            words[word] = rest
        grandchild = int(words.get("child") or 0)
        middle_code = reap(middle, CHILD_DEADLINE)
        died_at = time.monotonic()
        assert middle_code == 0, f"the parent of the fork failed ({middle_code}); lines: {lines}"
        assert "child-ready" in words, f"the child never got its own leases; lines: {lines}"

        # When the parent is dead and its child lives on
        # Then the parent's lease expires within its ttl: the child does not renew it
        waiter = store.lease("K", ttl=30)
        assert waiter.acquire(timeout=ttl + 2 * MARGIN), (
            f"the dead parent's lease was still held {ttl + 2 * MARGIN} s after it died, "
            "while its child lived: the child renewed it"
        )
        freed_after = time.monotonic() - died_at
        assert freed_after <= ttl + MARGIN, f"the key freed {freed_after:.1f} s after the death"
        assert alive(grandchild), "the child died meanwhile: the test proved nothing"
        assert waiter.release()
    finally:
        with contextlib.suppress(OSError):
            os.close(stop_w)  # the child's cue to exit
        if grandchild:
            with contextlib.suppress(ProcessLookupError):
                os.kill(grandchild, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.close(lines_r)
        store.close()


@pytest.mark.parametrize("fork_store_url", ["memory", "redis"], indirect=True)
def test_forking_while_the_renewer_is_busy_never_deadlocks_the_child(
    fork_store_url: str, prefix: str
) -> None:
    # Given a renewal thread kept busy renewing many short leases
    store = connect(fork_store_url, prefix=prefix)
    busy = [store.lease(f"busy:{i}", ttl=0.3) for i in range(1000)]
    leases = list(busy)
    try:
        for lease in busy:
            assert lease.acquire()
        # When the process forks again and again, right after taking a lease (which wakes or
        # starts a renewal thread: here each time a store's own one), and each child takes
        # leases of its own
        for n in range(FORKS):
            own_store = Store(store.backend, renewer=Renewer())
            first = own_store.lease(f"first:{n}", ttl=5)
            assert first.acquire()
            leases.append(first)
            spare = own_store.lease(f"spare:{n}", ttl=5)  # created here, acquired in the child

            def child(n: int = n, own_store: Store = own_store, spare: Lease = spare) -> None:
                assert spare.acquire()
                own = own_store.lease(f"own:{n}", ttl=5)
                assert own.acquire()
                mine = store.lease(f"mine:{n}", ttl=5)
                assert mine.acquire()
                assert spare.held and own.held and mine.held
                assert own.release() and spare.release() and mine.release()

            # Then no child hangs (each has a deadline, then is killed and the test fails; 30 s:
            # a child once took over 10 s on a 2-core machine at load 7, and a deadlock never
            # ends, so a longer deadline still finds one)
            in_child(child, f"fork {n + 1} of {FORKS}", timeout=30)
    finally:
        for lease in leases:
            lease.detach()
        store.close()
