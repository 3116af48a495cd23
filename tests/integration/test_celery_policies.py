"""The policies beyond one-at-a-time, on real workers: throttle, debounce, keep-last, abort,
canvas, send_task and beat."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from celery import chord, group

from celery_exclusive import LeaseLost
from celery_exclusive.celery import is_skipped
from celery_exclusive.celery.config import store_for

from .. import celery_app as ca
from .. import celery_policies as cp
from ..history import check_history
from ..servers import wait_until
from ..workers import ROOT, Worker, wait_for
from .conftest import CeleryEnv


@pytest.fixture(scope="module")
def worker(celery_env: CeleryEnv) -> Iterator[Worker]:
    w = celery_env.worker(pool="prefork", concurrency=3).start()
    try:
        yield w
    finally:
        w.stop()


def values(tag: str) -> list[int]:
    return [int(v) for v in ca.history_client().lrange(ca.history_key(tag) + ":values", 0, -1)]


def test_period_throttles_to_one_run_per_ttl(worker: Worker, celery_env: CeleryEnv) -> None:
    tag = celery_env.tag()
    # Given five calls within the period (ttl 2 s)
    results = [cp.throttled.delay(1, tag=tag) for _ in range(5)]
    # Then they are one task, run once
    assert len({r.id for r in results}) == 1
    wait_for(results[:1])
    assert len(ca.read_history(tag)) == 1
    # and only expiry frees the key: after the period a call runs again
    key = cp.throttled.exclusive_key((1,)) + "@period"
    assert store_for(ca.app).holders(key)
    wait_until(lambda: not store_for(ca.app).holders(key), 10, "the period to pass")
    again = cp.throttled.delay(1, tag=tag)
    assert again.id != results[0].id
    wait_for([again])
    assert len(ca.read_history(tag)) == 2


def test_replace_debounces_to_the_latest_call(worker: Worker, celery_env: CeleryEnv) -> None:
    tag = celery_env.tag()
    # Given five calls inside a 2-second debounce window
    results = [
        cp.debounced.apply_async((2,), {"value": v, "tag": tag}, countdown=2) for v in range(5)
    ]
    # Then each replaced the one before: only the latest runs
    assert len({r.id for r in results}) == 5
    assert wait_for(results[-1:]) == [4]
    wait_until(lambda: all(r.state == "REVOKED" for r in results[:-1]), 15, "revocations")
    assert values(tag) == [4]


def test_keep_last_runs_one_plus_one_with_the_newest_arguments(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    tag = celery_env.tag()
    client = ca.history_client()
    # Given a run in progress
    first = cp.latest.delay(3, value=0, tag=tag, duration=1.5)
    wait_until(lambda: client.llen(ca.history_key(tag) + ":started"), 15, "the first run")
    # When 40 calls arrive from four threads while it runs
    ids: list[str] = []
    lock = threading.Lock()

    def produce(start: int) -> None:
        for v in range(start, start + 10):
            r = cp.latest.delay(3, value=v, tag=tag, duration=0.1)
            with lock:
                ids.append(r.id)

    threads = [threading.Thread(target=produce, args=(1 + 10 * i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    last = cp.latest.delay(3, value=999, tag=tag, duration=0.1)  # the newest call of all
    # Then they all became one pending task, which runs once, after the first, with 999
    assert len(set(ids) | {last.id}) == 1
    assert wait_for([first, last]) == [0, 999]
    assert values(tag) == [0, 999]
    check_history(ca.read_history(tag))
    assert not store_for(ca.app).holders(cp.latest.exclusive_key((3,)) + "@queued")


def test_abort_interrupts_a_task_whose_lease_was_lost(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    tag = celery_env.tag()
    client = ca.history_client()
    result = cp.abortable.delay(4, tag=tag, duration=20)
    wait_until(lambda: client.llen(ca.history_key(tag) + ":started"), 15, "the task to start")
    key = cp.abortable.exclusive_key((4,))
    # When an operator takes its lease away
    taken_at = time.monotonic()
    assert store_for(ca.app).force_release(key) == 1
    # Then the task fails with LeaseLost within about one renewal interval (ttl 0.9 / 3)
    error = result.get(timeout=15, propagate=False)
    elapsed = time.monotonic() - taken_at
    assert isinstance(error, LeaseLost), error
    assert "lost" in str(error) and key in str(error)
    assert elapsed < 5, elapsed
    assert client.llen(ca.history_key(tag) + ":swallowed") == 0
    assert client.llen(ca.history_key(tag) + ":finished") == 0
    # and the worker is undisturbed
    assert wait_for([ca.sync_customer.delay(400, tag=tag, duration=0.01)]) == [400]


def test_a_duplicate_inside_a_chord_never_hangs_the_body(worker: Worker) -> None:
    result = chord([cp.member.s(1), cp.member.s(1), cp.member.s(2)])(cp.total.s())
    assert sorted(result.get(timeout=30)) == [1, 1, 2]
    assert sorted(group(cp.member.s(5) for _ in range(3))().get(timeout=30)) == [5, 5, 5]


def test_send_task_by_name_is_still_protected_at_run_time(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    tag = celery_env.tag()
    name = ca.sync_customer.name
    first = ca.app.send_task(name, args=(77,), kwargs={"tag": tag, "duration": 1.0})
    wait_until(
        lambda: ca.history_client().llen(ca.history_key(tag) + ":started"), 15, "the first run"
    )
    second = ca.app.send_task(name, args=(77,), kwargs={"tag": tag, "duration": 0.01})
    got = wait_for([first, second])
    assert got[0] == 77 and is_skipped(got[1])


@pytest.mark.parametrize("hold", ["until_done", "queued_and_running"])
def test_beat_every_second_of_a_three_second_job_neither_overlaps_nor_piles_up(
    celery_env: CeleryEnv, hold: str
) -> None:
    tag = celery_env.tag()
    # A queue of its own, so that only this test's worker runs what beat sends
    env = {**celery_env.env, "CEX_BEAT_TAG": tag, "CEX_BEAT_HOLD": hold, "CEX_QUEUE": f"beat-{tag}"}
    beat_dir = ROOT / ".pytest-beat"
    beat_dir.mkdir(exist_ok=True)
    broker = redis.Redis.from_url(celery_env.env["CEX_BROKER_URL"])
    with Worker(env, pool="prefork", concurrency=2) as w:
        beat = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_app", "beat", "-l", "INFO",
             "-s", str(beat_dir / f"schedule-{tag}"), "--max-interval", "1"],
            cwd=ROOT,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            # While beat fires every second for about eight seconds
            deadline = time.monotonic() + 8
            queued: list[int] = []
            while time.monotonic() < deadline:
                queued.append(int(broker.llen(env["CEX_QUEUE"])))
                time.sleep(0.2)
        finally:
            beat.terminate()
            beat.wait(20)
        key = "tests.celery_policies.beat_job"
        store = store_for(ca.app)
        wait_until(
            lambda: store.holders(key) == [] and store.holders(key + "@queued") == [],
            20,
            "the last run (and a pending one) to finish",
        )
        history = ca.read_history(tag)
        # (a pending copy that goes back to the queue is received again under the same id)
        received = len(
            set(
                re.findall(
                    r"Task tests\.celery_policies\.beat_job\[([^\]]+)\] received", w.output()
                )
            )
        )
    # Then runs never overlapped, only one message at a time was ever queued,
    # and every published message ran (no pile-up of skipped duplicates)
    check_history(history)
    assert 2 <= len(history) <= 4, history
    assert max(queued) <= 1, queued
    assert received == len(history), (received, len(history))
