"""Celery signals for observability: connect to them like to any Celery signal.

Every signal is sent with the task as ``sender`` and keyword arguments::

    exclusive_acquired   task_id, key, lease, waited   a run took its lease (waited: seconds
                                                        from asking for it to holding it)
    exclusive_conflict   task_id, key, holder, action  a run found the key held (action:
                                                        skip, raise, retry, wait, redelivered,
                                                        requeue: a pending copy goes back)
    exclusive_duplicate  key, existing_task_id, action  apply_async found a copy queued
    exclusive_lost       task_id, key, reason           a running task's lease was lost
    exclusive_released   task_id, key, released, lease  a run gave its lease back (on a
                                                        worker: sent from the background
                                                        thread that reads the store's answer)
    exclusive_store_error  task_id, key, error, action  the store failed as a run started
                                                        (action: retry or fail)

::

    from celery_exclusive.celery.signals import exclusive_lost

    @exclusive_lost.connect
    def alert(sender, task_id, key, reason, **kwargs):
        ...
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "exclusive_acquired",
    "exclusive_conflict",
    "exclusive_duplicate",
    "exclusive_lost",
    "exclusive_released",
    "exclusive_store_error",
]

exclusive_acquired = Signal(
    name="exclusive_acquired", providing_args={"task_id", "key", "lease", "waited"}
)
exclusive_conflict = Signal(
    name="exclusive_conflict", providing_args={"task_id", "key", "holder", "action"}
)
exclusive_duplicate = Signal(
    name="exclusive_duplicate", providing_args={"key", "existing_task_id", "action"}
)
exclusive_lost = Signal(name="exclusive_lost", providing_args={"task_id", "key", "reason"})
exclusive_released = Signal(
    name="exclusive_released", providing_args={"task_id", "key", "released", "lease"}
)
exclusive_store_error = Signal(
    name="exclusive_store_error", providing_args={"task_id", "key", "error", "action"}
)
