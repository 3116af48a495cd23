"""Worker-side signal handlers, connected when :mod:`celery_exclusive.celery` is imported.

``task_revoked`` fires in the main worker process when a worker meets a revoked message (or
terminates a running task): the enqueue lease of the task is released there, and the run lease
that a terminated child could not release is released (that child's own, found by its pid).

A message with an ETA or countdown sits in the memory of the worker that fetched it until it is
due, and Celery sends ``task_revoked`` for it only then: its enqueue lease would keep the key
until the ETA. So the worker's ``revoke`` remote-control command is wrapped (once, at
``worker_init``): after Celery's own revoke, the leases of the revoked tasks this worker holds
scheduled are released at once. A revoked message that no worker has fetched keeps its enqueue
lease until ``queue_ttl`` runs out (Celery sends nothing for it).

A lost lease is counted in the store, per task, for the ``stats`` command (best effort, from a
background thread: see :mod:`celery_exclusive.stats`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from .. import stats
from ..exceptions import ExclusiveError
from ..releasing import get_releaser
from . import signals as exclusive_signals
from .config import store_for
from .keying import call_options
from .message import enqueue_key, read_header
from .run import pending_release
from .task import ExclusiveTask

logger = logging.getLogger(__name__)


def release_on_revoke(
    sender: Any = None, request: Any = None, terminated: bool = False, **_: Any
) -> None:
    """Free the leases of a revoked task.

    Its enqueue lease, always. A run lease only when Celery terminated the run, and only the
    one that run held: under ``acks_late`` one task id may have two deliveries in the pool (a
    redelivered copy waiting for the running one), Celery terminates one of them, and the
    other's lease must stay, or a duplicate could start beside a body that still runs.
    """
    if not isinstance(sender, ExclusiveTask) or request is None:
        return
    task_id = str(getattr(request, "id", "") or "")
    header = read_header(request)
    try:
        opts = call_options(sender, header.get("opts"))
        key = header.get("key") or sender.exclusive_key(
            getattr(request, "args", None), getattr(request, "kwargs", None), header.get("opts")
        )
        backend = store_for(sender.app).backend
        if opts.locks_at_enqueue:
            backend.release(enqueue_key(key, opts), task_id)
        pid = _terminated_pid(task_id) if terminated else None
        if pid is not None and opts.has_run_lease:
            for holder in backend.holders(key):
                meta = holder.meta
                if meta.get("task_id") == task_id and meta.get("pid") == pid:
                    backend.release(key, holder.token)
    except ExclusiveError:
        logger.warning("could not release the leases of revoked task %s", task_id, exc_info=True)


def _terminated_pid(task_id: str) -> int | None:
    """The pool process of the delivery Celery is terminating (None when unknown).

    ``task_revoked`` is sent from ``Request.terminate``, while the worker still lists that
    request under its id.
    """
    from celery.worker import state as worker_state

    pid = getattr(worker_state.requests.get(task_id), "worker_pid", None)
    return pid if isinstance(pid, int) else None


def release_after_run(sender: Any = None, task_id: Any = None, task: Any = None, **_: Any) -> None:
    """Release the run lease of an acks_late task once Celery has stored its result."""
    if not isinstance(task, ExclusiveTask):
        return
    run = pending_release(task.request)
    if run is not None:
        run.release_soon()


def release_scheduled_on_revoke(**_: Any) -> None:
    """Wrap the worker's ``revoke`` command to free the leases of scheduled (ETA) tasks."""
    from celery.utils.functional import maybe_list
    from celery.worker import control
    from celery.worker import state as worker_state

    original = control.Panel.data.get("revoke")
    if original is None or getattr(original, "celery_exclusive", False):
        return

    def revoke(state: Any, task_id: Any, *args: Any, **kwargs: Any) -> Any:
        reply = original(state, task_id, *args, **kwargs)
        ids = set(maybe_list(task_id) or [])
        for scheduled in tuple(worker_state.scheduled_requests):
            if scheduled.id in ids:
                release_on_revoke(sender=scheduled.task, request=scheduled._context)
        return reply

    revoke.celery_exclusive = True  # type: ignore[attr-defined]
    revoke.__doc__ = original.__doc__
    control.Panel.data["revoke"] = revoke


def count_lost(sender: Any = None, **_: Any) -> None:
    """``exclusive_lost``: count the loss in the store, for ``stats`` (never blocks)."""
    if not isinstance(sender, ExclusiveTask):
        return
    try:
        backend = store_for(sender.app).backend
    except ExclusiveError:
        return
    stats.record_lost(backend, sender.name)


def flush_releases(**_: Any) -> None:
    """At a worker (or pool child) shutdown, try once more every release that failed (and
    send the lost-lease counts still queued)."""
    get_releaser().flush()


signals.task_revoked.connect(release_on_revoke, weak=False)
signals.worker_init.connect(release_scheduled_on_revoke, weak=False)
signals.worker_process_shutdown.connect(flush_releases, weak=False)
signals.worker_shutdown.connect(flush_releases, weak=False)
signals.task_postrun.connect(release_after_run, weak=False)
exclusive_signals.exclusive_lost.connect(count_lost, weak=False)
