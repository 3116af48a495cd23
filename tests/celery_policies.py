"""Tasks for the policy tests (throttle, debounce, keep-last, abort, canvas, beat).

Imported by the worker through the app's ``include``; separate from celery_app.py so that the
two files can grow independently.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery_exclusive.celery import ExclusiveTask

from .celery_app import app, history_client, history_key, record


@app.task(bind=True, base=ExclusiveTask, exclusive={"key": ["n"], "hold": "period", "ttl": 2.0})
def throttled(self: Any, n: int, tag: str = "") -> int:
    record(self, f"throttled:{n}", tag, 0.01)
    return n


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["n"], "hold": "queued", "on_duplicate": "replace"},
)
def debounced(self: Any, n: int, value: int = 0, tag: str = "") -> int:
    record(self, f"debounced:{n}", tag, 0.01)
    history_client().rpush(history_key(tag) + ":values", value)
    return value


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={
        "key": ["n"],
        "hold": "queued_and_running",
        "on_duplicate": "keep_last",
        "wait_timeout": 60,
    },
)
def latest(self: Any, n: int, value: int = 0, tag: str = "", duration: float = 0.5) -> int:
    record(self, f"latest:{n}", tag, duration)
    history_client().rpush(history_key(tag) + ":values", value)
    return value


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["n"], "ttl": 0.9, "on_lock_lost": "abort"},
)
def abortable(self: Any, n: int, tag: str = "", duration: float = 20.0) -> str:
    client = history_client()
    client.rpush(history_key(tag) + ":started", f"{self.request.id}:{os.getpid()}")
    deadline = time.monotonic() + duration
    try:
        while time.monotonic() < deadline:  # pure Python work: interruptible
            time.sleep(0.01)
    except Exception:  # a task's own broad except must not swallow the abort
        client.rpush(history_key(tag) + ":swallowed", self.request.id)
        raise
    client.rpush(history_key(tag) + ":finished", self.request.id)
    return "finished"


@app.task(base=ExclusiveTask, exclusive={"key": ["n"], "hold": "queued"})
def member(n: int) -> int:
    time.sleep(0.2)
    return n


@app.task
def total(results: list[Any]) -> list[Any]:
    return results


@app.task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": [], "hold": "until_done", "ttl": 5.0},
)
def beat_job(self: Any, tag: str = "", duration: float = 3.0) -> str:
    record(self, "beat-job", tag, duration)
    return "ok"
