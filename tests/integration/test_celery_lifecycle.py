"""ExclusiveTask on a real prefork worker: each conflict policy, hold mode and task ending.

One prefork worker (concurrency 3) serves the whole module. Every test uses its own ``tag``
(its own history list) and its own keys, waits on conditions with deadlines, and checks the
store afterwards: a lease that outlives its task is a bug even when every result looks right.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
import redis

from celery_exclusive import AlreadyRunning
from celery_exclusive.celery import ExclusiveTask, is_skipped
from celery_exclusive.celery.config import store_for

from .. import celery_app as ca
from ..history import check_history
from ..servers import wait_until
from ..workers import Worker, shown_if_failed, wait_for
from .conftest import CeleryEnv

# A safety net only: each test is meant to take a few seconds (the first also starts the worker).
pytestmark = pytest.mark.timeout(40)


@pytest.fixture(scope="module")
def worker(request: pytest.FixtureRequest, celery_env: CeleryEnv) -> Iterator[Worker]:
    with celery_env.worker(pool="prefork", concurrency=3) as w, shown_if_failed(request, w):
        yield w


# -- helpers ------------------------------------------------------------------------------


def holder_ids(key: str) -> list[str]:
    """The task ids that hold ``key`` now (empty when it is free)."""
    return [str(h.meta.get("task_id")) for h in store_for(ca.app).holders(key)]


def wait_free(key: str, timeout: float) -> None:
    wait_until(lambda: store_for(ca.app).holders(key) == [], timeout, f"{key!r} to be free")


def started_ids(tag: str) -> list[str]:
    # a client without decode_responses: its replies are bytes
    raw = cast(list[bytes], ca.history_client().lrange(ca.history_key(tag) + ":started", 0, -1))
    return [x.decode() for x in raw]


def wait_started(tag: str, task_id: str, timeout: float = 10) -> None:
    wait_until(lambda: task_id in started_ids(tag), timeout, f"task {task_id} to start")


def history_ids(tag: str) -> list[str]:
    """Ids of the recorded runs of ``tag``, in start order."""
    return [h["id"] for h in sorted(ca.read_history(tag), key=lambda h: h["start"])]


def assert_already_running(result: Any, holder_id: str) -> None:
    """``result`` failed with AlreadyRunning because ``holder_id`` held the key."""
    error = result.get(timeout=10, propagate=False)
    assert result.state == "FAILURE", (result.state, error)
    assert holder_id in str(error), error
    # The caller can catch the library's own exception type, as it was raised in the worker.
    assert isinstance(error, AlreadyRunning), (
        f"the result is a {type(error).__module__}.{type(error).__name__}, "
        f"not an AlreadyRunning: {error}"
    )


# -- on_conflict ---------------------------------------------------------------------------


def test_skip_returns_a_record_naming_the_holder(worker: Worker, celery_env: CeleryEnv) -> None:
    # Given a long sync_customer(7) that has started, so it holds the run lease
    tag = celery_env.tag()
    first = ca.sync_customer.delay(7, tag=tag, duration=1.5)
    wait_started(tag, first.id)
    # When a second call for the same customer runs meanwhile
    second = ca.sync_customer.delay(7, tag=tag, duration=0.1)
    value = second.get(timeout=10)
    # Then it ends SUCCESS with a skip record that names the first task as the holder
    assert second.state == "SUCCESS"
    assert is_skipped(value), value
    assert value["holder_task_id"] == first.id
    assert value["key"] == ca.sync_customer.exclusive_key((7,), {"tag": tag})
    # and the first runs to its end, the only run recorded
    assert first.get(timeout=10) == 7
    assert history_ids(tag) == [first.id]


def test_raise_fails_the_second_copy_with_already_running(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given two report_raise calls (one key for every call) sent together
    tag = celery_env.tag()
    results = [ca.report_raise.delay(tag=tag, duration=1.5) for _ in range(2)]
    # When both have ended
    wait_for(results, 15)
    # Then one succeeded and the other failed with AlreadyRunning naming the first
    states = sorted(r.state for r in results)
    assert states == ["FAILURE", "SUCCESS"], states
    ok = next(r for r in results if r.state == "SUCCESS")
    failed = next(r for r in results if r.state == "FAILURE")
    assert ok.result == "done"
    assert_already_running(failed, ok.id)
    # and only the successful one ran its body
    assert history_ids(tag) == [ok.id]


def test_retry_runs_the_second_copy_after_the_first(worker: Worker, celery_env: CeleryEnv) -> None:
    # Given two report_retry calls (one key, on_conflict=retry every 0.3 s) sent together
    tag = celery_env.tag()
    results = [ca.report_retry.delay(tag=tag, duration=0.5) for _ in range(2)]
    # When both have ended
    values = wait_for(results, 15)
    # Then both succeeded
    assert values == ["done", "done"]
    assert [r.state for r in results] == ["SUCCESS", "SUCCESS"]
    # and their runs did not overlap, the later one having been retried at least once
    history = sorted(ca.read_history(tag), key=lambda h: h["start"])
    assert len(history) == 2, history
    check_history(history)
    assert {h["id"] for h in history} == {r.id for r in results}
    assert history[0]["retries"] == 0
    assert history[1]["retries"] >= 1, history


def test_wait_runs_every_copy_one_after_another(worker: Worker, celery_env: CeleryEnv) -> None:
    # Given three sync_wait(5) calls sent together (on_conflict=wait) to three pool processes
    tag = celery_env.tag()
    results = [ca.sync_wait.delay(5, tag=tag, duration=0.5) for _ in range(3)]
    # When they have all ended
    values = wait_for(results, 15)
    # Then each one ran, none was skipped, and their runs never overlapped
    assert values == [5, 5, 5]
    history = ca.read_history(tag)
    assert sorted(h["id"] for h in history) == sorted(r.id for r in results)
    check_history(history)
    wait_free(ca.sync_wait.exclusive_key((5,), {"tag": tag}), 10)


# -- hold=until_done across self.retry() -----------------------------------------------------


def test_until_done_holds_across_retries_and_frees_at_the_end(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given flaky(9), which retries itself twice (hold=until_done, on_duplicate=return_existing)
    tag = celery_env.tag()
    key = ca.flaky.exclusive_key((9,), {"tag": tag})
    first = ca.flaky.delay(9, tag=tag, fail_times=2)
    # When it is waiting for a retry and the same call is made again
    wait_until(lambda: first.state == "RETRY", 10, "flaky to retry")
    duplicate = ca.flaky.delay(9, tag=tag)
    # Then the duplicate is the running task itself, which holds the key
    assert duplicate.id == first.id
    assert holder_ids(key) == [first.id]
    # and the task ends SUCCESS after two retries, having run three times under one id
    assert first.get(timeout=15) == 2
    history = sorted(ca.read_history(tag), key=lambda h: h["start"])
    assert [(h["id"], h["retries"]) for h in history] == [(first.id, n) for n in range(3)]
    assert all(a["end"] <= b["start"] for a, b in itertools.pairwise(history)), history
    # under one grant of the lease, never given up between retries (same fence throughout)
    assert len({h["fence"] for h in history}) == 1, history
    # and then the key is free
    wait_free(key, 10)
    # and a new call is a new task that runs, under a new grant
    again = ca.flaky.delay(9, tag=tag, fail_times=0)
    assert again.id != first.id
    assert again.get(timeout=10) == 0
    last = max(ca.read_history(tag), key=lambda h: h["start"])
    assert last["id"] == again.id
    assert last["fence"] > history[0]["fence"]
    wait_free(key, 10)


def test_until_done_listing_names_the_worker_that_runs_it(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given an until_done task, queued by this process (its grant described by the producer)
    tag = celery_env.tag()
    key = ca.slow_until_done.exclusive_key((7,), {"tag": tag})
    result = ca.slow_until_done.delay(7, tag=tag, duration=1.5)
    # When the worker runs it
    wait_started(tag, result.id)
    # Then the key's one holder is described as running, on the worker's node
    [holder] = store_for(ca.app).holders(key)
    assert holder.meta["task_id"] == result.id
    assert holder.meta["state"] == "running"
    assert holder.meta["node"].startswith(worker.name.split("@")[0] + "@")
    assert result.get(timeout=15) == 7
    wait_free(key, 10)


# -- no lease outlives a run, however it ends -------------------------------------------------

ENDINGS = {
    # task name: (recorded runs per call, the stored state)
    "ignored_recorded": (1, None),  # Ignore: Celery stores nothing (the state stays STARTED)
    "rejected_recorded": (1, "FAILURE"),  # Reject(requeue=False): the worker stores FAILURE
    "failing_recorded": (1, "FAILURE"),
    "autoretried_recorded": (3, "FAILURE"),  # autoretry_for, max_retries=2
}


@pytest.mark.parametrize("name", list(ENDINGS))
def test_no_lease_left_after_the_run_ends(name: str, worker: Worker, celery_env: CeleryEnv) -> None:
    runs, state = ENDINGS[name]
    task = getattr(ca, name)
    tag = celery_env.tag()
    key = task.exclusive_key((61,), {"tag": tag})

    def wait_ended(result: Any, runs_so_far: int) -> None:
        wait_until(lambda: len(ca.read_history(tag)) == runs_so_far, 10, f"{name} to run")
        if state is not None:
            value = result.get(timeout=10, propagate=False)
            assert result.state == state, (result.state, value)
            assert not is_skipped(value), value

    # Given a run of the task that ended its own way (after recording each of its runs)
    first = task.delay(61, tag=tag)
    wait_ended(first, runs)
    assert set(history_ids(tag)) == {first.id}
    # When we look at its run lease (ttl 30 s, far longer than the deadline)
    # Then it has been released
    wait_free(key, 10)
    # and a second call for the same key is not skipped: it runs its body
    second = task.delay(61, tag=tag)
    wait_ended(second, 2 * runs)
    assert history_ids(tag)[runs:] == [second.id] * runs
    wait_free(key, 10)


# -- revoke ----------------------------------------------------------------------------------


def test_revoking_a_counted_down_task_frees_its_enqueue_lease(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given import_queued(11) (hold=queued) published with a 60 s countdown, which the worker
    # has received (it keeps such a message in memory until it is due)
    tag = celery_env.tag()
    queued_key = ca.import_queued.exclusive_key((11,), {"tag": tag}) + "@queued"
    first = ca.import_queued.apply_async((11,), {"tag": tag}, countdown=60)
    duplicate = ca.import_queued.delay(11, tag=tag)
    assert duplicate.id == first.id
    assert holder_ids(queued_key) == [first.id]
    wait_until(lambda: f"[{first.id}] received" in worker.output(), 10, "the worker to get it")
    # When it is revoked long before its countdown ends
    first.revoke()
    # Then the enqueue lease is released at once, not when the message falls due
    wait_free(queued_key, 10)
    wait_until(lambda: first.state == "REVOKED", 5, "the task to be REVOKED")
    # and a new call is a new task, and it runs (the revoked one never did)
    again = ca.import_queued.delay(11, tag=tag)
    assert again.id != first.id
    assert again.get(timeout=10) == 11
    assert history_ids(tag) == [again.id]


def test_terminating_a_running_task_frees_its_run_lease(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given slow(12) running for 30 s in a pool process
    tag = celery_env.tag()
    key = ca.slow.exclusive_key((12,), {"tag": tag})
    first = ca.slow.delay(12, tag=tag, duration=30)
    wait_started(tag, first.id)
    assert holder_ids(key) == [first.id]
    # When it is revoked with terminate=True
    first.revoke(terminate=True)
    # Then its run lease is released
    wait_free(key, 5)
    wait_until(lambda: first.state == "REVOKED", 5, "the task to be REVOKED")
    # and a new run of the same key is not skipped: it runs to its end
    again = ca.slow.delay(12, tag=tag, duration=0.1)
    assert again.get(timeout=10) == 12
    assert history_ids(tag) == [again.id]


# -- hold=queued ---------------------------------------------------------------------------


def test_duplicates_during_a_countdown_get_the_queued_task(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given import_queued(21) published with a 2 s countdown
    tag = celery_env.tag()
    queued_key = ca.import_queued.exclusive_key((21,), {"tag": tag}) + "@queued"
    first = ca.import_queued.apply_async((21,), {"tag": tag}, countdown=2)
    # When the same call is made 5 times during the countdown
    duplicates = [ca.import_queued.delay(21, tag=tag) for _ in range(5)]
    assert first.state == "PENDING"  # still counting down
    # Then each gets the queued task
    assert [d.id for d in duplicates] == [first.id] * 5
    # and that task runs once; its enqueue lease was released when it started
    assert first.get(timeout=10) == 21
    assert holder_ids(queued_key) == []
    assert history_ids(tag) == [first.id]


def test_hold_queued_publishes_one_message_for_many_calls(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # Given a queue that no worker consumes
    tag = celery_env.tag()
    queue = f"idle-{tag}"
    queued_key = ca.import_queued.exclusive_key((13,), {"tag": tag}) + "@queued"
    broker = redis.Redis.from_url(celery_env.env["CEX_BROKER_URL"], socket_timeout=10)
    try:
        # When import_queued(13) (hold=queued) is published 200 times to it
        results = [
            ca.import_queued.apply_async((13,), {"tag": tag}, queue=queue) for _ in range(200)
        ]
        # Then every call gets the same task
        assert {r.id for r in results} == {results[0].id}
        # and the queue holds exactly one message: that task's
        assert broker.llen(queue) == 1
        message = json.loads(cast(bytes, broker.lindex(queue, 0)))  # llen was 1: not None
        assert message["headers"]["id"] == results[0].id
        assert holder_ids(queued_key) == [results[0].id]
    finally:
        broker.delete(queue)  # this queue only (the broker db is shared by the module)
        store_for(ca.app).force_release(queued_key)  # nobody will start it: no leftovers
        broker.close()


# -- hold=queued_and_running ----------------------------------------------------------------


def test_queued_and_running_queues_one_copy_behind_the_running_one(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # What the code does (hold=queued_and_running, on_conflict=wait): a call takes the enqueue
    # lease "<key>@queued"; at start the task takes the run lease "<key>" (waiting for it),
    # and only then gives the enqueue lease back. So while A runs, one copy B can be queued;
    # B holds "<key>@queued" while it waits, and every other call meanwhile gets B.
    tag = celery_env.tag()
    run_key = ca.import_both.exclusive_key((14,), {"tag": tag})
    queued_key = run_key + "@queued"
    # Given import_both(14) A running (its enqueue lease already given back)
    a = ca.import_both.delay(14, tag=tag, duration=1.5)
    wait_started(tag, a.id)
    assert holder_ids(queued_key) == []
    assert len(holder_ids(run_key)) == 1
    # When the same call is made twice while A runs
    b = ca.import_both.delay(14, tag=tag, duration=1.0)
    c = ca.import_both.delay(14, tag=tag)
    # Then the first is queued as a new task B and the second gets B
    assert b.id != a.id
    assert c.id == b.id
    assert holder_ids(queued_key) == [b.id]
    assert not a.ready()  # all of that happened while A was running
    # and B runs after A ends; once B has started, a new call queues a new task D
    assert a.get(timeout=10) == 14
    wait_started(tag, b.id)
    assert holder_ids(queued_key) == []
    d = ca.import_both.delay(14, tag=tag, duration=0.1)
    assert d.id not in (a.id, b.id)
    assert wait_for([b, d], 15) == [14, 14]
    # and the three runs happened one after another, in that order
    history = ca.read_history(tag)
    assert history_ids(tag) == [a.id, b.id, d.id]
    check_history(history)
    # and no lease is left behind
    wait_free(run_key, 10)
    assert holder_ids(queued_key) == []


# -- the decorator and per-call options -------------------------------------------------------


def test_decorated_task_never_overlaps(worker: Worker, celery_env: CeleryEnv) -> None:
    # Given a task made exclusive with @exclusive(...) above @app.task
    assert isinstance(ca.decorated, ExclusiveTask)
    tag = celery_env.tag()
    # When a burst of 6 calls for one customer is sent
    results = [ca.decorated.delay(3, tag=tag, duration=0.5) for _ in range(6)]
    values = wait_for(results, 15)
    # Then each call either ran or was skipped, and at least one was skipped
    assert all(v == 3 or is_skipped(v) for v in values), values
    skipped = [v for v in values if is_skipped(v)]
    assert skipped, "the burst never produced a conflict"
    ran = {r.id for r, v in zip(results, values, strict=True) if not is_skipped(v)}
    assert {v["holder_task_id"] for v in skipped} <= ran
    # and the runs never overlapped
    history = ca.read_history(tag)
    assert {h["id"] for h in history} == ran
    assert len(history) == len(ran)
    check_history(history)
    wait_free(ca.decorated.exclusive_key((3,), {"tag": tag}), 10)


def test_per_call_on_conflict_override(worker: Worker, celery_env: CeleryEnv) -> None:
    # Given sync_customer(15) (on_conflict=skip) running
    tag = celery_env.tag()
    first = ca.sync_customer.delay(15, tag=tag, duration=1.5)
    wait_started(tag, first.id)
    # When a second call asks for on_conflict=raise
    second = ca.sync_customer.apply_async((15,), {"tag": tag}, exclusive={"on_conflict": "raise"})
    # Then it fails with AlreadyRunning naming the first, instead of being skipped
    assert_already_running(second, first.id)
    # and the first runs to its end, the only run recorded
    assert first.get(timeout=10) == 15
    assert history_ids(tag) == [first.id]
