"""``Lease.release_soon``: a release sent now whose answer a background thread reads.

What must not change when the caller stops waiting for the answer: the key is freed (never
before the release was sent), a waiter is woken by it, a release that failed is sent again,
an acquire of the key in the same process is never refused by its own release still on its
way, and shutdown (``flush``) reads every answer. On a private redis-server (it is frozen).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from celery_exclusive import connect, events
from celery_exclusive.backends.redis import RedisBackend
from celery_exclusive.exceptions import BackendError
from celery_exclusive.releasing import Releaser, get_releaser
from celery_exclusive.store import Store

from ..servers import RedisServer, frozen, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(own_redis: RedisServer) -> RedisServer:
    return own_redis


@pytest.fixture
def store(server: RedisServer, prefix: str) -> Iterator[Store]:
    s = connect(server.url + "?socket_timeout=1", prefix=prefix)
    warm = s.lease("warm-up", ttl=30)
    warm.acquire()
    warm.release()  # a store's first release waits: it loads the script (see below)
    try:
        yield s
    finally:
        get_releaser().flush()
        s.close()


class Outcomes:
    """The ``then(released)`` calls, with the thread each came from."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, str]] = []
        self.lock = threading.Lock()

    def __call__(self, released: bool) -> None:
        with self.lock:
            self.calls.append((released, threading.current_thread().name))


def test_the_key_is_free_and_the_answer_read_in_the_background(store: Store) -> None:
    seen: list[bool] = []
    events.lease_released.connect(record := lambda lease, released, **_: seen.append(released))
    try:
        outcomes = Outcomes()
        lease = store.lease("job", ttl=30)
        assert lease.acquire()
        lease.release_soon(outcomes)
        assert not lease.held
        wait_until(lambda: outcomes.calls, 10, "the answer")
        assert outcomes.calls == [(True, "celery-exclusive-releaser")]
        assert seen == [True]
        assert store.holders("job") == []
    finally:
        events.lease_released.disconnect(record)


def test_releasing_a_lease_not_held_sends_nothing(store: Store) -> None:
    outcomes = Outcomes()
    store.lease("never", ttl=30).release_soon(outcomes)
    assert len(get_releaser()) == 0 and outcomes.calls == []


def test_a_waiter_is_woken_by_the_release(store: Store) -> None:
    # ttl 30 s: a waiter not woken by the release would re-check only at the holder's expiry.
    holder = store.lease("job", ttl=30)
    assert holder.acquire()
    got: list[float] = []

    def wait() -> None:
        waiter = store.lease("job", ttl=30)
        if waiter.acquire(blocking=True, timeout=20):
            got.append(time.monotonic())
            waiter.release()

    thread = threading.Thread(target=wait)
    thread.start()
    wait_until(lambda: _someone_waits(store, "job"), 10, "the waiter to block")
    released_at = time.monotonic()
    holder.release_soon()
    thread.join(25)
    assert got, "the waiter was not woken"
    assert got[0] - released_at < 10  # far sooner than the holder's 30 s expiry


def _someone_waits(store: Store, key: str) -> bool:
    return bool((store.backend.waiting([key]) or [False])[0])


class SlowAnswers(RedisBackend):
    """A Redis backend whose release leaves only when its answer is collected, after ``delay``
    s: the widest gap there can be between release_soon() and the store running the release."""

    delay = 0.3

    def send_release(
        self, key: str, token: str, done: Callable[[bool | BackendError], object]
    ) -> Callable[[], None] | None:
        lock = threading.Lock()
        sent: list[bool] = []

        def collect() -> None:
            with lock:
                if sent:
                    return
                time.sleep(self.delay)
                sent.append(True)
            done(self.release(key, token))

        return collect


@pytest.fixture
def slow_store(server: RedisServer, prefix: str) -> Iterator[Store]:
    import redis

    backend = SlowAnswers(redis.Redis(port=server.port, socket_timeout=5), prefix=prefix)
    yield Store(backend)
    get_releaser().flush()
    backend.close()


def test_an_acquire_in_this_process_waits_for_its_own_release_on_its_way(
    slow_store: Store,
) -> None:
    # Given a run that ended (release_soon), its release not yet run by the store
    for i in range(3):
        first = slow_store.lease("job", ttl=30, token=f"run-{i}")
        assert first.acquire()
        first.release_soon()
        # When the next run in this process takes the key at once (skip on conflict)
        second = slow_store.lease("job", ttl=30, token=f"next-{i}")
        # Then it is not refused by the release still on its way
        assert second.acquire(), "refused by this process's own release in flight"
        assert second.release()


def test_flush_reads_every_answer_still_due(slow_store: Store) -> None:
    outcomes = Outcomes()
    for key in ("a", "b", "c"):
        lease = slow_store.lease(key, ttl=30)
        assert lease.acquire()
        lease.release_soon(outcomes)
    get_releaser().flush()
    assert sorted(r for r, _ in outcomes.calls) == [True, True, True]
    assert all(slow_store.holders(k) == [] for k in "abc")
    assert len(get_releaser()) == 0


def test_a_release_whose_answer_timed_out_is_sent_again(store: Store, server: RedisServer) -> None:
    # Given a lease, and the store frozen as it is released (its answer times out after 1 s)
    outcomes = Outcomes()
    lease = store.lease("job", ttl=30)
    assert lease.acquire()
    releaser = get_releaser()
    with frozen(server):
        lease.release_soon(outcomes)
        wait_until(lambda: _waiting_to_retry(releaser), 15, "the first read to time out")
    # Then, once it answers again, the key is freed and then() is called exactly once
    wait_until(lambda: outcomes.calls, 15, "the release to be retried")
    assert store.holders("job") == []
    releaser.flush()
    assert len(outcomes.calls) == 1


def _waiting_to_retry(releaser: Releaser) -> bool:
    """A release that failed is queued to be sent again (see releasing.release_later)."""
    with releaser._cond:
        return any(e.what == "releasing 'job'" for e in releaser._pending.values())


def test_a_release_queued_behind_another_on_the_same_key_is_kept(store: Store) -> None:
    releaser = Releaser()
    ran: list[str] = []
    gate = threading.Event()

    def slow() -> None:
        gate.wait(5)
        ran.append("first")

    releaser.send_later(slow, "first", expires_in=10, ident="same")
    wait_until(lambda: releaser._pending["same"].claimed, 5, "the first try to start")
    releaser.send_later(lambda: ran.append("second"), "second", expires_in=10, ident="same")
    gate.set()
    wait_until(lambda: len(ran) == 2, 5, "both to run")
    assert sorted(ran) == ["first", "second"]


def test_the_next_command_on_the_connection_reads_the_answer_first(store: Store) -> None:
    # The answer stays on the connection, which goes back to the kept ones at once: this
    # thread's next command takes it, reads the answer, then sends its own (run after the
    # release by Redis, which runs one connection's commands in order).
    outcomes = Outcomes()
    lease = store.lease("job", ttl=30)
    assert lease.acquire()
    lease.release_soon(outcomes)
    assert store.holders("job") == []
    assert outcomes.calls == [(True, threading.current_thread().name)]


def test_a_release_the_server_lost_the_script_for_is_made_when_its_answer_is_read(
    store: Store, server: RedisServer
) -> None:
    # A store's first release waits for its answer (it loads the script); after that, a
    # server that lost its scripts (restarted, SCRIPT FLUSH) answers NOSCRIPT: the release is
    # then made the usual way by whoever reads that answer.
    outcomes = Outcomes()
    lease = store.lease("job", ttl=30)
    assert lease.acquire()
    server.client().script_flush()
    lease.release_soon(outcomes)
    wait_until(lambda: outcomes.calls, 10, "the answer")
    assert [released for released, _ in outcomes.calls] == [True]
    assert store.holders("job") == []


def test_the_first_release_of_a_store_waits_for_its_answer(
    server: RedisServer, prefix: str
) -> None:
    fresh = connect(server.url, prefix=prefix)
    try:
        server.client().script_flush()
        outcomes = Outcomes()
        lease = fresh.lease("job", ttl=30)
        assert lease.acquire()
        lease.release_soon(outcomes)
        assert outcomes.calls == [(True, threading.current_thread().name)]
    finally:
        fresh.close()


def test_closing_the_store_reads_the_answers_still_owed(server: RedisServer, prefix: str) -> None:
    s = connect(server.url, prefix=prefix)
    warm = s.lease("warm-up", ttl=30)
    warm.acquire()
    warm.release()
    outcomes = Outcomes()
    lease = s.lease("job", ttl=30)
    assert lease.acquire()
    lease.release_soon(outcomes)
    s.close()
    assert [released for released, _ in outcomes.calls] == [True]
