"""Singleton on real workers: celery-singleton's documented behaviour, and where ours is safer.

celery-singleton's README promises: a duplicate ``delay()`` returns the AsyncResult of the copy
queued or running (or raises ``DuplicateTaskError`` naming it, by ``raise_on_duplicate`` on the
task or ``singleton_raise_on_duplicate`` on the app); ``unique_on`` picks the arguments;
``lock_expiry`` lets a duplicate in after that many seconds; the lock is released when the task
finishes, with success or failure; ``clear_locks(app)`` frees the locks. Ours adds: retries
keep the lock and run, a SIGKILLed worker's key is free within ``ttl`` (celery-singleton's
never expires by default), a stale release never frees the next holder's lock, and
``clear_locks`` frees only the leases of Singleton tasks.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import states

import celery_exclusive
from celery_exclusive import Store
from celery_exclusive.compat.celery_singleton import DuplicateTaskError, clear_locks

from .. import compat_apps as ca
from ..history import check_history
from ..servers import wait_until
from ..workers import Worker, shown_if_failed
from .compat_fixtures import compat_fixtures

env, worker, store, broker = compat_fixtures("singleton_app")


def tag() -> str:
    return uuid.uuid4().hex[:10]


def new_copy_after(call: Callable[[], Any], existing_id: str, timeout: float) -> float:
    """Repeat ``call`` until it publishes a new copy (not ``existing_id``); return the time."""
    start = time.monotonic()
    wait_until(lambda: call().id != existing_id, timeout, "a new copy to be accepted", step=0.05)
    return time.monotonic() - start


def test_duplicate_returns_the_existing_async_result(
    env: dict[str, str], store: Store, broker: redis.Redis
) -> None:
    # Given a call queued where no worker consumes
    t, queue = tag(), f"nobody-{tag()}"
    first = ca.single_job.apply_async((1,), {"tag": t}, queue=queue)
    # When the same call is made again, by position or by name
    again = ca.single_job.apply_async((1,), {"tag": t}, queue=queue)
    by_name = ca.single_job.apply_async(kwargs={"n": 1, "tag": t}, queue=queue)
    # Then both get the first copy's AsyncResult, and nothing more is published
    assert again == first
    assert by_name.id == first.id
    assert broker.llen(queue) == 1
    # The lease is in the store singleton_backend_url names, under singleton_key_prefix
    key = ca.single_job.exclusive_key((1,), {"tag": t})
    assert [h.meta["task_id"] for h in store.holders(key)] == [first.id]
    # and other arguments are another copy
    assert ca.single_job.apply_async((2,), {"tag": t}, queue=queue) != first


def test_lock_is_released_when_the_task_finishes(worker: Worker) -> None:
    # Given a call running on the worker
    t = tag()
    first = ca.single_job.delay(1, tag=t, duration=1.0)
    wait_until(lambda: ca.started(t) == 1, 30, "the first run to start")
    # A call while it runs gets it
    assert ca.single_job.delay(1, tag=t, duration=1.0) == first
    # After it finished, the same call is a new task
    assert first.get(timeout=30) == 1
    second = ca.single_job.delay(1, tag=t, duration=0.1)
    assert second != first
    second.get(timeout=30)
    history = ca.read_history(t)
    assert [h["id"] for h in history] == [first.id, second.id]
    check_history(history)


def test_raise_on_duplicate_from_the_app_and_the_task(env: dict[str, str]) -> None:
    queue = f"nobody-{tag()}"
    n = int(time.time() * 1000)
    # Given singleton_raise_on_duplicate=True on the app and nothing on the task
    first = ca.single_raising.apply_async((n,), queue=queue)
    # Then a duplicate raises DuplicateTaskError naming the existing task (also ours)
    with pytest.raises(DuplicateTaskError) as caught:
        ca.single_raising.apply_async((n,), queue=queue)
    assert caught.value.task_id == first.id
    assert isinstance(caught.value, celery_exclusive.AlreadyQueued)
    assert first.id in str(caught.value)
    # while raise_on_duplicate=False on a task wins over the app: the existing AsyncResult
    t = tag()
    job = ca.single_job.apply_async((1,), {"tag": t}, queue=queue)
    assert ca.single_job.apply_async((1,), {"tag": t}, queue=queue) == job


def test_unique_on_picks_the_arguments(env: dict[str, str]) -> None:
    queue = f"nobody-{tag()}"
    n = int(time.time() * 1000)
    for task in (ca.single_unique, ca.single_unique_str):  # a list, and a str for one name
        first = task.apply_async(kwargs={"user_id": n, "other": 1}, queue=queue)
        assert task.apply_async((n,), {"other": 2}, queue=queue) == first
        assert task.apply_async((n + 1,), {"other": 1}, queue=queue) != first


def test_lock_expiry_lets_a_duplicate_in_later(env: dict[str, str], store: Store) -> None:
    queue = f"nobody-{tag()}"
    n = int(time.time() * 1000)
    # Given lock_expiry=1 on the task, and a call no worker runs
    first = ca.single_expiry.apply_async((n,), queue=queue)
    assert ca.single_expiry.apply_async((n,), queue=queue) == first
    # Then a second copy is accepted about a second later
    call: Callable[[], Any] = lambda: ca.single_expiry.apply_async((n,), queue=queue)  # noqa: E731
    waited = new_copy_after(call, first.id, 10)
    assert 0.5 < waited < 5
    # and singleton_lock_expiry (60 s) is the default of a task without one (not an hour)
    t = tag()
    ca.single_job.apply_async((5,), {"tag": t}, queue=queue)
    [holder] = store.holders(ca.single_job.exclusive_key((5,), {"tag": t}))
    assert 50 < holder.expires_in <= ca.DEFAULT_LOCK_SECONDS


def test_lock_is_released_after_a_failure(worker: Worker) -> None:
    t = tag()
    failed = ca.single_failing.delay(1, tag=t)
    assert isinstance(failed.get(timeout=30, propagate=False), ValueError)
    assert failed.state == states.FAILURE
    again = ca.single_failing.delay(1, tag=t)
    assert again != failed
    again.get(timeout=30, propagate=False)
    assert [h["id"] for h in ca.read_history(t)] == [failed.id, again.id]


def test_retries_keep_the_lock_and_run(worker: Worker) -> None:
    # Given a task that retries twice, a second apart
    t = tag()
    result = ca.single_retrying.delay(1, tag=t, fail_times=2)
    wait_until(lambda: len(ca.read_history(t)) >= 1, 30, "the first attempt to end")
    # While a retry waits, a call gets the retrying task
    assert ca.single_retrying.delay(1, tag=t, fail_times=2) == result
    # and every retry ran (celery-singleton dropped the retry as a duplicate of itself)
    assert result.get(timeout=30) == 2
    history = ca.read_history(t)
    assert [(h["id"], h["retries"]) for h in history] == [(result.id, i) for i in range(3)]
    # After the last attempt the key is free
    assert ca.single_retrying.delay(1, tag=t, fail_times=0) != result


def test_clear_locks_frees_only_singleton_leases(env: dict[str, str], store: Store) -> None:
    queue = f"nobody-{tag()}"
    n = int(time.time() * 1000)
    # Given queued Singleton calls, a queued call of a plain ExclusiveTask of the same app,
    # and a lease of someone else in the same store
    single = ca.single_raising.apply_async((n,), queue=queue)
    unique = ca.single_unique.apply_async((n,), queue=queue)
    native = ca.native_until_done.apply_async((n,), queue=queue)
    native_key = ca.native_until_done.exclusive_key((n,), {})
    other = store.lease(f"{ca.single_raising.name}-not-a-task:x", ttl=60, auto_renew=False)
    assert other.acquire()
    # When the locks are cleared
    assert clear_locks(ca.singleton_app) >= 2
    # Then the Singleton calls are new tasks again
    assert ca.single_raising.apply_async((n,), queue=queue).id != single.id
    assert ca.single_unique.apply_async((n,), queue=queue) != unique
    # and the other leases are untouched
    assert [h.meta["task_id"] for h in store.holders(native_key)] == [native.id]
    assert other.release()


def test_killed_worker_frees_the_key_within_ttl(
    request: pytest.FixtureRequest, env: dict[str, str]
) -> None:
    # Given a worker of its own running a long task (ttl 3 s; celery-singleton: never expires)
    t, queue = tag(), f"crash-{tag()}"
    w = Worker({**env, "CEX_QUEUE": queue}, app="tests.compat_apps:singleton_app", concurrency=1)
    with shown_if_failed(request, w.start()):
        first = ca.single_crash.apply_async((1,), {"tag": t}, queue=queue)
        wait_until(lambda: ca.started(t) == 1, 30, "the run to start")
        # When the worker is SIGKILLed (no Python code runs: nothing releases)
        w.kill()
        # Then the key is still held right after the kill
        assert ca.single_crash.apply_async((1,), {"tag": t}, queue=queue) == first
        # and free within the ttl
        call: Callable[[], Any] = lambda: ca.single_crash.apply_async(  # noqa: E731
            (1,), {"tag": t}, queue=queue
        )
        assert new_copy_after(call, first.id, 15) < 3.0 + 1.5


def test_a_stale_release_never_frees_the_next_holders_lock(worker: Worker, store: Store) -> None:
    # Given a run whose lease was taken from it (as an expiry during a long pause would)
    t = tag()
    call = ((3,), {"tag": t, "duration": 1.5})
    first = ca.single_job.apply_async(*call)
    wait_until(lambda: ca.started(t) == 1, 30, "the first run to start")
    key = ca.single_job.exclusive_key(*call)
    [running] = store.holders(key)
    assert store.force_release(key, running.token) == 1
    # and the key given to a second call, queued where no worker runs it
    second = ca.single_job.apply_async(*call, queue=f"nobody-{tag()}")
    assert second != first
    # When the first run ends and releases
    first.get(timeout=30)
    # Then the second call still holds the key (celery-singleton's DEL would have freed it)
    assert [h.meta["task_id"] for h in store.holders(key)] == [second.id]
    assert ca.single_job.apply_async(*call) == second
