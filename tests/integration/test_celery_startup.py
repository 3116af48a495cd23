"""A bad configuration stops a real ``celery worker`` at start, with a message naming the setting.

Celery reads ``app.conf`` lazily: without a check at start, a worker with ``exclusive_ttl = -1``
or a typo'd store URL says "ready" and then fails every protected task. Each test starts a
worker of :mod:`tests.startup_app` on this module's private Redis with one bad value, and waits
(with a deadline) for it to exit by itself.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ..workers import Worker
from .conftest import CeleryEnv

pytestmark = pytest.mark.timeout(180)


def worker(celery_env: CeleryEnv, conf: dict[str, Any], task: Any = None) -> Worker:
    env = {**celery_env.env, "CEX_STARTUP_CONF": json.dumps(conf)}
    if task is not None:
        env["CEX_STARTUP_TASK_OPTIONS"] = json.dumps(task)
    return Worker(env, app="tests.startup_app", concurrency=1)


def refused(w: Worker) -> str:
    """Launch ``w``; return its log once it has exited with a failure status, never ready."""
    try:
        w.launch()
        code = w.exit_code(timeout=60)
    finally:
        w.stop()
    log = w.output()
    assert code != 0, log
    assert " ready." not in log, log
    return log


@pytest.mark.parametrize(
    ("conf", "words"),
    [
        ({"exclusive_url": "reddis://127.0.0.1:6379/2"}, ["exclusive_url", "reddis"]),
        (  # every problem at once
            {"exclusive_url": "reddis://127.0.0.1:6379/2", "exclusive_ttl": -1},
            ["exclusive_url", "reddis", "exclusive_ttl"],
        ),
        ({"exclusive_url": "redis://127.0.0.1:6379/abc"}, ["exclusive_url", "db"]),
        ({"exclusive_ttl": -1}, ["exclusive_ttl", "ttl must be seconds > 0"]),
        ({"exclusive_on_conflict": "wiat"}, ["exclusive_on_conflict", "wiat"]),
        ({"exclusive_defaults": {"ttl": "soon"}}, ["exclusive_defaults", "ttl"]),
        # A default that only a task's own options can judge: every task keeps hold="running".
        ({"exclusive_on_duplicate": "replace"}, ["task 'tests.startup_app.keyed'", "replace"]),
    ],
)
def test_a_bad_setting_stops_the_worker(
    celery_env: CeleryEnv, conf: dict[str, Any], words: list[str]
) -> None:
    log = refused(worker(celery_env, conf))
    assert "celery-exclusive is misconfigured" in log, log
    for word in words:
        assert word in log, log


def test_a_key_the_app_default_gives_a_task_is_checked(celery_env: CeleryEnv) -> None:
    # exclusive_key names an argument that the task without a key of its own does not have.
    log = refused(worker(celery_env, {"exclusive_key": ["customer_id"]}, task={}))
    assert "tests.startup_app.configured" in log and "customer_id" in log, log


def test_a_good_configuration_starts(celery_env: CeleryEnv) -> None:
    with worker(celery_env, {"exclusive_ttl": "30", "exclusive_on_conflict": "wait"}) as w:
        assert " ready." in w.output()
    assert "misconfigured" not in w.output()
