"""Tasks for the corner-case tests (tests/integration/test_celery_corners.py).

These record their runs on the *result backend's* Redis, not the store's: the corner tests
pause the store to see what a store outage does, and a run must still be recorded then.
Imported by the worker through the app's ``include``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import redis

from celery_exclusive.celery import ExclusiveTask

from .celery_app import app

_clients: dict[tuple[int, str], redis.Redis] = {}


def notes() -> redis.Redis:
    """A client of the result backend's Redis (per process and URL)."""
    key = (os.getpid(), str(app.conf.result_backend))
    if key not in _clients:
        _clients[key] = redis.Redis.from_url(key[1], socket_timeout=10)
    return _clients[key]


def note_key(tag: str, what: str) -> str:
    return f"corners:{tag}:{what}"


def runs(tag: str) -> list[dict[str, Any]]:
    """The recorded runs of ``tag`` (see :func:`_run`), in the order they ended."""
    return [json.loads(x) for x in notes().lrange(note_key(tag, "runs"), 0, -1)]


def _run(task: Any, key: str, tag: str, duration: float, **extra: Any) -> dict[str, Any]:
    """Record one execution of ``task`` that works for ``duration`` seconds."""
    lease = task.exclusive
    entry: dict[str, Any] = {
        "id": task.request.id,
        "key": key,
        "fence": lease.fence if lease else 0,
        "retries": task.request.retries,
        "start": time.monotonic_ns() / 1e9,
        **extra,
    }
    notes().rpush(note_key(tag, "started"), task.request.id)
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:  # the "work": interruptible, bounded
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
    entry["end"] = time.monotonic_ns() / 1e9
    notes().rpush(note_key(tag, "runs"), json.dumps(entry))
    return entry


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"]})
def corner(
    self: Any, n: int, tag: str = "", duration: float = 0.0, retry_once: bool = False
) -> int:
    """A plain protected task; per-call ``exclusive={...}`` options choose the policy."""
    if retry_once and not self.request.retries:
        notes().rpush(note_key(tag, "retried"), self.request.id)
        raise self.retry(countdown=0.2, max_retries=3)
    _run(self, f"corner:{n}", tag, duration)
    return n


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"], "hold": "queued_and_running"})
def one_plus_one(self: Any, n: int, tag: str = "", duration: float = 0.0) -> int:
    """``queued_and_running`` with its default conflict policy."""
    _run(self, f"one_plus_one:{n}", tag, duration)
    return n


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={
        "key": ["n"],
        "hold": "queued_and_running",
        "on_duplicate": "keep_last",
        # short waits: the pending copy goes back to the queue many times while one runs
        "wait_timeout": 0.5,
        "retry_countdown": 0.2,
    },
)
def newest(
    self: Any, n: int, value: int = 0, tag: str = "", duration: float = 0.0, retry: bool = False
) -> int:
    """keep_last: runs with the newest arguments; ``retry`` retries once before working."""
    if retry and not self.request.retries:
        raise self.retry(countdown=0.1, max_retries=3)
    _run(self, f"newest:{n}", tag, duration, value=value)
    return value


@app.task(
    bind=True,
    base=ExclusiveTask,
    acks_late=True,
    exclusive={"key": ["n"], "ttl": 1.0, "wait_timeout": 0.5, "retry_countdown": 0.2},
)
def late_short_wait(self: Any, n: int, tag: str = "", duration: float = 0.0) -> int:
    """acks_late, and a redelivered copy that gives up waiting quickly (and often)."""
    _run(self, f"late_short_wait:{n}", tag, duration)
    return n
