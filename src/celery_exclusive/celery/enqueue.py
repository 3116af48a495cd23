"""The enqueue side of :class:`~celery_exclusive.celery.ExclusiveTask`: ``apply_async``.

Where a hold asks for one, a call takes its enqueue lease before it is published, owned by
its task id, so the task's own ``retry()`` (which publishes again with the same id) is the
same owner, never a duplicate. Nobody can renew a lease for a message sitting in a queue, so
an enqueue lease lives ``queue_ttl`` (default an hour) plus the countdown/ETA. A call that
finds the key held meets ``on_duplicate`` (:func:`apply` and the policies below).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery.utils import uuid

from ..backends.base import Backend, encode_meta
from ..exceptions import AlreadyQueued, BackendError, ConfigurationError
from ..lease import Lease
from ..options import TaskOptions
from ..releasing import get_releaser, release_later
from ..store import Store
from . import signals
from .config import settings_for, store_for
from .keying import call_options
from .message import HEADER, call_record, delay, enqueue_key, in_canvas

__all__ = ["Call", "apply", "hand_back"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Call:
    """One ``apply_async`` call, with the arguments Celery's ``Task.apply_async`` takes."""

    args: Any
    kwargs: Any
    task_id: str | None
    producer: Any
    link: Any
    link_error: Any
    shadow: str | None
    options: dict[str, Any]


#: Publishes a call (Celery's own ``apply_async``); returns its AsyncResult.
Publish = Callable[[Call], Any]


def apply(task: Any, call: Call, publish: Publish) -> Any:
    """Publish ``call`` of ``task``, taking its enqueue lease first when ``hold`` asks for one.

    Returns what ``publish`` returns, or on a duplicate what ``on_duplicate`` says (the
    existing copy's AsyncResult, None, or :class:`AlreadyQueued` raised). The key is computed
    before anything is published, so a bad argument fails here with nothing sent.
    """
    overrides = call.options.pop(HEADER, None)
    headers = dict(call.options.get("headers") or {})
    value = headers.get(HEADER)
    carried: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
    # A retry (Celery's, or the library's own going back to the queue) continues a call
    # already accepted: it keeps that call's options, and is never dropped as a duplicate.
    again = bool(call.options.get("retries") or carried.get("requeued"))
    if overrides is None and again:
        overrides = carried.get("opts") or None
    if overrides is not None and callable(
        overrides.get("key") if isinstance(overrides, Mapping) else None
    ):
        raise ConfigurationError("a per-call exclusive key must be a list or a format string")
    settings = settings_for(task.app)
    if not settings.enabled:
        return publish(call)
    opts = call_options(task, overrides)
    key = task.exclusive_key(call.args, call.kwargs, overrides)
    header: dict[str, Any] = {"key": key, "opts": dict(overrides or {})}
    if carried.get("requeued"):
        header["requeued"] = carried["requeued"]
    call.options["headers"] = {**headers, HEADER: header}
    if not opts.locks_at_enqueue or in_canvas(call.options, call.link, call.link_error):
        # In a group, chord or chain, Celery counts on this exact message being published (a
        # chord's body waits for every header member's own result id), so de-duplication
        # would hang it. Publish; the run lease still keeps the copies from running at once.
        return publish(call)
    queue_ttl = opts.queue_ttl or settings.queue_ttl
    return _Enqueue(task, store_for(task.app), key, opts, again).run(call, queue_ttl, publish)


@dataclass(slots=True)
class _Enqueue:
    """One call that takes an enqueue lease."""

    task: Any
    store: Store
    key: str
    opts: TaskOptions
    again: bool  # a retry or a requeue of a call already accepted

    def run(self, call: Call, queue_ttl: float, publish: Publish) -> Any:
        """Take the enqueue lease (or meet ``on_duplicate``), then publish."""
        task, opts = self.task, self.opts
        task_id = call.task_id = call.task_id or uuid()
        meta: dict[str, Any] = {"task_id": task_id, "task_name": task.name, "state": "queued"}
        if opts.on_duplicate == "keep_last":
            meta["call"] = call_record(task.name, call.args, call.kwargs)
        ttl = opts.ttl if opts.hold == "period" else queue_ttl + delay(call.options)
        lease = self.store.lease(
            enqueue_key(self.key, opts),
            token=task_id,
            ttl=ttl,
            limit=opts.limit,
            auto_renew=False,
            meta=meta,
        )
        current = task.exclusive if getattr(task.request, "id", None) == task_id else None
        if current is not None and current.key == lease.key:
            # the retry message owns it now (the acquire below gives it the queue's ttl)
            hand_back(current, self.store.backend, task_id)
        acquired = self._acquire(lease)
        if not acquired and not self.again:
            if opts.on_duplicate == "replace":
                acquired = self._replace(lease)
            elif opts.on_duplicate == "keep_last":
                existing, acquired = self._keep_last(lease, meta["call"])
                if existing is not None:
                    return existing
            if not acquired:
                return self._duplicate(lease)
        if not acquired:
            # Never drop a retry: it is the continuation of work already accepted.
            logger.debug("retry of %s published although %r is held", task_id, lease.key)
        try:
            return publish(call)
        except BaseException:
            if acquired and not self.again:
                lease.release()  # nothing left behind when publishing fails
            raise

    def _acquire(self, lease: Lease) -> bool:
        backend = self.store.backend
        if self.again:
            # The same owner takes the key again: a release of it still queued is void.
            get_releaser().cancel(backend, lease.key, lease.token)
            try:
                return lease.acquire()
            except BackendError:
                logger.warning("could not renew the enqueue lease of %s for its retry", self.key)
                return False
        try:
            return lease.acquire()
        except BackendError:
            # The request may have reached the store and been granted with its reply lost:
            # free what this task id may hold once the store answers (the caller gets the
            # error and nothing is published, so nothing else would ever release it).
            release_later(backend, lease.key, lease.token, lease.ttl)
            raise

    def _replace(self, lease: Lease) -> bool:
        """Revoke the queued copy(ies) holding ``lease.key`` and take the key; return success.

        Bounded: concurrent replacers may take turns; the last one to acquire wins and the
        copies it saw are revoked.
        """
        for _ in range(5):
            for holder in lease.holders:
                existing = str(holder.meta.get("task_id") or "")
                self.store.backend.force_release(lease.key, holder.token)
                if existing:
                    self.task.app.control.revoke(existing)
                    self._signal(existing, "replace")
            if lease.acquire():
                return True
        return False

    def _keep_last(self, lease: Lease, newest: dict[str, Any]) -> tuple[Any, bool]:
        """Give the pending copy this call's arguments, or become the pending copy.

        Returns (the pending copy's AsyncResult, False) when the arguments were handed to it,
        or (None, True) when this call took the pending slot itself. Each hand-over is one
        atomic update of the pending holder; if that holder started meanwhile (its slot is
        gone), this call tries to take the slot instead, so no call's arguments are lost.
        """
        for _ in range(20):
            for holder in lease.holders:
                pending = encode_meta({**holder.meta, "call": newest})
                if self.store.backend.update_meta(lease.key, holder.token, pending):
                    existing = str(holder.meta.get("task_id") or "")
                    self._signal(existing, "keep_last")
                    return self.task.AsyncResult(existing), False
            if lease.acquire():
                return None, True
        last = lease.holder
        raise AlreadyQueued(
            f"{self.task.name}: could not hand the newest arguments to the pending copy of "
            f"{self.key!r}",
            key=self.key,
            holder=last.as_dict() if last is not None else None,
        )

    def _duplicate(self, lease: Lease) -> Any:
        """``on_duplicate`` (``return_existing``, ``skip`` or ``raise``) for a refused call."""
        holder = lease.holder
        shown = holder.as_dict() if holder is not None else {}
        existing = str(shown.get("task_id") or "")
        action = self.opts.on_duplicate
        self._signal(existing, action)
        logger.debug("%s: a copy is already queued (%s), %s", self.key, existing, action)
        if action == "raise":
            raise AlreadyQueued(
                f"{self.task.name} is already queued or running for {self.key!r} (task {existing})",
                key=self.key,
                holder=shown,
            )
        if action == "skip" or not existing:
            return None
        return self.task.AsyncResult(existing)

    def _signal(self, existing: str, action: str) -> None:
        signals.exclusive_duplicate.send(
            sender=self.task, key=self.key, existing_task_id=existing, action=action
        )


def hand_back(lease: Lease, backend: Backend, task_id: str) -> None:
    """until_done retry: give the run's grant back to the task id (the retry message)."""
    if lease.token != task_id:
        queued = encode_meta({**lease.meta, "state": "queued"})
        try:
            backend.hand_over(lease.key, lease.token, task_id, lease.ttl, meta=queued)
        except (ConfigurationError, BackendError):
            logger.warning("could not keep %r for the retry", lease.key, exc_info=True)
    lease.detach()
