"""ExclusiveTask under faults, on real Celery workers and a private Redis.

Redelivery (``acks_late`` with a 2 s Redis ``visibility_timeout``), a worker SIGKILLed in the
middle of a run, a hard time limit, a SIGKILLed pool child, and several worker processes
racing over bursts of duplicates. Each test gets a queue of its own (so a message left behind
by one test never reaches the workers of another) and customer ids of its own (so leases never
meet). Times are measured on ``time.monotonic()`` (system-wide on Linux, like the
``start``/``end`` that tests.celery_app.record writes) and printed; the bounds asserted leave
room for a loaded CI box. CELERY_EXCLUSIVE_SLOW=1 also runs the long burst.
"""

from __future__ import annotations

import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import psutil
import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery.exceptions import TimeLimitExceeded

from celery_exclusive.backends.base import Holder
from celery_exclusive.celery import is_skipped
from celery_exclusive.celery.config import store_for

from .. import celery_app as ca
from .. import celery_corners as cc
from ..conftest import SLOW, SLOW_ONLY
from ..history import check_history
from ..servers import RedisServer, wait_until
from ..workers import CeleryEnv, Worker, celery_env_on, wait_for

pytestmark = pytest.mark.timeout(120)

#: The broker's visibility timeout: an unacked message is delivered again after this long.
VISIBILITY = 2.0
#: Slack on top of a ttl for a loaded CI box (scheduling, round trips, a waiter's wake-up).
MARGIN = 2.0
#: Lease ttls of the tasks used here (see tests/celery_app.py).
LATE_TTL = 2.0
SHORT_TTL = 1.0


# -- the environment ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_env(own_redis: RedisServer) -> Iterator[CeleryEnv]:
    """A private redis-server (broker, results, store) with a 2 s visibility timeout."""
    with celery_env_on(own_redis, visibility=VISIBILITY) as env:
        yield env


@dataclass
class Lane:
    """One test's own queue, history tag and workers."""

    env: dict[str, str]
    tag: str
    broker: redis.Redis
    workers: list[Worker] = field(default_factory=list)

    @property
    def queue(self) -> str:
        return self.env["CEX_QUEUE"]

    def worker(self, concurrency: int = 2, **kwargs: Any) -> Worker:
        worker = Worker(self.env, concurrency=concurrency, **kwargs)
        self.workers.append(worker)
        return worker.start()

    def send(self, task: Any, *args: Any, **kwargs: Any) -> Any:
        return task.apply_async(args, kwargs, queue=self.queue)

    def started(self) -> list[str]:
        # a client without decode_responses: its replies are bytes
        raw = cast(
            list[bytes], ca.history_client().lrange(ca.history_key(self.tag) + ":started", 0, -1)
        )
        return [x.decode() for x in raw]

    def history(self) -> list[dict[str, Any]]:
        return ca.read_history(self.tag)

    def logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{w.output()[-6000:]}" for w in self.workers)


@pytest.fixture
def lane(fault_env: CeleryEnv) -> Iterator[Lane]:
    queue = f"q-{uuid.uuid4().hex[:10]}"
    broker = fault_env.server.client(db=0)
    lane = Lane({**fault_env.env, "CEX_QUEUE": queue}, uuid.uuid4().hex[:10], broker)
    try:
        yield lane
    finally:
        for worker in lane.workers:
            worker.stop(timeout=10)
        broker.close()
        print(lane.logs())  # shown by pytest when the test failed


def new_customer() -> int:
    return random.randrange(10**6, 10**7)


def store_holders(key: str) -> list[Holder]:
    return store_for(ca.app).holders(key)


def wait_free(key: str, timeout: float) -> float:
    """Wait until ``key`` has no live holder; return the monotonic time it was seen free."""
    wait_until(lambda: store_holders(key) == [], timeout, f"lease {key!r} to be free", step=0.01)
    return time.monotonic()


def wait_dead(pid: int, timeout: float = 10) -> None:
    def dead() -> bool:
        try:
            zombie: bool = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            return zombie
        except psutil.NoSuchProcess:
            return True

    wait_until(dead, timeout, f"process {pid} to die", step=0.01)


def log_count(worker: Worker, text: str) -> int:
    return worker.output().count(text)


# -- 1. acks_late redelivery while the task runs ----------------------------------------------


def settle(
    lane: Lane, workers: list[Worker], task_id: str, key: str, timeout: float = 15
) -> tuple[int, bool]:
    """Wait until no delivery of ``task_id`` is left anywhere.

    Return how many deliveries the workers logged, and whether it did settle within
    ``timeout`` (a task that runs again on every redelivery never does).

    Left nowhere: every delivery the workers logged has ended, the broker holds no copy (in
    the queue or unacked, i.e. due to be delivered again), and ``key`` is free. A message is
    in neither place for an instant while a worker fetches it, so the state must be seen
    twice, over half a second apart, to count.
    """
    marker = task_id.encode()
    received = f"[{task_id}] received"
    ended = tuple(f"[{task_id}] {end}" for end in ("succeeded", "raised", "retry", "ignored"))
    seen_at: list[float] = []

    def quiet() -> bool:
        n = sum(log_count(w, received) for w in workers)
        done = sum(log_count(w, e) for w in workers for e in ended)
        in_broker = any(marker in m for m in lane.broker.lrange(lane.queue, 0, -1)) or any(
            marker in m for m in lane.broker.hvals("unacked")
        )
        return n >= 1 and done == n and not in_broker and store_holders(key) == []

    def settled() -> bool:
        if not quiet():
            seen_at.clear()
            return False
        seen_at.append(time.monotonic())
        return seen_at[-1] - seen_at[0] >= 0.6

    try:
        wait_until(settled, timeout, f"every delivery of {task_id} to end", step=0.1)
    except TimeoutError:
        return sum(log_count(w, received) for w in workers), False
    return sum(log_count(w, received) for w in workers), True


def check_ran_once(lane: Lane, task_id: str, deliveries: int, settled: bool) -> None:
    started = lane.started()
    history = lane.history()
    print(f"deliveries: {deliveries}, started: {len(started)}, settled: {settled}")
    assert started == [task_id], (
        f"the body started {len(started)} times for {deliveries} deliveries of one task id: "
        f"a redelivered copy ran the work again"
        + ("" if settled else ", and copies were still being redelivered and run")
    )
    assert settled, f"deliveries of {task_id} never stopped ({deliveries} so far)"
    assert len(history) == 1, history
    assert history[0]["id"] == task_id


@pytest.mark.parametrize(
    "concurrency",
    [
        # the redelivered copies reach free pool processes while the first copy runs
        pytest.param(3, id="copies-wait-in-the-pool"),
        # one pool process: a redelivered copy stays in the broker until the first copy is
        # acked, then reaches the worker with the key free
        pytest.param(1, id="copy-waits-in-the-broker"),
    ],
)
def test_redelivered_running_task_waits_for_its_copy_and_runs_once(
    lane: Lane, concurrency: int
) -> None:
    # Given a worker, and an acks_late task that runs 6 s: three times the visibility timeout,
    # so the broker hands the same task id out again while the first copy still runs
    worker = lane.worker(concurrency=concurrency)
    cid = new_customer()
    result = lane.send(ca.late, cid, tag=lane.tag, duration=6.0)
    key = ca.late.exclusive_key([cid], {})

    # When it has finished, and every delivery of it has ended
    assert result.get(timeout=30) == cid
    deliveries, settled = settle(lane, [worker], result.id, key)

    # Then the scenario did happen: the message was delivered again while the first copy ran
    log = worker.output()
    assert deliveries >= 2, (
        f"kombu never redelivered {result.id}, so this test proves nothing: check "
        f"visibility_timeout={VISIBILITY} in broker_transport_options\n{log}"
    )
    if concurrency > 1:
        assert "was delivered again" in log, log
    # and the body ran once: started once, recorded once, and the result is the first run's
    check_ran_once(lane, result.id, deliveries, settled)
    assert result.get(timeout=5) == cid


@pytest.mark.parametrize("name", ["late_quiet", "late_failing"])
def test_redelivered_copy_runs_once_whatever_the_result_backend_holds(
    lane: Lane, name: str
) -> None:
    # Given an acks_late task redelivered while it runs (3 visibility timeouts), whose result
    # backend will never say SUCCESS: ignore_result, or a run that fails at its end
    task = getattr(ca, name)
    worker = lane.worker(concurrency=3)
    cid = new_customer()
    result = lane.send(task, cid, tag=lane.tag, duration=6.0)
    key = task.exclusive_key([cid], {})

    # When the first copy has ended, and every delivery of it has ended
    wait_until(lambda: lane.history(), 30, "the first copy to end")
    deliveries, settled = settle(lane, [worker], result.id, key)
    assert deliveries >= 2, f"kombu never redelivered {result.id}: this test proves nothing"

    # Then the body ran once (the done mark is in the store, whatever the result backend holds)
    check_ran_once(lane, result.id, deliveries, settled)
    if name == "late_failing":
        assert result.state == "FAILURE"  # the skipped copies stored nothing over it


def test_a_long_task_redelivered_many_times_never_fails_nor_runs_again(lane: Lane) -> None:
    # Given an acks_late task of 16 s whose redelivered copies give up waiting after 2 s
    # (2 x ttl) and go back to the queue: more often than Celery's default max_retries of 3
    worker = lane.worker(concurrency=3)
    n = new_customer()
    result = lane.send(cc.late_short_wait, n, tag=lane.tag, duration=16.0)
    seen: list[str] = []

    def ended() -> bool:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        return bool(state in ("SUCCESS", "FAILURE"))

    wait_until(ended, 60, "the task to end", step=0.05)
    deliveries, settled = settle(
        lane, [worker], result.id, cc.late_short_wait.exclusive_key((n,)), timeout=30
    )
    assert deliveries >= 2, f"kombu never redelivered {result.id}: this test proves nothing"
    # Then no copy ever stored a failure (MaxRetriesExceededError), the result is the run's,
    # and the body ran once
    assert "FAILURE" not in seen, (seen, worker.output()[-6000:])
    assert result.get(timeout=1) == n
    # a client without decode_responses: its replies are bytes
    raw = cast(list[bytes], cc.notes().lrange(cc.note_key(lane.tag, "started"), 0, -1))
    started = [x.decode() for x in raw]
    assert started == [result.id], f"{len(started)} runs for {deliveries} deliveries"
    assert settled


def test_redelivered_copy_does_not_run_again_when_the_result_is_stored_late(
    lane: Lane,
) -> None:
    # Given a redelivered copy waiting for the first copy of an acks_late task, and a result
    # backend that takes 0.5 s to store SUCCESS once the first copy has released the key
    worker = lane.worker(concurrency=3)
    cid = new_customer()
    result = lane.send(ca.late_slow_store, cid, tag=lane.tag, duration=4.0)
    key = ca.late_slow_store.exclusive_key([cid], {})
    wait_until(lambda: "was delivered again" in worker.output(), 20, "a redelivered copy to wait")

    # When the first copy ends
    assert result.get(timeout=30) == cid
    deliveries, settled = settle(lane, [worker], result.id, key)

    # Then the waiting copy does not take the key in that gap and run the work a second time
    check_ran_once(lane, result.id, deliveries, settled)


def test_redelivered_until_done_copy_never_runs_beside_the_first(lane: Lane) -> None:
    # Given an acks_late task that holds its key from enqueue until done (the lease is owned
    # by the task id), running three times the visibility timeout
    worker = lane.worker(concurrency=3)
    cid = new_customer()
    result = lane.send(ca.late_until_done, cid, tag=lane.tag, duration=6.0)
    key = ca.late_until_done.exclusive_key([cid], {})

    # When the broker delivers it again while it runs, and everything has ended
    assert result.get(timeout=30) == cid
    deliveries, settled = settle(lane, [worker], result.id, key)
    assert deliveries >= 2, f"kombu never redelivered {result.id}: this test proves nothing"

    # Then no two copies ran at once, and the work was done once
    history = lane.history()
    check_history(history)
    check_ran_once(lane, result.id, deliveries, settled)


# -- 2. the worker dies; the message is redelivered to another worker -------------------------


def test_crashed_worker_task_is_redelivered_and_run_after_its_lease_expires(lane: Lane) -> None:
    # Given worker A running an acks_late task (lease ttl 2 s)
    worker_a = lane.worker()
    cid = new_customer()
    result = lane.send(ca.late, cid, tag=lane.tag, duration=4.0)
    key = ca.late.exclusive_key([cid], {})
    wait_until(lambda: lane.started() == [result.id], 20, "the task to start on worker A")
    [a_seen] = store_holders(key)
    a_pid = int(a_seen.meta["pid"])
    assert a_pid in {c.pid for c in worker_a.children()}

    # When worker A and its pool are SIGKILLed: nothing is released, nothing is acked
    killed_at, killed_wall = time.monotonic(), time.time()
    worker_a.kill()
    wait_dead(a_pid)
    # (A's last word in the store: it renewed for the last time at renewed_at)
    dead = [h for h in store_holders(key) if h.token == a_seen.token]
    a_expiry = dead[0].renewed_at + LATE_TTL if dead else None
    worker_b = lane.worker(concurrency=4)

    # Then the message reaches worker B, which runs it to the end: no work lost, no deadlock
    wait_until(lambda: len(lane.started()) == 2, 30, "the task to start again on worker B")
    [b_seen] = store_holders(key)
    assert result.get(timeout=30) == cid
    done_after = time.monotonic() - killed_at
    deliveries, settled = settle(lane, [worker_b], result.id, key)
    history = sorted(lane.history(), key=lambda h: h["start"])
    assert history, "nothing ran to the end"
    run_b = history[0]
    # B's grant came only after A's lease had expired in the store: no overlap
    assert a_expiry is not None, "A's lease was gone at once after the kill, yet nobody freed it"
    print(
        f"A's lease expired {a_expiry - killed_wall:.2f} s after the kill, "
        f"B granted {b_seen.acquired_at - a_expiry:+.2f} s after that, "
        f"B's body started {run_b['start'] - killed_at:.2f} s after the kill, "
        f"result after {done_after:.2f} s; {deliveries} deliveries on B"
    )
    assert b_seen.acquired_at >= a_expiry - 0.002, (
        f"B was granted the key at {b_seen.acquired_at}, before A's lease expired ({a_expiry})"
    )
    # B ran in another process, after the kill, under a new grant (a higher fence)
    assert run_b["pid"] != a_pid and b_seen.token != a_seen.token
    assert run_b["start"] >= killed_at
    assert run_b["fence"] == b_seen.fence > a_seen.fence
    # and the work was done once more, not more: A's start and B's, one completed run
    assert lane.started() == [result.id, result.id], (
        f"{len(lane.started())} starts for 1 delivery on A and {deliveries} on B "
        f"(settled: {settled}): a redelivered copy ran the work again"
    )
    assert settled
    assert len(history) == 1, history


# -- 3. the hard time limit kills the child --------------------------------------------------


def test_hard_time_limit_frees_the_key_within_ttl(lane: Lane) -> None:
    # Given a task with a 1.5 s hard time limit and a 1 s lease, running for 30 s
    worker = lane.worker()
    cid = new_customer()
    result = lane.send(ca.limited_short, cid, tag=lane.tag, duration=30.0)
    key = ca.limited_short.exclusive_key([cid], {})
    wait_until(lambda: lane.started() == [result.id], 20, "the task to start")

    # When the time limit kills it (the result turns FAILURE)
    wait_until(lambda: result.state == "FAILURE", 20, "the time limit to end the task", 0.01)
    failed_at = time.monotonic()
    held_at_failure = bool(store_holders(key))

    # Then the key is free again within ttl (+ margin) of the failure
    freed_after = wait_free(key, SHORT_TTL + MARGIN + 5) - failed_at
    assert isinstance(result.result, TimeLimitExceeded), result.result
    assert "Hard time limit (1.5s) exceeded" in worker.output()
    assert freed_after <= SHORT_TTL + MARGIN, f"key freed {freed_after:.2f} s after the failure"
    # and the next run of the same key runs (it is not skipped as "already running")
    again = lane.send(ca.limited_short, cid, tag=lane.tag, duration=0.2)
    value = again.get(timeout=20)
    assert value == cid, value
    assert lane.started() == [result.id, again.id]
    [run] = lane.history()
    assert run["id"] == again.id
    print(f"held when FAILURE was stored: {held_at_failure}; free {freed_after:.3f} s later")


# -- 4. a pool child is SIGKILLed -------------------------------------------------------------


def test_sigkilled_pool_child_frees_the_key_within_ttl(lane: Lane) -> None:
    # Given a pool child running a 30 s task under a 1 s lease
    worker = lane.worker()
    cid = new_customer()
    result = lane.send(ca.slow, cid, tag=lane.tag, duration=30.0)
    key = ca.slow.exclusive_key([cid], {})
    wait_until(lambda: lane.started() == [result.id], 20, "the task to start")
    [holder] = store_holders(key)
    child = int(holder.meta["pid"])
    assert child in {c.pid for c in worker.children()}, "the holder is not a pool child"
    # ...that keeps its lease past its ttl while it lives (renewal works)
    held_until = time.monotonic() + 1.5 * SHORT_TTL
    while time.monotonic() < held_until:
        assert [h.token for h in store_holders(key)] == [holder.token], "lease lost while held"
        time.sleep(0.05)

    # When that child is SIGKILLed: no finally, no release
    killed_at = time.monotonic()
    os.kill(child, signal.SIGKILL)

    # Then the key is free within ttl (+ margin)
    freed_after = wait_free(key, SHORT_TTL + MARGIN + 5) - killed_at
    assert freed_after <= SHORT_TTL + MARGIN, f"key freed {freed_after:.2f} s after the kill"
    # the run failed (the worker lost its child), the worker lives on
    assert isinstance(result.get(timeout=20, propagate=False), WorkerLostError)
    # and the next run of the key runs, under a higher fence
    again = lane.send(ca.slow, cid, tag=lane.tag, duration=0.2)
    assert again.get(timeout=20) == cid
    [run] = lane.history()
    assert run["id"] == again.id and run["fence"] > holder.fence
    print(f"key free {freed_after:.3f} s after SIGKILL of pool child {child}")


# -- 5. the whole worker is SIGKILLed during an until_done run --------------------------------


def test_sigkilled_worker_frees_until_done_key_within_ttl(lane: Lane) -> None:
    # Given a worker running a hold="until_done" task (ttl 1 s) for 30 s
    worker = lane.worker()
    cid = new_customer()
    result = lane.send(ca.slow_until_done, cid, tag=lane.tag, duration=30.0)
    key = ca.slow_until_done.exclusive_key([cid], {})
    wait_until(lambda: lane.started() == [result.id], 20, "the task to start")
    # (the run took the key over from the enqueue lease: held for this task, with the run's
    # ttl now, not the queue's hour)
    [holder] = store_holders(key)
    assert holder.meta["task_id"] == result.id and holder.expires_in <= SHORT_TTL + 0.1, holder
    # while it runs, a duplicate is refused at enqueue (the caller gets the running copy)
    assert lane.send(ca.slow_until_done, cid, tag=lane.tag).id == result.id

    # When the worker and its pool are SIGKILLed
    killed_at = time.monotonic()
    worker.kill()

    # Then the key is free within ttl (+ margin)
    freed_after = wait_free(key, SHORT_TTL + MARGIN + 5) - killed_at
    assert freed_after <= SHORT_TTL + MARGIN, f"key freed {freed_after:.2f} s after the kill"
    # and a new call is accepted (a new task, not the dead one) and runs on another worker
    again = lane.send(ca.slow_until_done, cid, tag=lane.tag, duration=0.2)
    assert again.id != result.id
    lane.worker()
    assert again.get(timeout=30) == cid
    [run] = lane.history()
    assert run["id"] == again.id and run["fence"] > holder.fence
    wait_free(key, 10)
    print(f"key free {freed_after:.3f} s after SIGKILL of the worker")


# -- 6. several worker processes race over bursts of duplicates -------------------------------


@pytest.mark.parametrize(
    ("workers", "concurrency", "rounds", "duplicates", "customers"),
    [
        pytest.param(2, 2, 3, 10, 3, id="2x2"),
        pytest.param(
            3,
            4,
            10,
            20,
            5,
            id="3x4-slow",
            marks=[pytest.mark.slow, pytest.mark.skipif(not SLOW, reason=SLOW_ONLY)],
        ),
    ],
)
def test_bursts_over_several_workers_never_overlap(
    lane: Lane, workers: int, concurrency: int, rounds: int, duplicates: int, customers: int
) -> None:
    # Given several prefork workers consuming one queue
    for _ in range(workers):
        lane.worker(concurrency=concurrency)
    ids = [new_customer() for _ in range(customers)]

    # When bursts of duplicates are published for a few customers
    began = time.monotonic()
    results = []
    for _ in range(rounds):
        for _ in range(duplicates):
            results += [lane.send(ca.sync_customer, c, tag=lane.tag, duration=0.1) for c in ids]
        values = wait_for(results, timeout=60)
    elapsed = time.monotonic() - began

    # Then every call either ran or was skipped, and nothing ran twice
    assert all(is_skipped(v) or isinstance(v, int) for v in values), values
    history = lane.history()
    ran = [r.id for r, v in zip(results, values, strict=True) if not is_skipped(v)]
    skipped = sum(1 for v in values if is_skipped(v))
    assert len(history) + skipped == len(results), (len(history), skipped, len(results))
    assert sorted(h["id"] for h in history) == sorted(ran)
    assert not [i for i, n in Counter(lane.started()).items() if n > 1]
    # no two runs of one key overlapped, fences rose in start order
    check_history(history)
    assert skipped > 0, "the bursts never produced a conflict"
    assert {h["key"] for h in history} == {f"sync:{c}" for c in ids}
    assert len({h["pid"] for h in history}) > 1, "only one pool process ran anything"
    wait_until(lambda: list(store_for(ca.app).leases()) == [], 10, "every lease to be freed")
    print(
        f"{len(results)} published, {len(history)} ran on {len({h['pid'] for h in history})} "
        f"processes, {skipped} skipped, {elapsed:.1f} s"
    )
