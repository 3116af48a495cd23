"""QueueOnce on real workers: celery-once's documented behaviour, and where ours is safer.

celery-once's README promises: a second ``delay()`` of a call already queued or running raises
``AlreadyQueued`` (or, with ``graceful``, returns a REJECTED EagerResult); ``keys`` picks the
arguments; ``timeout`` clears a lock; ``unlock_before_run`` frees the key when the task starts;
the lock clears when the task ends, with success or failure; retries don't take it again.
Ours adds: a SIGKILLed worker's key is free within ``ttl``, not after ``timeout`` (an hour),
and a stale release never frees the next holder's lock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from celery import states
from celery.result import EagerResult

import celery_exclusive
from celery_exclusive import Store
from celery_exclusive.compat.celery_once import AlreadyQueued

from .. import compat_apps as ca
from ..history import check_history
from ..servers import wait_until
from ..workers import Worker, shown_if_failed
from .compat_fixtures import compat_fixtures

env, worker, store, broker = compat_fixtures("once_app")


def tag() -> str:
    return uuid.uuid4().hex[:10]


def accepted_after(call: Callable[[], Any], timeout: float) -> float:
    """Repeat ``call`` until it is not refused as a duplicate; return the seconds it took."""
    start = time.monotonic()
    wait_until(lambda: _accepted(call), timeout, "the key to be free", step=0.05)
    return time.monotonic() - start


def _accepted(call: Callable[[], Any]) -> bool:
    try:
        call()
    except AlreadyQueued:
        return False
    return True


def test_second_call_while_queued_raises_already_queued(
    env: dict[str, str], store: Store, broker: redis.Redis
) -> None:
    # Given a call queued where no worker consumes
    t, queue = tag(), f"nobody-{tag()}"
    first = ca.once_job.apply_async((1,), {"tag": t}, queue=queue)
    # When the same call is made again
    with pytest.raises(AlreadyQueued) as caught:
        ca.once_job.apply_async((1,), {"tag": t}, queue=queue)
    # Then it raises celery-once's error, which is also ours, naming the queued copy
    error = caught.value
    assert isinstance(error, celery_exclusive.AlreadyQueued)
    assert error.holder["task_id"] == first.id
    # with a countdown within ONCE's default_timeout (not our hour-long queue_ttl)
    assert 0 < error.countdown <= ca.DEFAULT_LOCK_SECONDS
    # and no second message was published
    assert broker.llen(queue) == 1
    # The lease is in the store ONCE names (db 2), under the key get_key gives
    key = ca.once_job.get_key((1,), {"tag": t})
    assert key == f'{ca.once_job.name}:n=1,tag="{t}",duration=0.2'
    assert [h.meta["task_id"] for h in store.holders(key)] == [first.id]
    # and other arguments are another key
    ca.once_job.apply_async((2,), {"tag": t}, queue=queue)
    assert broker.llen(queue) == 2


def test_running_call_holds_the_key_until_it_succeeds(worker: Worker) -> None:
    # Given a call running on the worker
    t = tag()
    first = ca.once_job.delay(1, tag=t, duration=1.0)
    wait_until(lambda: ca.started(t) == 1, 30, "the first run to start")
    # When the same call is made while it runs, it is refused
    with pytest.raises(AlreadyQueued):
        ca.once_job.delay(1, tag=t, duration=1.0)
    # Then once it has succeeded, the key is free at once
    assert first.get(timeout=30) == 1
    second = ca.once_job.delay(1, tag=t, duration=0.1)
    assert second.get(timeout=30) == 1
    history = ca.read_history(t)
    assert [h["id"] for h in history] == [first.id, second.id]
    check_history(history)  # never two at once, fences rising


def test_graceful_returns_a_rejected_eager_result(env: dict[str, str], broker: redis.Redis) -> None:
    t, queue = tag(), f"nobody-{tag()}"
    # Given graceful on the task: a duplicate returns celery-once's REJECTED EagerResult
    ca.once_graceful.apply_async((1,), {"tag": t}, queue=queue)
    duplicate = ca.once_graceful.apply_async((1,), {"tag": t}, queue=queue)
    assert isinstance(duplicate, EagerResult)
    assert (duplicate.id, duplicate.state, duplicate.result) == (None, states.REJECTED, None)
    # and once={"graceful": False} for one call raises
    with pytest.raises(AlreadyQueued):
        ca.once_graceful.apply_async((1,), {"tag": t}, queue=queue, once={"graceful": False})
    # Given a task without graceful, once={"graceful": True} for one call returns the result
    ca.once_job.apply_async((7,), {"tag": t}, queue=queue)
    gentle = ca.once_job.apply_async((7,), {"tag": t}, queue=queue, once={"graceful": True})
    assert gentle.state == states.REJECTED
    # Only the two first calls were published
    assert broker.llen(queue) == 2


def test_keys_pick_the_arguments_of_the_lock(env: dict[str, str]) -> None:
    queue = f"nobody-{tag()}"
    n = int(time.time() * 1000)  # arguments of this run only
    # keys=["a"]: b does not count
    ca.once_keys.apply_async((n, 1), queue=queue)
    with pytest.raises(AlreadyQueued):
        ca.once_keys.apply_async((n, 2), queue=queue)
    with pytest.raises(AlreadyQueued):
        ca.once_keys.apply_async(kwargs={"a": n, "b": 3}, queue=queue)  # bound by name
    ca.once_keys.apply_async((n + 1, 2), queue=queue)
    # keys=[]: one lock for the task, whatever the arguments
    ca.once_no_keys.apply_async((n, 1), queue=queue)
    with pytest.raises(AlreadyQueued):
        ca.once_no_keys.apply_async((n + 5, 6), queue=queue)
    # once={"keys": [...]} per call picks them for that call
    t = tag()
    ca.once_job.apply_async((1,), {"tag": t}, queue=queue, once={"keys": ["tag"]})
    with pytest.raises(AlreadyQueued):
        ca.once_job.apply_async((2,), {"tag": t}, queue=queue, once={"keys": ["tag"]})


def test_timeout_frees_a_queued_key(env: dict[str, str]) -> None:
    queue = f"nobody-{tag()}"
    n = int(time.time() * 1000)
    # Given the task's timeout (1 s) on a call that no worker runs
    ca.once_timeout.apply_async((n,), queue=queue)
    with pytest.raises(AlreadyQueued):
        ca.once_timeout.apply_async((n,), queue=queue)
    # Then the key is free again about a second later, not after an hour
    waited = accepted_after(lambda: ca.once_timeout.apply_async((n,), queue=queue), 10)
    assert 0.5 < waited < 5
    # and a per-call timeout does the same for a task without one
    t = tag()
    ca.once_job.apply_async((3,), {"tag": t}, queue=queue, once={"timeout": 1})
    waited = accepted_after(lambda: ca.once_job.apply_async((3,), {"tag": t}, queue=queue), 10)
    assert 0.5 < waited < 5


def test_unlock_before_run_frees_the_key_when_the_task_starts(worker: Worker) -> None:
    # Given a task with unlock_before_run, running
    t = tag()
    first = ca.once_unlock.delay(1, tag=t, duration=1.5)
    wait_until(lambda: ca.started(t) == 1, 30, "the first run to start")
    # When the same call is made while it runs, it is accepted (celery-once's promise)
    second = ca.once_unlock.delay(1, tag=t, duration=0.1)
    assert not first.ready()
    assert second.id != first.id
    assert [r.get(timeout=30) for r in (first, second)] == [1, 1]


def test_lock_is_freed_after_a_failure(worker: Worker) -> None:
    t = tag()
    failed = ca.once_failing.delay(1, tag=t)
    assert isinstance(failed.get(timeout=30, propagate=False), ValueError)
    assert failed.state == states.FAILURE
    # The next call is published and runs
    again = ca.once_failing.delay(1, tag=t)
    again.get(timeout=30, propagate=False)
    assert [h["id"] for h in ca.read_history(t)] == [failed.id, again.id]


def test_retries_keep_the_lock_and_run(worker: Worker) -> None:
    # Given a task that retries twice, a second apart
    t = tag()
    result = ca.once_retrying.delay(1, tag=t, fail_times=2)
    wait_until(lambda: len(ca.read_history(t)) >= 1, 30, "the first attempt to end")
    # While a retry waits, the call is still a duplicate
    with pytest.raises(AlreadyQueued):
        ca.once_retrying.delay(1, tag=t, fail_times=2)
    # and every retry ran (none was refused as a duplicate of itself)
    assert result.get(timeout=30) == 2
    history = ca.read_history(t)
    assert [(h["id"], h["retries"]) for h in history] == [(result.id, i) for i in range(3)]
    # After the last attempt the key is free
    ca.once_retrying.delay(1, tag=t, fail_times=0).get(timeout=30)


def test_killed_worker_frees_the_key_within_ttl(
    request: pytest.FixtureRequest, env: dict[str, str]
) -> None:
    # Given a worker of its own running a long task (ttl 3 s; celery-once: timeout, 1 h)
    t, queue = tag(), f"crash-{tag()}"
    w = Worker({**env, "CEX_QUEUE": queue}, app="tests.compat_apps:once_app", concurrency=1)
    with shown_if_failed(request, w.start()):
        ca.once_crash.apply_async((1,), {"tag": t}, queue=queue)
        wait_until(lambda: ca.started(t) == 1, 30, "the run to start")
        # When the worker is SIGKILLed (no Python code runs: nothing releases)
        w.kill()
        # Then the key is still held right after the kill (no second copy yet)
        with pytest.raises(AlreadyQueued):
            ca.once_crash.apply_async((1,), {"tag": t}, queue=queue)
        # and free within the ttl
        waited = accepted_after(
            lambda: ca.once_crash.apply_async((1,), {"tag": t}, queue=queue), 15
        )
        assert waited < 3.0 + 1.5


def test_a_stale_release_never_frees_the_next_holders_lock(worker: Worker, store: Store) -> None:
    # Given a run whose lease was taken from it (as an expiry during a long pause would)
    t = tag()
    call = ((3,), {"tag": t, "duration": 1.5})
    first = ca.once_job.apply_async(*call)
    wait_until(lambda: ca.started(t) == 1, 30, "the first run to start")
    key = ca.once_job.get_key(*call)
    [running] = store.holders(key)
    assert store.force_release(key, running.token) == 1
    # and the key given to a second call, queued where no worker runs it
    second = ca.once_job.apply_async(*call, queue=f"nobody-{tag()}")
    # When the first run ends and releases
    first.get(timeout=30)
    # Then the second call still holds the key (celery-once's DEL would have freed it)
    assert [h.meta["task_id"] for h in store.holders(key)] == [second.id]
    with pytest.raises(AlreadyQueued):
        ca.once_job.apply_async(*call)


def test_a_setting_that_cannot_be_honoured_fails_the_start_up_check() -> None:
    # Given ONCE asking for blocking calls, which the leases do not offer
    from celery import Celery

    from celery_exclusive.celery.startup import check_app
    from celery_exclusive.compat.celery_once import QueueOnce

    app = Celery("once-bad", broker="memory://", set_as_current=False)
    app.conf.ONCE = {
        "backend": "celery_once.backends.Redis",
        "settings": {"url": "redis://127.0.0.1:1/0", "blocking": True},
    }

    @app.task(base=QueueOnce, shared=False)
    def first(n: int) -> None: ...

    @app.task(base=QueueOnce, shared=False)
    def second(n: int) -> None: ...

    # When a worker's start-up check reads the app; Then it names the setting, once
    problems = check_app(app)
    assert len(problems) == 1 and "blocking" in problems[0], problems
