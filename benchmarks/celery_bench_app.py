"""The Celery app of ``bench_celery.py``: one task per contender, configured from the environment.

The benchmark process and its worker subprocesses (``celery -A celery_bench_app worker``, with
``benchmarks/`` on ``PYTHONPATH``) import this module and so agree on every setting:

* ``CEXB_BROKER_URL``, ``CEXB_RESULT_URL``: Celery's broker and result backend;
* ``CEXB_STORE_URL``: the locks of all three libraries (celery-exclusive's ``exclusive_url``,
  celery_once's ``ONCE`` Redis backend, celery-singleton's ``singleton_backend_url``);
* ``CEXB_PREFIX``: a per-run prefix: celery-exclusive's and celery-singleton's key prefix, and
  the name of every queue a ``delay()`` is routed to (``<prefix>.<task name>``).

The drain tasks (benchmark 1, reused for 2 and 3) return ``[argument, time.time()]``: the
argument, as a trivial body would, plus the moment the body ran, which reaches the benchmark in
the result Celery stores anyway, so measuring adds no round trip of its own. The ``slow_*``
tasks (benchmark 2's keep-last scenario) sleep and record each run in Redis lists.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import redis
from celery import Celery
from celery_once import QueueOnce
from celery_singleton import Singleton

from celery_exclusive.celery import ExclusiveTask

PREFIX = os.environ.get("CEXB_PREFIX", "cexbench")
STORE_URL = os.environ.get("CEXB_STORE_URL", "redis://127.0.0.1:6379/2")


def _route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **kw: Any) -> Any:
    """Each task's ``delay()`` goes to its own queue; an explicit ``queue=`` still wins."""
    return {"queue": f"{PREFIX}.{name}"}


app = Celery("cexbench")
app.conf.update(
    broker_url=os.environ.get("CEXB_BROKER_URL", "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get("CEXB_RESULT_URL", "redis://127.0.0.1:6379/1"),
    result_expires=3600,
    task_routes=(_route,),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_enable_remote_control=False,  # no pidbox queue: the worker consumes only ours
    # celery-exclusive
    exclusive_url=STORE_URL,
    exclusive_prefix=PREFIX,
    # celery_once
    ONCE={
        "backend": "celery_once.backends.Redis",
        "settings": {"url": STORE_URL, "default_timeout": 3600},
    },
    # celery-singleton
    singleton_backend_url=STORE_URL,
    singleton_key_prefix=f"{PREFIX}:SINGLETONLOCK_",
)


# -- benchmark 1 (and 2, 3): trivial bodies, distinct keys --------------------------------


@app.task(name="cexb.plain")
def plain(x: Any) -> list[Any]:
    return [x, time.time()]


@app.task(name="cexb.ce_running", base=ExclusiveTask, exclusive={"key": ["x"], "hold": "running"})
def ce_running(x: Any) -> list[Any]:
    return [x, time.time()]


@app.task(name="cexb.ce_queued", base=ExclusiveTask, exclusive={"key": ["x"], "hold": "queued"})
def ce_queued(x: Any) -> list[Any]:
    return [x, time.time()]


@app.task(
    name="cexb.ce_until_done", base=ExclusiveTask, exclusive={"key": ["x"], "hold": "until_done"}
)
def ce_until_done(x: Any) -> list[Any]:
    return [x, time.time()]


@app.task(name="cexb.singleton", base=Singleton)
def singleton(x: Any) -> list[Any]:
    return [x, time.time()]


@app.task(name="cexb.once", base=QueueOnce)
def once(x: Any) -> list[Any]:
    return [x, time.time()]


# -- benchmark 2: keep-last while a copy runs ---------------------------------------------

_client: redis.Redis | None = None
_client_pid = 0
_client_lock = threading.Lock()


def history() -> redis.Redis:
    """A client for the run records (one per process: a forked child makes its own)."""
    global _client, _client_pid
    with _client_lock:
        if _client is None or _client_pid != os.getpid():
            _client, _client_pid = redis.Redis.from_url(STORE_URL, socket_timeout=10), os.getpid()
        return _client


def _slow(task: Any, key: str, value: int, tag: str, duration: float) -> int:
    record = {"value": value, "task_id": task.request.id, "pid": os.getpid()}
    history().rpush(f"{tag}:started", json.dumps({**record, "t": time.time()}))
    time.sleep(duration)
    history().rpush(f"{tag}:done", json.dumps({**record, "t": time.time()}))
    return value


@app.task(
    name="cexb.slow_ce",
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["key"], "hold": "queued_and_running", "on_duplicate": "keep_last"},
)
def slow_ce(self: Any, key: str, value: int, tag: str, duration: float = 2.0) -> int:
    return _slow(self, key, value, tag, duration)


@app.task(name="cexb.slow_once", bind=True, base=QueueOnce, once={"keys": ["key"]})
def slow_once(self: Any, key: str, value: int, tag: str, duration: float = 2.0) -> int:
    return _slow(self, key, value, tag, duration)


@app.task(name="cexb.slow_singleton", bind=True, base=Singleton, unique_on=["key"])
def slow_singleton(self: Any, key: str, value: int, tag: str, duration: float = 2.0) -> int:
    return _slow(self, key, value, tag, duration)
