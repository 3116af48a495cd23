"""A Celery app for the worker start-up checks, configured from the environment.

``CEX_BROKER_URL``, ``CEX_RESULT_URL``, ``CEX_STORE_URL``, ``CEX_PREFIX``, ``CEX_QUEUE`` as in
:mod:`tests.celery_app`, and ``CEX_STARTUP_CONF``: a JSON object of extra ``app.conf`` settings
(the bad value under test). ``CEX_STARTUP_TASK_OPTIONS``: a JSON object of the ``exclusive``
options of the ``configured`` task.
"""

from __future__ import annotations

import json
import os

from celery import Celery

from celery_exclusive.celery import ExclusiveTask, exclusive

app = Celery("cex_startup")
app.conf.update(
    broker_url=os.environ.get("CEX_BROKER_URL", "redis://127.0.0.1:1/0"),
    result_backend=os.environ.get("CEX_RESULT_URL", "redis://127.0.0.1:1/1"),
    exclusive_url=os.environ.get("CEX_STORE_URL"),
    exclusive_prefix=os.environ.get("CEX_PREFIX", "exclusive"),
    task_default_queue=os.environ.get("CEX_QUEUE", "celery"),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)
app.conf.update(json.loads(os.environ.get("CEX_STARTUP_CONF") or "{}"))


@app.task(base=ExclusiveTask, exclusive={"key": ["n"]})
def keyed(n: int) -> int:
    return n


@app.task(
    base=ExclusiveTask,
    exclusive=json.loads(os.environ.get("CEX_STARTUP_TASK_OPTIONS") or '{"key": []}'),
)
def configured() -> str:
    return "done"


@exclusive(key=["n"])
@app.task
def decorated(n: int) -> int:
    return n
