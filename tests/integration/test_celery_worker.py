"""ExclusiveTask on real worker processes: the common path and its lifecycle corners."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from celery_exclusive.celery import is_skipped
from celery_exclusive.celery.config import store_for

from .. import celery_app as ca
from ..conftest import unavailable
from ..history import check_history
from ..servers import wait_until
from ..workers import Worker, wait_for
from .conftest import CeleryEnv


@pytest.fixture(scope="module", params=["prefork", "threads", "solo", "gevent"])
def worker(request: pytest.FixtureRequest, celery_env: CeleryEnv) -> Iterator[Worker]:
    if request.param == "gevent" and importlib.util.find_spec("gevent") is None:
        unavailable("no gevent to test the gevent pool: pip install gevent (in the test extra)")
    concurrency = 1 if request.param == "solo" else 4
    w = celery_env.worker(pool=request.param, concurrency=concurrency).start()
    try:
        yield w
    finally:
        w.stop()
        if request.node.session.testsfailed:
            print(w.output()[-5000:])


def store_free(key: str) -> bool:
    return ca.app and store_for(ca.app).holders(key) == []


def test_bursts_of_duplicates_never_overlap(worker: Worker, celery_env: CeleryEnv) -> None:
    # Given bursts of duplicate calls for one customer mixed with other customers
    tag = celery_env.tag()
    results = []
    for _ in range(3):
        results += [ca.sync_customer.delay(42, tag=tag, duration=0.1) for _ in range(8)]
        results += [ca.sync_customer.delay(c, tag=tag, duration=0.05) for c in (1, 2, 3)]
    # When they have all finished
    values = wait_for(results)
    # Then every run either ran or says it was skipped (no hang, no failure)
    assert all(is_skipped(v) or isinstance(v, int) for v in values), values
    history = ca.read_history(tag)
    ran = [v for v in values if not is_skipped(v)]
    assert len(history) == len(ran)
    # and no two runs of one key overlapped, with fences rising in start order
    check_history(history)
    if worker.concurrency > 1:
        assert any(is_skipped(v) for v in values), "the burst never produced a conflict"
    for key in ("sync:42", "sync:1"):
        assert any(h["key"] == key for h in history)
    # and no lease is left behind
    wait_until(lambda: list(store_for(ca.app).leases()) == [], 10, "every lease to be released")


def test_a_call_made_after_the_result_finds_the_key_free(
    worker: Worker, celery_env: CeleryEnv
) -> None:
    # The worker does not wait for the release's answer, but sends the release before Celery
    # stores the result: a caller that has seen the result and calls again is never skipped.
    tag = celery_env.tag()
    for i in range(15):
        first = ca.sync_customer.delay(77, tag=tag, duration=0)
        assert not is_skipped(wait_for([first])[0])
        again = ca.sync_customer.delay(77, tag=tag, duration=0)
        assert not is_skipped(wait_for([again])[0]), f"skipped after the result, round {i}"
    # A worker of one process runs calls queued back to back one after the other: the next
    # run's acquire waits for the previous run's release still on its way, never skipped.
    if worker.concurrency == 1:
        queued = [ca.sync_customer.delay(78, tag=tag, duration=0) for _ in range(20)]
        assert not any(is_skipped(v) for v in wait_for(queued))
    check_history(ca.read_history(tag))
