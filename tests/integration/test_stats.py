"""``stats`` (script and ``celery -A app exclusive stats``) on leases a real worker holds."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from celery_exclusive import connect
from celery_exclusive.cli import main
from celery_exclusive.stats import NO_TASK

from .. import metrics_app as ma
from ..servers import wait_until
from ..workers import ROOT, Worker, shown_if_failed, wait_for
from .conftest import CeleryEnv


def stats(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["stats", *argv], out=out)
    return code, out.getvalue()


def by_task(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["task"]: row for row in report["tasks"]}


@pytest.fixture
def worker(request: pytest.FixtureRequest, celery_env: CeleryEnv) -> Iterator[Worker]:
    env = {
        **celery_env.env,
        "CEX_PREFIX": f"{celery_env.env['CEX_PREFIX']}-{celery_env.tag()}",
        "CEX_QUEUE": f"q-{celery_env.tag()}",
    }
    ma.configure(env)
    worker = Worker(env, pool="threads", concurrency=2, app="tests.metrics_app").start()
    try:
        with shown_if_failed(request, worker):
            yield worker
    finally:
        worker.stop()


def test_stats_of_a_real_worker(worker: Worker) -> None:
    url, prefix = worker.env["CEX_STORE_URL"], worker.env["CEX_PREFIX"]
    where = ("--url", url, "--prefix", prefix)
    store = connect(url, prefix=prefix)
    # Given a key this test holds, and a run of the worker waiting for it
    blocker = store.lease(ma.waiter.exclusive_key(), ttl=30)
    assert blocker.acquire()
    waiting = ma.waiter.delay()
    # and a run of the worker holding its own lease
    holding = ma.holder.delay(20)
    wait_until(lambda: store.backend.waiting([blocker.key]) == [True], 20, "the run to wait")
    wait_until(lambda: store.holders(ma.holder.name), 20, "the run to hold its lease")

    # When stats are asked for, as JSON
    code, text = stats(*where, "--json")

    # Then they show the store healthy, its round trip, and the leases per task
    assert code == 0, text
    report = json.loads(text)
    assert report["healthy"] is True and report["error"] is None
    assert 0 < report["latency_ms"] <= report["latency_median_ms"]
    tasks = by_task(report)
    assert tasks[ma.holder.name] | {"oldest_hold": 0} == {
        "task": ma.holder.name,
        "held": 1,
        "running": 1,
        "queued": 0,
        "oldest_hold": 0,
        "keys_waited_on": 0,
        "lost": 0,
        "last_lost_at": None,
    }
    assert tasks[NO_TASK]["held"] == 1 and tasks[NO_TASK]["keys_waited_on"] == 1
    assert report["totals"] == {"held": 2, "running": 1, "queued": 0}
    # and as a table
    code, text = stats(*where)
    assert code == 0
    assert "health   ok" in text and "latency" in text and ma.holder.name in text

    # When the holder's lease is released by force, the worker counts the loss in the store
    assert store.force_release(ma.holder.name) == 1
    assert "no longer had it" in wait_for([holding])[0]

    def lost() -> int:
        return int(by_task(json.loads(stats(*where, "--json")[1]))[ma.holder.name]["lost"])

    wait_until(lambda: lost() == 1, 10, "the loss to be counted in the store")

    # and ``celery -A app exclusive stats`` reads the same store
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.metrics_app", "exclusive", "stats", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **worker.env, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    tasks = by_task(json.loads(result.stdout))
    assert tasks[ma.holder.name]["lost"] == 1 and tasks[ma.holder.name]["held"] == 0
    assert tasks[NO_TASK]["keys_waited_on"] == 1
    blocker.release()
    assert wait_for([waiting]) == ["ran"]
    store.close()


def test_an_unreachable_store_is_reported_with_exit_code_1() -> None:
    code, text = stats("--url", "redis://127.0.0.1:1/0", "--json")
    assert code == 1
    report = json.loads(text)
    assert report["healthy"] is False and "127.0.0.1:1" in report["error"]
    code, text = stats("--url", "redis://127.0.0.1:1/0")
    assert code == 1 and "UNREACHABLE" in text
