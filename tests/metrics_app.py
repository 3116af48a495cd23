"""A Celery app for the metrics and stats tests, configured from the environment.

``CEX_BROKER_URL``, ``CEX_RESULT_URL``, ``CEX_STORE_URL``, ``CEX_PREFIX``, ``CEX_QUEUE`` as in
:mod:`tests.celery_app`, and ``CEX_METRICS_PORT``: the worker's ``exclusive_metrics_port``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from celery import Celery

from celery_exclusive.celery import ExclusiveTask

app = Celery("cex_metrics", set_as_current=False)


def configure(env: Mapping[str, str]) -> None:
    """Point the app at the servers of a worker environment (the test process calls it)."""
    from celery_exclusive.celery.config import reset

    app.conf.update(
        broker_url=env.get("CEX_BROKER_URL", "redis://127.0.0.1:1/0"),
        result_backend=env.get("CEX_RESULT_URL", "redis://127.0.0.1:1/1"),
        exclusive_url=env.get("CEX_STORE_URL"),
        exclusive_prefix=env.get("CEX_PREFIX", "exclusive"),
        exclusive_metrics_port=env.get("CEX_METRICS_PORT") or None,
        exclusive_metrics_addr="127.0.0.1",
        task_default_queue=env.get("CEX_QUEUE", "celery"),
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
    )
    reset(app)
    # The app caches its broker pool and result backend: drop them, so a test module that
    # points the app at its own private server never talks to a previous module's server.
    app._after_fork()
    app._backend_cache = None
    app._local = threading.local()


configure(os.environ)


@app.task(base=ExclusiveTask, exclusive={"key": ["n"]}, shared=False)
def work(n: int) -> int:
    """One run per key at a time; a second one is skipped."""
    return n


@app.task(
    base=ExclusiveTask,
    exclusive={"key": [], "on_conflict": "wait", "wait_timeout": 30},
    shared=False,
)
def waiter() -> str:
    """Waits for the key when it is held."""
    return "ran"


@app.task(
    base=ExclusiveTask,
    exclusive={"key": [], "hold": "period", "ttl": 60, "on_duplicate": "skip"},
    shared=False,
)
def throttled() -> str:
    """At most one enqueued per minute: the others are duplicates, skipped."""
    return "ran"


@app.task(shared=False)
def enqueue_throttled(times: int) -> int:
    """Call ``throttled.delay()`` ``times`` times from the worker; return how many published."""
    return sum(throttled.delay() is not None for _ in range(times))


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": [], "ttl": 1.5}, shared=False)
def holder(self: Any, timeout: float) -> str:
    """Hold the key until the lease is lost (or ``timeout``): then say why."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded; a check every 20 ms, not a wait on a result
        if not self.exclusive.held:
            return str(self.exclusive.lost_reason)
        time.sleep(0.02)
    return "still held"
