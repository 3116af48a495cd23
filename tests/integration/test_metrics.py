"""Prometheus metrics scraped from a real worker's port after real tasks ran on a real Redis.

Prefork with two children (the counts are made in the children, served by the main process
through prometheus_client's multiprocess mode), and the threads pool (one process).
"""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_exclusive import connect
from celery_exclusive.store import Store

from .. import metrics_app as ma
from ..servers import free_port, wait_until
from ..workers import Worker, shown_if_failed, wait_for
from .conftest import CeleryEnv

N_RUNS, M_SKIPPED, K_DUPLICATES = 5, 3, 4


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the endpoint, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module", params=["prefork", "threads"])
def metrics_worker(
    request: pytest.FixtureRequest, celery_env: CeleryEnv
) -> Iterator[tuple[Worker, int, Store]]:
    port = free_port()
    env = {
        **celery_env.env,
        "CEX_METRICS_PORT": str(port),
        "CEX_PREFIX": f"{celery_env.env['CEX_PREFIX']}-{celery_env.tag()}",
        "CEX_QUEUE": f"q-{celery_env.tag()}",
    }
    ma.configure(env)
    worker = Worker(env, pool=request.param, concurrency=2, app="tests.metrics_app").start()
    store = connect(env["CEX_STORE_URL"], prefix=env["CEX_PREFIX"])
    try:
        yield worker, port, store
    finally:
        worker.stop()
        store.close()


def test_counts_equal_what_the_tasks_did(
    request: pytest.FixtureRequest, metrics_worker: tuple[Worker, int, Store]
) -> None:
    worker, port, store = metrics_worker
    with shown_if_failed(request, worker):
        # Given N runs of free keys
        assert wait_for([ma.work.delay(n) for n in range(N_RUNS)]) == list(range(N_RUNS))
        # and M runs of a key this test holds: each finds it held and is skipped
        held = store.lease(ma.work.exclusive_key((99,)), ttl=30)
        assert held.acquire()
        skipped = wait_for([ma.work.delay(99) for _ in range(M_SKIPPED)])
        held.release()
        assert all(v["exclusive"] == "skipped" for v in skipped), skipped
        # and a task in the worker that calls a throttled task K + 1 times: K duplicates
        assert wait_for([ma.enqueue_throttled.delay(K_DUPLICATES + 1)]) == [1]
        # and a run that waits for a key this test holds, until the test releases it
        blocker = store.lease(ma.waiter.exclusive_key(), ttl=30)
        assert blocker.acquire()
        waiting = ma.waiter.delay()
        wait_until(lambda: store.backend.waiting([blocker.key]) == [True], 20, "the run to wait")
        blocker.release()
        assert wait_for([waiting]) == ["ran"]
        # and a run whose lease is released by force while it holds it
        lost = ma.holder.delay(20)
        key = ma.holder.exclusive_key((20,))
        wait_until(lambda: store.holders(key), 20, "the holder to hold its lease")
        wait_until(
            lambda: value(scrape(port), "celery_exclusive_held_leases", task=ma.holder.name) == 1,
            10,
            "the gauge to show the held lease",
        )
        assert store.force_release(key) == 1
        assert "no longer had it" in wait_for([lost])[0]

        # When the worker's endpoint is scraped, once every run's release was answered (a
        # worker reads a release's answer after the run: see releasing)
        def answered() -> bool:
            now = scrape(port)
            total = value(
                now, "celery_exclusive_releases_total", task=ma.holder.name, released="false"
            )
            done = value(now, "celery_exclusive_releases_total", task=ma.work.name, released="true")
            return total == 1 and done == N_RUNS

        wait_until(answered, 10, "every release to be answered")
        samples = scrape(port)

        # Then every count is what the tasks did
        def count(name: str, task: str, **labels: str) -> float:
            return value(samples, name, task=task, **labels)

        work, waiter, holder = ma.work.name, ma.waiter.name, ma.holder.name
        assert count("celery_exclusive_acquisitions_total", work) == N_RUNS
        assert count("celery_exclusive_releases_total", work, released="true") == N_RUNS
        assert count("celery_exclusive_conflicts_total", work, action="skip") == M_SKIPPED
        assert (
            count("celery_exclusive_duplicates_total", ma.throttled.name, action="skip")
            == K_DUPLICATES
        )
        assert count("celery_exclusive_lost_total", holder, reason="refused") == 1
        assert count("celery_exclusive_releases_total", holder, released="false") == 1
        assert count("celery_exclusive_acquisitions_total", waiter) == 1
        assert count("celery_exclusive_wait_seconds_count", waiter) == 1
        assert count("celery_exclusive_wait_seconds_count", work) == 0  # no run of it waited
        assert count("celery_exclusive_hold_seconds_count", work) == N_RUNS
        assert count("celery_exclusive_hold_seconds_count", holder) == 1
        # and no run holds a lease any more
        for task in (work, waiter, holder):
            assert count("celery_exclusive_held_leases", task) == 0
        # and no key appears in any label
        assert not any("99" in v or ":" in v for _, labels in samples for _, v in labels), (
            "a lease key leaked into a label"
        )


@pytest.mark.parametrize("port", ["nope", "70000"])
def test_a_bad_metrics_port_stops_the_worker(celery_env: CeleryEnv, port: str) -> None:
    env = {**celery_env.env, "CEX_STARTUP_CONF": json.dumps({"exclusive_metrics_port": port})}
    worker = Worker(env, app="tests.startup_app", concurrency=1).launch()
    try:
        assert worker.exit_code(60) == 1
        assert "exclusive_metrics_port must be a port number" in worker.output()
    finally:
        worker.kill()


def test_a_port_in_use_stops_the_worker(celery_env: CeleryEnv) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        conf = {
            "exclusive_metrics_port": taken.getsockname()[1],
            "exclusive_metrics_addr": "127.0.0.1",
        }
        env = {**celery_env.env, "CEX_STARTUP_CONF": json.dumps(conf)}
        worker = Worker(env, app="tests.startup_app", concurrency=1).launch()
        try:
            assert worker.exit_code(60) == 1
            assert "celery-exclusive metrics:" in worker.output()
        finally:
            worker.kill()
