"""The Celery app of the lifecycle matrix (tests/matrix), configured from the environment.

A worker runs ``celery -A tests.matrix.app worker`` and builds the app from ``CEXM_*``
variables; the test process builds one app per group with :func:`make_app` (groups run side
by side, each on its own store and queue):

    CEXM_BROKER      broker URL (the history server, db 0)
    CEXM_RESULT      result backend URL, or empty for none
    CEXM_STORE       lease store URL (a Redis server of its own, stopped and started by faults)
    CEXM_HISTORY     where bodies record what they did (never faulted)
    CEXM_PREFIX      the store's key prefix
    CEXM_QUEUE       the queue of this group's worker
    CEXM_ACKS_LATE   "1": task_acks_late
    CEXM_VISIBILITY  the Redis transport's visibility_timeout (redelivery within seconds)

One task definition (``job``, and ``job_auto`` for ``autoretry_for``) covers every case: the
hold and the policies come per call (``apply_async(exclusive={...})``), the key is the case
id (``key=["case"]``), so cases never share keys. Each execution of a body records a ``start``
and (unless its process is killed) an ``end`` event in the list ``h:<case>`` on the history
server; ``exclusive_lost`` is recorded in the list ``lost``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded

from celery_exclusive.celery import ExclusiveTask
from celery_exclusive.celery.signals import exclusive_lost

from ..workers import redis_transport_options

#: Lease ttl of every case (renewed every ttl / 3 while a body runs).
TTL = 3.0
#: How long a gated body waits for its gate at most (a bounded loop, never forever).
GATE_MAX = 45.0
JOB = "tests.matrix.app.job"
JOB_AUTO = "tests.matrix.app.job_auto"
#: ``job`` with hold="until_done" as a task option, not per call (tests/matrix/test_found_...).
JOB_UNTIL_DONE = "tests.matrix.app.job_until_done"


def make_app(env: Mapping[str, str] | None) -> Celery:
    """A matrix app with its two tasks, pointed at the servers ``env`` names (if any)."""
    app = Celery("cex_matrix")
    if env is not None:
        _configure(app, env)
    # shared=False: a task of this app only (Celery's default adds every task to every app
    # finalized later, so one test's tasks, bad ones included, would reach all others')
    common: dict[str, Any] = {"bind": True, "base": ExclusiveTask, "shared": False,
                              "exclusive": {"key": ["case"], "ttl": TTL}}  # fmt: skip
    app.task(name=JOB, **common)(job)
    app.task(
        name=JOB_AUTO, autoretry_for=(ValueError,), max_retries=2, default_retry_delay=0.3,
        **common,
    )(job)  # fmt: skip
    app.task(name=JOB_UNTIL_DONE, bind=True, base=ExclusiveTask, shared=False,
             exclusive={"key": ["case"], "ttl": TTL, "hold": "until_done"})(job)  # fmt: skip
    return app


def _configure(app: Celery, env: Mapping[str, str]) -> None:
    transport = redis_transport_options(float(env.get("CEXM_VISIBILITY") or 0) or None)
    app.conf.update(
        broker_url=env["CEXM_BROKER"],
        result_backend=env.get("CEXM_RESULT") or None,
        exclusive_url=env["CEXM_STORE"],
        exclusive_prefix=env["CEXM_PREFIX"],
        task_default_queue=env["CEXM_QUEUE"],
        task_acks_late=env.get("CEXM_ACKS_LATE") == "1",
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        result_expires=600,
        cexm_history=env["CEXM_HISTORY"],
    )


_clients: dict[tuple[int, str], redis.Redis] = {}


def history(url: str) -> redis.Redis:
    """A client of the history server, one per process and URL."""
    key = (os.getpid(), url)
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(url, socket_timeout=10)
    return _clients[key]


def _push(client: redis.Redis, name: str, event: dict[str, Any]) -> None:
    client.rpush(name, json.dumps(event))


def job(
    self: Any, case: str, mode: str = "ok", call: str = "a", gate: bool = False, hold_s: float = 0.1
) -> str:
    """One execution: record its start, wait (for its gate, or ``hold_s``), end by ``mode``."""
    request = self.request
    lease = self.exclusive
    client = history(str(self.app.conf.cexm_history))
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    # "run" names this one execution: its start and its end carry it (in one process,
    # threads, gevent and solo run many bodies, several of one task id among them)
    common = {
        "id": request.id,
        "run": uuid.uuid4().hex,
        "call": call,
        "pid": os.getpid(),
        "retries": request.retries,
    }
    fence = lease.fence if lease is not None else None
    _push(client, f"h:{case}", {**common, "ev": "start", "t": time.monotonic_ns(),
                                "fence": fence, "redelivered": redelivered})  # fmt: skip
    status = "ok"
    try:
        deadline = time.monotonic() + (GATE_MAX if gate else hold_s)
        while time.monotonic() < deadline:  # interruptible work, bounded
            if gate and client.exists(f"gate:{case}"):
                break
            time.sleep(0.02)
        first = request.retries == 0
        if mode == "exception":
            status = "exception"
            raise ValueError(f"case {case} fails")
        if mode == "retry" and first:
            status = "retry"
            raise self.retry(countdown=0.3, max_retries=3)
        if mode == "autoretry" and first:
            status = "exception"
            raise ValueError(f"case {case} fails once (autoretry_for)")
        if mode == "ignore":
            status = "ignore"
            raise Ignore()
        if mode == "reject":
            status = "reject"
            raise Reject("matrix reject", requeue=False)
        return call
    except SoftTimeLimitExceeded:
        status = "soft"
        raise
    except (Retry, Ignore, Reject, ValueError):
        raise
    except BaseException as exc:
        status = "aborted" if "LeaseLost" in type(exc).__name__ else f"error:{type(exc).__name__}"
        raise
    finally:
        held = lease.held if lease is not None else None
        _push(client, f"h:{case}", {**common, "ev": "end", "t": time.monotonic_ns(),
                                    "status": status, "held": held})  # fmt: skip


def _record_lost(sender: Any = None, task_id: Any = None, key: Any = None, reason: Any = "",
                 **_: Any) -> None:  # fmt: skip
    url = getattr(getattr(sender, "app", None), "conf", {}).get("cexm_history")
    if not url:
        return
    try:
        event = {"task_id": task_id, "key": key, "reason": str(reason), "pid": os.getpid(),
                 "t": time.monotonic_ns()}  # fmt: skip
        _push(history(str(url)), "lost", event)
    except redis.RedisError:  # the history server is never faulted; say so if it is down
        print(f"could not record the loss of {task_id}", flush=True)


exclusive_lost.connect(_record_lost, weak=False)

app = make_app(os.environ if os.environ.get("CEXM_BROKER") else None)
