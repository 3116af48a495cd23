"""The Celery app the integration tests run on real workers.

Configured from the environment, so that the test process and the worker subprocesses agree:
``CEX_BROKER_URL``, ``CEX_RESULT_URL``, ``CEX_STORE_URL``, ``CEX_PREFIX`` (store key prefix),
``CEX_QUEUE``, ``CEX_VISIBILITY`` (Redis visibility timeout, for redelivery tests).

Every task records each execution (task id, key, start, end, fence, pid) in a Redis list named
by its ``tag`` argument, for :func:`tests.history.check_history`.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject

from celery_exclusive import Lease
from celery_exclusive.celery import ExclusiveTask, exclusive

from .workers import redis_transport_options

app = Celery("cex_tests", include=["tests.celery_policies", "tests.celery_corners"])


def configure(
    broker: str,
    result: str,
    store: str,
    prefix: str,
    queue: str,
    visibility: float | None = None,
    *,
    target: Celery = app,
) -> None:
    """Point the app (or ``target``) at its servers (the test process calls it; workers read
    the environment)."""
    from celery_exclusive.celery.config import reset

    transport = redis_transport_options(visibility)
    target.conf.update(
        broker_url=broker,
        result_backend=result,
        exclusive_url=store,
        exclusive_prefix=prefix,
        task_default_queue=queue,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        task_track_started=True,
        result_expires=600,
    )
    reset(target)
    # The app caches its broker pool and result backend: drop them, so a test module that
    # points the app at its own private server never talks to a previous module's server.
    target._after_fork()
    target._backend_cache = None
    target._local = threading.local()


def configure_from(env: Mapping[str, str], *, target: Celery = app) -> None:
    """Point the app (or ``target``) at the servers named by a worker environment (see
    tests.workers)."""
    configure(
        env["CEX_BROKER_URL"],
        env["CEX_RESULT_URL"],
        env["CEX_STORE_URL"],
        env["CEX_PREFIX"],
        env["CEX_QUEUE"],
        float(env.get("CEX_VISIBILITY") or 0) or None,
        target=target,
    )


if os.environ.get("CEX_BROKER_URL"):
    configure_from(os.environ)

if os.environ.get("CEX_BEAT_TAG"):
    # celery beat fires beat_job every second; the job takes three (see the policy tests).
    app.conf.beat_schedule = {
        "beat-job-every-second": {
            "task": "tests.celery_policies.beat_job",
            "schedule": 1.0,
            "kwargs": {"tag": os.environ["CEX_BEAT_TAG"], "duration": 3.0},
            "options": {"exclusive": {"hold": os.environ.get("CEX_BEAT_HOLD") or "until_done"}},
        }
    }

_history: dict[tuple[int, str], redis.Redis] = {}


def history_client() -> redis.Redis:
    """A client of the store's Redis, per process and URL (test modules use their own)."""
    key = (os.getpid(), str(app.conf.exclusive_url))
    if key not in _history:
        _history[key] = redis.Redis.from_url(key[1], socket_timeout=10)
    return _history[key]


def history_key(tag: str) -> str:
    return f"{app.conf.exclusive_prefix}:history:{tag}"


def read_history(tag: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in history_client().lrange(history_key(tag), 0, -1)]


def record(task: Any, key: str, tag: str, duration: float) -> int | None:
    """Record one execution of ``task`` that works for ``duration`` seconds."""
    lease: Lease | None = task.exclusive
    fence = lease.fence if lease else None
    entry: dict[str, Any] = {
        "id": task.request.id,
        "key": key,
        "fence": fence,
        "pid": os.getpid(),
        "retries": task.request.retries,
        "start": time.monotonic_ns() / 1e9,
    }
    client = history_client()
    client.rpush(history_key(tag) + ":started", task.request.id)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:  # the "work": interruptible, bounded
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
    entry["end"] = time.monotonic_ns() / 1e9
    client.rpush(history_key(tag), json.dumps(entry))
    return fence


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["customer_id"]})
def sync_customer(self: Any, customer_id: int, tag: str = "", duration: float = 0.2) -> int:
    record(self, f"sync:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["customer_id"], "on_conflict": "wait", "wait_timeout": 60},
)
def sync_wait(self: Any, customer_id: int, tag: str = "", duration: float = 0.2) -> int:
    record(self, f"wait:{customer_id}", tag, duration)
    return customer_id


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": [], "on_conflict": "raise"})
def report_raise(self: Any, tag: str = "", duration: float = 0.5) -> str:
    record(self, "report", tag, duration)
    return "done"


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={
        "key": [],
        "on_conflict": "retry",
        "retry_countdown": 0.3,
        "retry_backoff": 1,
        "max_retries": 50,
    },
)
def report_retry(self: Any, tag: str = "", duration: float = 0.5) -> str:
    record(self, "report-retry", tag, duration)
    return "done"


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["customer_id"], "hold": "queued"})
def import_queued(self: Any, customer_id: int, tag: str = "", duration: float = 0.1) -> int:
    record(self, f"import:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["customer_id"], "hold": "queued_and_running", "on_conflict": "wait"},
)
def import_both(self: Any, customer_id: int, tag: str = "", duration: float = 0.3) -> int:
    record(self, f"both:{customer_id}", tag, duration)
    return customer_id


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["customer_id"], "hold": "until_done"})
def flaky(self: Any, customer_id: int, tag: str = "", fail_times: int = 2) -> int:
    record(self, f"flaky:{customer_id}", tag, 0.05)
    retries: int = self.request.retries
    if retries < fail_times:
        raise self.retry(countdown=0.2, max_retries=5)
    return retries


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def ignored(self: Any, n: int) -> None:
    raise Ignore()


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def rejected(self: Any, n: int) -> None:
    raise Reject("no thanks", requeue=False)


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def failing(self: Any, n: int) -> None:
    raise ValueError(f"failing {n}")


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["n"]},
    autoretry_for=(ValueError,),
    max_retries=2,
    default_retry_delay=0.1,
)
def autoretried(self: Any, n: int) -> None:
    raise ValueError(f"autoretried {n}")


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["customer_id"], "ttl": 1.0})
def slow(self: Any, customer_id: int, tag: str = "", duration: float = 30.0) -> int:
    record(self, f"slow:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["customer_id"], "hold": "until_done", "ttl": 1.0},
)
def slow_until_done(self: Any, customer_id: int, tag: str = "", duration: float = 30.0) -> int:
    record(self, f"slowud:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    acks_late=True,
    exclusive={"key": ["customer_id"], "ttl": 2.0, "wait_timeout": 60},
)
def late(self: Any, customer_id: int, tag: str = "", duration: float = 6.0) -> int:
    record(self, f"late:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    acks_late=True,
    ignore_result=True,
    exclusive={"key": ["customer_id"], "ttl": 2.0, "wait_timeout": 60},
)
def late_quiet(self: Any, customer_id: int, tag: str = "", duration: float = 6.0) -> int:
    """``late`` with ``ignore_result``: the result backend never says SUCCESS."""
    record(self, f"late-quiet:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    acks_late=True,
    exclusive={"key": ["customer_id"], "ttl": 2.0, "wait_timeout": 60},
)
def late_failing(self: Any, customer_id: int, tag: str = "", duration: float = 6.0) -> int:
    """``late`` that fails at its end (Celery acks a failure): the result says FAILURE."""
    record(self, f"late-failing:{customer_id}", tag, duration)
    raise RuntimeError(f"customer {customer_id} failed at the end")


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["customer_id"]}, time_limit=1.5)
def limited(self: Any, customer_id: int, tag: str = "", duration: float = 30.0) -> int:
    record(self, f"limited:{customer_id}", tag, duration)
    return customer_id


@exclusive(key=["customer_id"])
@app.task(bind=True)
def decorated(self: Any, customer_id: int, tag: str = "", duration: float = 0.2) -> int:
    record(self, f"decorated:{customer_id}", tag, duration)
    return customer_id


# -- Recording variants of the error-path tasks (tests/integration/test_celery_lifecycle.py):
# each records its run (so a test can see that it started and ran) before it ends the run.


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def ignored_recorded(self: Any, n: int, tag: str = "") -> None:
    record(self, f"ignored:{n}", tag, 0.05)
    raise Ignore()


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def rejected_recorded(self: Any, n: int, tag: str = "") -> None:
    record(self, f"rejected:{n}", tag, 0.05)
    raise Reject("no thanks", requeue=False)


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def failing_recorded(self: Any, n: int, tag: str = "") -> None:
    record(self, f"failing:{n}", tag, 0.05)
    raise ValueError(f"failing {n}")


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["n"]},
    autoretry_for=(ValueError,),
    max_retries=2,
    default_retry_delay=0.1,
)
def autoretried_recorded(self: Any, n: int, tag: str = "") -> None:
    record(self, f"autoretried:{n}", tag, 0.05)
    raise ValueError(f"autoretried {n}")


# -- Fault-test variants (tests/faults/test_celery_faults.py): short leases, so that a killed
# run's lease expires within a second.


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["customer_id"], "ttl": 1.0},
    time_limit=1.5,
)
def limited_short(self: Any, customer_id: int, tag: str = "", duration: float = 30.0) -> int:
    record(self, f"limited-short:{customer_id}", tag, duration)
    return customer_id


@app.task(
    bind=True,
    base=ExclusiveTask,
    acks_late=True,
    exclusive={"key": ["customer_id"], "ttl": 2.0, "wait_timeout": 60},
)
def late_slow_store(self: Any, customer_id: int, tag: str = "", duration: float = 4.0) -> int:
    """``late``, with a result backend that takes 0.5 s to store the result (see below)."""
    record(self, f"late-slow-store:{customer_id}", tag, duration)
    return customer_id


def _slow_result_store(sender: Any = None, **_: Any) -> None:
    # Runs in the pool child right after the run released its lease, before Celery stores the
    # result: stands for a slow or distant result backend (0.5 s to write SUCCESS).
    if getattr(sender, "name", None) == late_slow_store.name:
        time.sleep(0.5)


def _connect_slow_result_store() -> None:
    from celery_exclusive.celery.signals import exclusive_released

    exclusive_released.connect(_slow_result_store, weak=False)


_connect_slow_result_store()


@app.task(
    bind=True,
    base=ExclusiveTask,
    acks_late=True,
    # ttl 5 s: a pool child stalled for 2 s on a loaded CI box (both its renewal threads
    # silent) let a 2 s lease expire under the running body, the documented pause-past-ttl case
    exclusive={"key": ["customer_id"], "hold": "until_done", "ttl": 5.0, "wait_timeout": 60},
)
def late_until_done(self: Any, customer_id: int, tag: str = "", duration: float = 6.0) -> int:
    record(self, f"late-until-done:{customer_id}", tag, duration)
    return customer_id
