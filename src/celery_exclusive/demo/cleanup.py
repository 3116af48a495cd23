"""Leave a user's Redis as the demos found it: every key they wrote, and nothing else.

``celery-exclusive demo --redis URL`` runs on someone's own server, maybe beside their own
Celery. The demos write under a prefix of their own (lease hashes with their fence counters, which
would otherwise live seven days, done marks, the event lists they read back), the results of
their tasks and a queue of their own with its kombu bindings. Each of those is removed by name or
by that prefix, never by a pattern that could match a key of the user's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..keys import glob_escape

__all__ = ["remove_prefixed", "remove_queue"]


def remove_prefixed(client: Any, prefix: str) -> int:
    """Delete every key that starts with ``prefix + ":"``; return how many were deleted."""
    pattern = glob_escape(prefix) + ":*"
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=500):
        batch.append(key)
        if len(batch) == 500:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    return deleted


def remove_queue(app: Any, name: str, results: Iterable[Any] = ()) -> None:
    """Delete the Celery queue ``name`` with its bindings, and forget ``results``."""
    for result in results:
        result.forget()
    with app.connection_for_write() as conn:
        # Declared then deleted through kombu, so that the transport removes its own binding
        # records (their key names are kombu's business, not ours).
        queue = app.amqp.queues[name].bind(conn.default_channel)
        queue.declare()
        queue.delete()
