"""The demo's Celery app: ``sync_customer``, one run at a time per customer, no pile-up.

Workers load it with ``celery -A celery_exclusive.demo.tasks worker``; the URL of the Redis that
serves as broker, result backend and lock store comes from ``CELERY_EXCLUSIVE_DEMO_URL``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from celery import Celery, signals

from ..celery import ExclusiveTask

URL = os.environ.get("CELERY_EXCLUSIVE_DEMO_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("CELERY_EXCLUSIVE_DEMO_PREFIX", "exclusive-demo")
#: Short, so that a killed worker's lease frees within seconds in the demo (default: 30 s).
TTL = 3.0

app = Celery("demo", broker=URL, backend=URL)
app.conf.update(
    exclusive_url=URL,
    exclusive_prefix=PREFIX,
    task_acks_late=True,  # a killed worker's task goes back to the queue...
    broker_transport_options={  # ...within seconds, not the default hour
        "visibility_timeout": 6,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        # A worker killed inside its restore scan leaves kombu's mutex held this long (kombu's
        # default: 300 s, while nothing is restored); the scan itself takes milliseconds.
        "unacked_mutex_expire": 2,
    },
    task_default_queue=f"{PREFIX}-queue",
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    # No remote control: its pidbox queues and bindings would stay behind on a user's Redis. The
    # demo learns that a worker is ready from the ``worker_ready`` signal below instead.
    worker_enable_remote_control=False,
    broker_connection_retry_on_startup=True,
)


def _events() -> Any:
    import redis

    return redis.Redis.from_url(URL)


def _say_ready(sender: Any = None, **kwargs: Any) -> None:
    _events().rpush(f"{PREFIX}:ready", sender.hostname)


signals.worker_ready.connect(_say_ready)


def _sync_customer(self: Any, customer_id: int, seconds: float = 1.0) -> int:
    """Pretend to sync one customer's data for ``seconds``."""
    lease = self.exclusive
    events = _events()
    record = {
        "id": self.request.id,
        "key": f"customer:{customer_id}",
        "worker": f"{self.request.hostname}/{os.getpid()}",
        "fence": lease.fence if lease else None,
        "start": time.time(),
    }
    events.rpush(f"{PREFIX}:started", json.dumps(record))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    record["end"] = time.time()
    events.rpush(f"{PREFIX}:finished", json.dumps(record))
    return customer_id


sync_customer: Any = app.task(
    _sync_customer,
    name="celery_exclusive.demo.tasks.sync_customer",
    bind=True,
    base=ExclusiveTask,
    exclusive={
        "key": ["customer_id"],
        "hold": "queued_and_running",  # at most one queued and one running per customer
        "on_conflict": "skip",
        "ttl": TTL,
    },
)

HOST = socket.gethostname()
