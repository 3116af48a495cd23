"""Worker-side signal handlers, connected when :mod:`celery_exclusive.celery` is imported.

``task_revoked`` fires in the main worker process when a worker meets a revoked message (or
terminates a running task): the enqueue lease of the task is released there, and a run lease
that a terminated child could not release is released by its task id. A revoked message that
no worker ever pulls keeps its enqueue lease until ``queue_ttl`` runs out (Celery sends nothing
for it).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from ..exceptions import ExclusiveError
from .config import store_for
from .task import ExclusiveTask, _enqueue_key, _header

logger = logging.getLogger(__name__)


def release_on_revoke(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Free the leases of a revoked task."""
    if not isinstance(sender, ExclusiveTask) or request is None:
        return
    task_id = str(getattr(request, "id", "") or "")
    header = _header(request)
    try:
        opts = sender._options(header.get("opts"))
        key = header.get("key") or sender.exclusive_key(
            getattr(request, "args", None), getattr(request, "kwargs", None), header.get("opts")
        )
        backend = store_for(sender.app).backend
        if opts.locks_at_enqueue:
            backend.release(_enqueue_key(key, opts), task_id)
        if opts.hold in ("running", "queued_and_running", "until_done"):
            for holder in backend.holders(key):
                if holder.meta.get("task_id") == task_id:
                    backend.release(key, holder.token)
    except ExclusiveError:
        logger.warning("could not release the leases of revoked task %s", task_id, exc_info=True)


def release_after_run(sender: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
    """Release the run lease of an acks_late task once Celery has stored its result."""
    if not isinstance(task, ExclusiveTask):
        return
    request = task.request
    pending = getattr(request, "_exclusive_release", None)
    if pending is not None:
        request._exclusive_release = None
        lease, key = pending
        task._release(lease, str(task_id), key)


signals.task_revoked.connect(release_on_revoke, weak=False)
signals.task_postrun.connect(release_after_run, weak=False)
