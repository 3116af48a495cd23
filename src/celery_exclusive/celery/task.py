"""``ExclusiveTask``: a Celery task that holds a lease while it runs, or while it is queued.

::

    @shared_task(base=ExclusiveTask, exclusive={"key": ["customer_id"], "on_conflict": "skip"})
    def sync_customer(customer_id): ...

Where the leases are taken and given back, and why there:

* **At the start of a run**, in ``__call__``: Celery's tracer calls it for every worker run and
  every eager run (``.apply()``, ``task_always_eager``). The lease is released in a ``finally``
  around the body, because Celery calls no ``after_return`` for RETRY, IGNORED and REJECTED, and
  no handler at all when the pool child is killed (then the lease expires within ``ttl``).
* **At enqueue**, in ``apply_async``: the lease is owned by the task id, so the task's own
  ``retry()`` (which publishes again with the same id) is the same owner, never a duplicate.
  Nobody can renew a lease for a message sitting in a queue, so an enqueue lease lives
  ``queue_ttl`` (default an hour) plus the countdown/ETA. The worker releases it when the task
  starts (``queued``) or ends (``until_done``), and on revoke.
* **A redelivered message** (same task id: ``acks_late`` with a Redis ``visibility_timeout``
  shorter than the task) finds the key held by its own task id. It waits for that copy to end
  (woken by the release) instead of running beside it or being skipped, and then does not run
  again if the store holds the task id's done mark, written when a copy ran to its end (with
  any outcome but a retry or a requeue; kept two visibility timeouts). After a real crash it
  waits only until the dead copy's lease expires, then runs: no work is lost and nothing
  deadlocks.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import logging
import secrets
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, NoReturn

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.utils import uuid

from ..backends.base import encode_meta
from ..exceptions import (
    AlreadyQueued,
    AlreadyRunning,
    BackendError,
    ConfigurationError,
    LeaseLost,
)
from ..keys import KeyBuilder
from ..lease import Lease
from ..options import TaskOptions
from ..releasing import get_releaser, release_later, release_soon
from ..store import Store
from . import signals
from .config import settings_for, store_for

__all__ = ["HEADER", "ExclusiveTask", "is_skipped"]

logger = logging.getLogger(__name__)

#: The message header carrying the key and per-call options to the worker (copied on retries).
HEADER = "exclusive"
QUEUED_SUFFIX = "@queued"
PERIOD_SUFFIX = "@period"


def is_skipped(result: object) -> bool:
    """Whether a task result is the record of a run skipped because the key was held."""
    return isinstance(result, Mapping) and result.get("exclusive") == "skipped"


class ExclusiveTask(Task):  # type: ignore[misc]  # Celery's Task is untyped
    """A task that runs at most ``limit`` (default 1) at a time per key.

    Options come from the ``exclusive`` task option (a dict; see
    :mod:`celery_exclusive.options`), over the app's ``exclusive_*`` settings, and may be
    overridden per call with ``apply_async(exclusive={...})``. Inside the task,
    ``self.exclusive`` is the :class:`~celery_exclusive.Lease` of the current run (or None)::

        @app.task(bind=True, base=ExclusiveTask, exclusive={"key": []})
        def nightly_sync(self):
            for batch in batches():
                self.exclusive.ensure_held()
                write(batch, fence=self.exclusive.fence)
    """

    abstract = True
    #: The options given at decoration, validated then (see ``__init_subclass__``).
    exclusive_options: Mapping[str, Any] = {}
    _exclusive_resolved: tuple[int, TaskOptions, KeyBuilder | None] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery turns task options into class attributes: take ours out of the way of the
        # ``exclusive`` property, and validate it now, at decoration, not at the first run.
        given = cls.__dict__.get("exclusive")
        if given is not None and not isinstance(given, property):
            TaskOptions.build(given)
            cls.exclusive_options = given
            delattr(cls, "exclusive")
            # Argument names are checked against the signature now, when the name is known.
            _key_builder(cls, TaskOptions.build(given).key, cls.__dict__.get("name"))
        cls._exclusive_resolved = None

    @property
    def exclusive(self) -> Lease | None:
        """The lease of the current run (None outside a protected run)."""
        return getattr(self.request, "_exclusive_lease", None)

    # -- options and keys -----------------------------------------------------------------

    def _options(self, overrides: Mapping[str, Any] | None = None) -> TaskOptions:
        resolved = self._resolve()
        return resolved[1].with_overrides(overrides)

    def _resolve(self) -> tuple[int, TaskOptions, KeyBuilder | None]:
        cached = type(self)._exclusive_resolved
        settings = settings_for(self.app)
        if cached is None or cached[0] != id(settings):
            options = TaskOptions.build(settings.task_defaults, self.exclusive_options)
            cached = (id(settings), options, _key_builder(type(self), options.key, self.name))
            type(self)._exclusive_resolved = cached
        return cached

    def exclusive_key(
        self, args: Any = None, kwargs: Any = None, overrides: Mapping[str, Any] | None = None
    ) -> str:
        """Return the lease key of a call with ``args`` and ``kwargs``."""
        _, options, builder = self._resolve()
        if overrides and "key" in overrides:
            builder = _key_builder(type(self), options.with_overrides(overrides).key, self.name)
        if builder is None:
            raise ConfigurationError(f"task {self.name!r} has no run() to build keys from")
        return builder.build(tuple(args or ()), dict(kwargs or {}))

    # -- enqueue side -----------------------------------------------------------------------

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Publish the task, taking its enqueue lease first when ``hold`` asks for one.

        ``exclusive={...}`` overrides this call's options. On a duplicate:
        ``return_existing`` returns the AsyncResult of the copy already queued or running,
        ``skip`` returns None, ``raise`` raises :class:`AlreadyQueued`. The key is computed
        before anything is published, so a bad argument fails here with nothing sent.
        """
        overrides = options.pop(HEADER, None)
        headers = dict(options.get("headers") or {})
        value = headers.get(HEADER)
        carried: Mapping[str, Any] = value if isinstance(value, Mapping) else {}
        # A retry (Celery's, or the library's own going back to the queue) continues a call
        # already accepted: it keeps that call's options, and is never dropped as a duplicate.
        again = bool(options.get("retries") or carried.get("requeued"))
        if overrides is None and again:
            overrides = carried.get("opts") or None
        if overrides is not None and callable(
            overrides.get("key") if isinstance(overrides, Mapping) else None
        ):
            raise ConfigurationError("a per-call exclusive key must be a list or a format string")
        settings = settings_for(self.app)
        if not settings.enabled:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        opts = self._options(overrides)
        key = self.exclusive_key(args, kwargs, overrides)
        headers[HEADER] = {"key": key, "opts": dict(overrides or {})}
        if carried.get("requeued"):
            headers[HEADER]["requeued"] = carried["requeued"]
        options["headers"] = headers
        if not opts.locks_at_enqueue:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )

        if _in_canvas(options, link, link_error):
            # A group, chord or chain counts on this exact message being published (a chord's
            # body waits for every header member's own result id), so de-duplication would
            # hang it. Publish; the run lease still keeps the copies from running at once.
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )

        task_id = task_id or uuid()
        meta: dict[str, Any] = {"task_id": task_id, "task_name": self.name, "state": "queued"}
        if opts.on_duplicate == "keep_last":
            meta["call"] = _call_record(self.name, args, kwargs)
        lease = store_for(self.app).lease(
            _enqueue_key(key, opts),
            token=task_id,
            ttl=opts.ttl
            if opts.hold == "period"
            else (opts.queue_ttl or settings.queue_ttl) + _delay(options),
            limit=opts.limit,
            auto_renew=False,
            meta=meta,
        )
        current = self.exclusive if getattr(self.request, "id", None) == task_id else None
        if current is not None and current.key == lease.key:
            # the retry message owns it now (the acquire below gives it the queue's ttl)
            _hand_back(current, task_id)
        if again:
            # The same owner takes the key again: a release of it still queued is void.
            get_releaser().cancel(lease.backend, lease.key, task_id)
            try:
                acquired = lease.acquire()
            except BackendError:
                logger.warning("could not renew the enqueue lease of %s for its retry", key)
                acquired = False
        else:
            try:
                acquired = lease.acquire()
            except BackendError:
                # The request may have reached the store and been granted with its reply lost:
                # free what this task id may hold once the store answers (the caller gets the
                # error and nothing is published, so nothing else would ever release it).
                release_later(lease.backend, lease.key, task_id, lease.ttl)
                raise
        if not acquired and not again:
            if opts.on_duplicate == "replace":
                acquired = self._replace(key, lease)
            elif opts.on_duplicate == "keep_last":
                existing, acquired = self._keep_last(key, lease, meta)
                if existing is not None:
                    return existing
            if not acquired:
                return self._on_duplicate(key, lease, opts)
        if not acquired:
            # Never drop a retry: it is the continuation of work already accepted.
            logger.debug("retry of %s published although %r is held", task_id, lease.key)
        try:
            return super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except BaseException:
            if acquired and not again:
                lease.release()  # nothing left behind when publishing fails
            raise

    def _replace(self, key: str, lease: Lease) -> bool:
        """Revoke the queued copy(ies) holding ``lease.key`` and take the key; return success.

        Bounded: concurrent replacers may take turns; the last one to acquire wins and the
        copies it saw are revoked.
        """
        backend = lease.backend
        for _ in range(5):
            for holder in lease.holders:
                existing = str(holder.get("task_id") or "")
                backend.force_release(lease.key, str(holder["token"]))
                if existing:
                    self.app.control.revoke(existing)
                    signals.exclusive_duplicate.send(
                        sender=self, key=key, existing_task_id=existing, action="replace"
                    )
            if lease.acquire():
                return True
        return False

    def _keep_last(self, key: str, lease: Lease, meta: dict[str, Any]) -> tuple[Any, bool]:
        """Give the pending copy this call's arguments, or become the pending copy.

        Returns (the pending copy's AsyncResult, False) when the arguments were handed to it,
        or (None, True) when this call took the pending slot itself. Each hand-over is one
        atomic update of the pending holder; if that holder started meanwhile (its slot is
        gone), this call tries to take the slot instead, so no call's arguments are lost.
        """
        for _ in range(20):
            for holder in lease.holders:
                pending = {k: v for k, v in holder.items() if k not in _HOLDER_FIELDS}
                pending["call"] = meta["call"]
                if lease.backend.update_meta(lease.key, str(holder["token"]), encode_meta(pending)):
                    existing = str(holder.get("task_id") or "")
                    signals.exclusive_duplicate.send(
                        sender=self, key=key, existing_task_id=existing, action="keep_last"
                    )
                    return self.AsyncResult(existing), False
            if lease.acquire():
                return None, True
        raise AlreadyQueued(
            f"{self.name}: could not hand the newest arguments to the pending copy of {key!r}",
            key=key,
            holder=lease.holder,
        )

    def _on_duplicate(self, key: str, lease: Lease, opts: TaskOptions) -> Any:
        holder = lease.holder or {}
        existing = str(holder.get("task_id") or "")
        signals.exclusive_duplicate.send(
            sender=self, key=key, existing_task_id=existing, action=opts.on_duplicate
        )
        logger.debug("%s: a copy is already queued (%s), %s", key, existing, opts.on_duplicate)
        if opts.on_duplicate == "raise":
            raise AlreadyQueued(
                f"{self.name} is already queued or running for {key!r} (task {existing})",
                key=key,
                holder=holder,
            )
        if opts.on_duplicate == "skip" or not existing:
            return None
        return self.AsyncResult(existing)

    # -- worker side ------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or not settings_for(self.app).enabled:
            return super().__call__(*args, **kwargs)
        header = _header(request)
        opts = self._options(header.get("opts"))
        key = header.get("key") or self.exclusive_key(args, kwargs, header.get("opts"))
        store = store_for(self.app)
        task_id = str(request.id)
        abort = _Abort()
        asked = time.monotonic()
        try:
            lease = self._take_run_lease(store, key, opts, task_id, request, abort)
        except _Skipped as skipped:
            self._release_enqueue_lease(store, key, opts, task_id)
            if skipped.ignore:
                raise Ignore() from None  # Celery stores nothing for this run
            return skipped.value
        except Retry:
            raise  # the retry is this task id again: it keeps the enqueue lease
        except BaseException:
            # No run will come of this message (a conflict that raises, retries given up, a
            # store error): its enqueue lease must not keep the key for queue_ttl.
            self._release_enqueue_lease(store, key, opts, task_id)
            raise
        waited = time.monotonic() - asked
        call = self._release_enqueue_lease(store, key, opts, task_id)
        if call is not None:  # keep_last: run with the newest arguments handed to us
            args, kwargs = tuple(call.get("args") or ()), dict(call.get("kwargs") or {})
            # ... and so does a retry(), which republishes the request's arguments
            request.args, request.kwargs = list(args), kwargs
        if lease is None:
            return super().__call__(*args, **kwargs)

        signals.exclusive_acquired.send(
            sender=self, task_id=task_id, key=key, lease=lease, waited=waited
        )
        request._exclusive_lease = lease
        retrying = ended = False
        try:
            if opts.on_lock_lost == "abort":
                abort.arm()
            try:
                result = super().__call__(*args, **kwargs)
            finally:
                abort.disarm()
            ended = True
            return result
        except _LeaseLostAbort:
            raise LeaseLost(
                f"{self.name}[{task_id}] aborted: its lease on {key!r} was lost ({abort.reason})",
                key=key,
            ) from None
        except Retry:
            retrying = True
            raise
        except Reject as exc:
            ended = not exc.requeue
            raise
        except Exception:
            ended = True  # a failure is acked like a success: a redelivery must not redo it
            raise
        finally:
            request._exclusive_lease = None
            redeliverable = (self.acks_late or request.eta) and not request.is_eager
            if ended and redeliverable:
                self._mark_done(lease, key, task_id)
            if retrying and opts.hold == "until_done":
                _hand_back(lease, task_id)  # kept for the retry (apply_async did it already)
            elif request.is_eager:
                self._release(lease, task_id, key)
            elif self.acks_late:
                # Released once Celery has stored the result and acked (task_postrun, see
                # handlers.release_after_run): a redelivered copy waiting for this release
                # then finds the done mark written above, and the result in place.
                request._exclusive_release = (lease, key)
            else:
                self._release_soon(lease, task_id, key)

    def _take_run_lease(
        self, store: Store, key: str, opts: TaskOptions, task_id: str, request: Any, abort: _Abort
    ) -> Lease | None:
        """Take the lease a run holds (None when ``hold`` has none); raise _Skipped to skip.

        Never returns or raises with the lease held, except by returning it.
        """
        if not opts.has_run_lease:
            return None
        # Each delivery is its own owner, so a redelivered copy of a running task is refused
        # rather than let in. until_done: the enqueue lease (owned by the task id) is handed
        # over to this delivery, same grant and fence, and renewed while the task runs.
        token = f"{task_id}/{secrets.token_hex(6)}"
        lease = store.lease(
            key,
            token=token,
            ttl=opts.ttl,
            limit=opts.limit,
            meta={
                "task_id": task_id,
                "task_name": self.name,
                "node": request.hostname or "",
                "state": "running",
            },
            max_hold=opts.max_hold or _time_limit(self, request),
            on_lost=lambda _lease, reason: self._lost(task_id, key, reason, abort),
        )
        try:
            waited_for_own_copy = self._acquire_for_run(lease, key, opts, task_id)
            if waited_for_own_copy or _may_have_run(request):
                self._skip_if_done(lease, key, task_id)
        except BackendError as exc:
            if lease.held:
                self._release(lease, task_id, key)
            else:
                # The acquire may have reached the store and been granted with its reply lost
                # (a store that stalled, then answered): free what this token may hold.
                release_later(lease.backend, lease.key, lease.token, lease.ttl)
            self._store_failed(key, opts, task_id, exc)
        except BaseException:
            if lease.held:
                self._release(lease, task_id, key)  # never keep a key for a run that won't come
            raise
        return lease

    def _acquire_for_run(self, lease: Lease, key: str, opts: TaskOptions, task_id: str) -> bool:
        """Take the run lease; on a conflict apply ``on_conflict`` (raise _Skipped to skip).

        Return True when the key was held by another delivery of this task id (a redelivered
        message), which this one waited for.
        """
        conflict = opts.conflict
        wait = conflict == "wait" or opts.on_duplicate == "keep_last"
        timeout = opts.wait_timeout if wait else None
        # until_done: the enqueue grant (owned by the task id) is moved to this delivery in
        # the same round trip: same grant and fence, the run's metadata, renewed while it runs.
        # (A redelivered copy finds the key held by the running copy's token and waits.)
        take_over = task_id if opts.hold == "until_done" else None
        try:
            acquired = lease.acquire(blocking=wait, timeout=timeout, take_over=take_over)
        except ConfigurationError:
            if take_over is None:
                raise
            lease.token = task_id  # a store without hand-over: one owner per task id
            acquired = lease.acquire(blocking=wait, timeout=timeout)
        if acquired:
            return False
        holder = lease.holder or {}
        if holder.get("task_id") == task_id:
            self._redelivered(lease, key, opts, task_id)
            return True
        if opts.pending_waits and not self.request.is_eager:
            # The pending copy keeps its place (its enqueue lease, and keep_last's newest
            # arguments) until the running one ends: back to the queue, as often as it takes.
            # (An eager run has no queue to go back to: it gives up as "wait" does, below.)
            signals.exclusive_conflict.send(
                sender=self, task_id=task_id, key=key, holder=holder, action="requeue"
            )
            raise self._requeue(
                min(opts.retry_countdown, opts.retry_max_countdown),
                f"pending: {key!r} is held by task {holder.get('task_id')}",
            )
        signals.exclusive_conflict.send(
            sender=self, task_id=task_id, key=key, holder=holder, action=conflict
        )
        message = (
            f"{self.name} is already running for {key!r} (held by task {holder.get('task_id')})"
        )
        if conflict == "skip":
            logger.info("%s: skipped", message)
            raise _Skipped(_skip_record(key, holder))
        if conflict == "retry":
            countdown = min(
                opts.retry_countdown * opts.retry_backoff ** (self.request.retries or 0),
                opts.retry_max_countdown,
            )
            raise self.retry(
                countdown=countdown,
                max_retries=opts.max_retries,
                exc=AlreadyRunning(message, key=key, holder=holder),
            )
        if conflict == "wait":
            message += f"; gave up after waiting {opts.wait_timeout:g} s"
        raise AlreadyRunning(message, key=key, holder=holder)

    def _redelivered(self, lease: Lease, key: str, opts: TaskOptions, task_id: str) -> None:
        """The broker delivered this task id again while a copy of it holds the key.

        Wait for that copy to end; if it runs on, go back to the queue (freeing this worker
        slot) as often as it takes: the copy that comes back checks the done mark first.
        """
        signals.exclusive_conflict.send(
            sender=self, task_id=task_id, key=key, holder=lease.holder, action="redelivered"
        )
        logger.warning(
            "%s[%s] was delivered again while a copy of it holds %r: waiting for that copy",
            self.name,
            task_id,
            key,
        )
        if not lease.acquire(blocking=True, timeout=max(opts.wait_timeout, opts.ttl * 2)):
            raise self._requeue(
                min(opts.retry_countdown, opts.retry_max_countdown),
                f"another delivery of this task id still holds {key!r}",
            )

    def _requeue(self, countdown: float, reason: str, exc: BaseException | None = None) -> Retry:
        """Publish this task id again in ``countdown`` s; return the Retry to raise.

        The library's own going back to the queue, unlimited and not counted in
        ``request.retries``: Celery's ``retry(max_retries=None)`` means the task's own limit
        (3 by default), and counting ours would spend the user's retries. The message carries
        the call's key and options, and how often it went back (``requeued`` in the header),
        which also tells the copy that comes back to check the done mark.
        """
        request = self.request
        logger.info(
            "%s[%s] back to the queue in %g s: %s", self.name, request.id, countdown, reason
        )
        header = _header(request)
        header["requeued"] = int(header.get("requeued") or 0) + 1
        headers = {**(request.headers or {}), HEADER: header}
        signature = self.signature_from_request(request, countdown=countdown, headers=headers)
        signature.apply_async()
        return Retry(reason, exc=exc, when=countdown, sig=signature)

    def _store_failed(
        self, key: str, opts: TaskOptions, task_id: str, exc: BackendError
    ) -> NoReturn:
        """The store failed as the run started: fail, or go back to the queue (on_store_error)."""
        action = opts.on_store_error
        signals.exclusive_store_error.send(
            sender=self, task_id=task_id, key=key, error=exc, action=action
        )
        if action == "fail" or self.request.is_eager:  # an eager run has no queue to go back to
            logger.error("%s[%s] could not reach the lease store: %s", self.name, task_id, exc)
            raise exc
        tries = int(_header(self.request).get("requeued") or 0)
        countdown = min(opts.retry_countdown * opts.retry_backoff**tries, opts.retry_max_countdown)
        logger.warning(
            "%s[%s] could not reach the lease store (%s): trying again in %g s",
            self.name,
            task_id,
            exc,
            countdown,
        )
        raise self._requeue(countdown, "the lease store could not be reached", exc=exc) from exc

    def _skip_if_done(self, lease: Lease, key: str, task_id: str) -> None:
        """Another copy of this task id ran to its end: release the key and skip the run.

        Known from the store's done mark (:meth:`_mark_done`), not from the result backend,
        which may be off (``ignore_result``), down, or not say SUCCESS (a failed run, or a
        ``track_started`` STARTED that a redelivered copy wrote over SUCCESS).
        """
        if not lease.backend.is_done(key, task_id):
            return
        self._release(lease, task_id, key)
        logger.warning(
            "%s[%s] was delivered again after a copy of it ran to its end: not running it again",
            self.name,
            task_id,
        )
        # Ignore: Celery stores nothing (the first copy's SUCCESS or FAILURE stays) and sends
        # no callback, chain or chord step a second time (returning a value would).
        raise _Skipped(None, ignore=True)

    def _mark_done(self, lease: Lease, key: str, task_id: str) -> None:
        """Record in the store that ``task_id`` ran to its end (read by :meth:`_skip_if_done`).

        Written before the run lease is released, so a redelivered copy waiting for that
        release finds it. Kept for two visibility timeouts (at least an hour): the longest a
        broker keeps an unacked message before it delivers it again.
        """
        options = self.app.conf.broker_transport_options or {}
        ttl = max(2 * float(options.get("visibility_timeout") or 3600), 3600.0)
        try:
            lease.backend.mark_done(key, task_id, ttl)
        except BackendError:
            logger.warning(
                "could not record that %s[%s] ended: a redelivered copy would run it again",
                self.name,
                task_id,
                exc_info=True,
            )

    def _release_enqueue_lease(
        self, store: Store, key: str, opts: TaskOptions, task_id: str
    ) -> dict[str, Any] | None:
        """Give back the enqueue lease at the start of a run; return keep_last's newest call.

        The run does not wait for the answer (keep_last does: it needs the newest arguments),
        and a release that fails is tried again in the background (see ``releasing``).
        """
        if opts.hold not in ("queued", "queued_and_running"):
            return None
        enqueue_key = _enqueue_key(key, opts)
        queue_ttl = opts.queue_ttl or settings_for(self.app).queue_ttl
        if opts.on_duplicate != "keep_last" and not self.request.is_eager:
            release_soon(store.backend, enqueue_key, task_id, queue_ttl)
            return None
        try:
            if opts.on_duplicate != "keep_last":
                store.backend.release(enqueue_key, task_id)
                return None
            taken = store.backend.take(enqueue_key, task_id)
        except BackendError:
            logger.warning(
                "could not release the enqueue lease of %s now: trying again in the background",
                key,
                exc_info=True,
            )
            release_later(store.backend, enqueue_key, task_id, queue_ttl)
            return None
        call = json.loads(taken).get("call") if taken else None
        return call if isinstance(call, dict) else None

    def _release_soon(self, lease: Lease, task_id: str, key: str) -> None:
        """The end of a worker run: send the release, and let the background thread read its
        answer (and send ``exclusive_released``): the task does not wait a round trip for it.
        Sent before Celery stores the result, so a caller that sees the result finds the key
        free (see :mod:`celery_exclusive.releasing`)."""

        def then(released: bool) -> None:
            signals.exclusive_released.send(
                sender=self, task_id=task_id, key=key, released=released, lease=lease
            )

        lease.release_soon(then)

    def _release(self, lease: Lease, task_id: str, key: str) -> None:
        try:
            released = lease.release()
        except BackendError:
            logger.warning(
                "releasing %r failed: trying again in the background", key, exc_info=True
            )
            release_later(lease.backend, lease.key, lease.token, lease.ttl)
            released = False
        signals.exclusive_released.send(
            sender=self, task_id=task_id, key=key, released=released, lease=lease
        )

    def _lost(self, task_id: str, key: str, reason: str, abort: _Abort) -> None:
        signals.exclusive_lost.send(sender=self, task_id=task_id, key=key, reason=reason)
        abort.fire(reason)


class _LeaseLostAbort(BaseException):
    """Raised asynchronously in a task's thread when its lease is lost (on_lock_lost=abort).

    A BaseException, so that a task's own ``except Exception`` does not swallow it; __call__
    turns it into a LeaseLost failure that says why.
    """


class _Abort:
    """Interrupt the thread (or greenlet) that armed it, once, while armed.

    Timeline it guards: the renewal thread finds the lease gone and fires; the task gets
    _LeaseLostAbort at its next bytecode (a thread) or its next switch (a gevent greenlet). If
    the body ended first, disarm() has already run and firing does nothing; if firing raced
    with the end of the body, disarm() takes back the exception still pending, so it never
    escapes into Celery's own code. Under gevent (its monkey-patched threads are greenlets,
    which ``PyThreadState_SetAsyncExc`` cannot reach) the greenlet is sent the exception
    through the hub.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._greenlet: Any = None
        self._pending: Any = None  # the hub callback that will throw into the greenlet
        self._fired = False
        self.reason = ""

    def arm(self) -> None:
        with self._lock:
            self._thread = threading.get_ident()
            self._greenlet = _current_greenlet()

    def disarm(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            pending, self._pending = self._pending, None
            if thread is None or not self._fired:
                return
            if pending is not None:
                pending.stop()
            elif self._greenlet is None:
                _set_async_exc(thread, None)

    def fire(self, reason: str) -> None:
        with self._lock:
            if self._thread is None or self._fired:
                return
            self._fired = True
            self.reason = reason
            if self._greenlet is not None:
                self._pending = _throw_later(self._greenlet, _LeaseLostAbort)
                return
            changed = _set_async_exc(self._thread, _LeaseLostAbort)
        if changed != 1:
            logger.error(
                "could not interrupt the task whose lease was lost (%s): thread %s not found",
                reason,
                self._thread,
            )


def _set_async_exc(thread: int, exc: type[BaseException] | None) -> int:
    """``PyThreadState_SetAsyncExc``: 1 when done; more than 1 (never expected) is undone."""
    obj = ctypes.py_object(exc) if exc is not None else None
    changed = int(ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), obj))
    if changed > 1:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), None)
    return changed


def _current_greenlet() -> Any:
    """The running gevent greenlet when threads are gevent's (the gevent pool), else None."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return None
    import gevent

    return gevent.getcurrent()


def _throw_later(greenlet: Any, exc: type[BaseException]) -> Any:
    """Have the gevent hub throw ``exc`` into ``greenlet``; return the cancellable callback."""
    import gevent

    loop = gevent.get_hub().loop
    schedule = getattr(loop, "run_callback_threadsafe", loop.run_callback)
    return schedule(greenlet.throw, exc)


class _Skipped(Exception):
    """Internal: end the run now with ``value`` as its result (``ignore``: store none)."""

    def __init__(self, value: Any, *, ignore: bool = False) -> None:
        super().__init__(value)
        self.value = value
        self.ignore = ignore


def _skip_record(
    key: str, holder: Mapping[str, Any], reason: str = "already running"
) -> dict[str, Any]:
    return {
        "exclusive": "skipped",
        "reason": reason,
        "key": key,
        "holder_task_id": holder.get("task_id"),
        "holder": {k: v for k, v in holder.items() if k != "token"},
    }


def _hand_back(lease: Lease, task_id: str) -> None:
    """until_done retry: give the run's grant back to the task id (the retry message)."""
    if lease.token != task_id:
        queued = encode_meta({**lease.meta, "state": "queued"})
        try:
            lease.backend.hand_over(lease.key, lease.token, task_id, lease.ttl, meta=queued)
        except (ConfigurationError, BackendError):
            logger.warning("could not keep %r for the retry", lease.key, exc_info=True)
    lease.detach()


def _enqueue_key(key: str, opts: TaskOptions) -> str:
    # until_done: one lease from enqueue to the end of the run, on the plain key.
    if opts.hold == "until_done":
        return key
    return key + (PERIOD_SUFFIX if opts.hold == "period" else QUEUED_SUFFIX)


def _in_canvas(options: Mapping[str, Any], link: Any, link_error: Any) -> bool:
    return bool(
        options.get("group_id")
        or options.get("chord")
        or options.get("chain")
        or link
        or link_error
    )


#: Fields of a holder listing that are not the holder's own metadata.
_HOLDER_FIELDS = frozenset({"token", "fence", "expires_in", "acquired_at", "renewed_at"})


def _call_record(name: str, args: Any, kwargs: Any) -> dict[str, Any]:
    """The arguments keep_last hands to the pending copy, checked to survive JSON."""
    call = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    try:
        json.dumps(call)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"{name}: on_duplicate='keep_last' keeps the newest arguments in the store as JSON, "
            f"and these are not JSON: {exc}"
        ) from exc
    return call


def _header(request: Any) -> dict[str, Any]:
    """A copy of this library's message header (key, per-call options, ``requeued``)."""
    value = (getattr(request, "headers", None) or {}).get(HEADER)
    if value is None:
        value = getattr(request, HEADER, None)
    return dict(value) if isinstance(value, dict) else {}


def _may_have_run(request: Any) -> bool:
    """Whether another copy of this task id may have run to its end before this one.

    A redelivered message, a retry, the library's own requeue; and any message with an ETA or
    countdown: the worker holds it unacked until it is due, so the broker may have handed it
    to another worker too after ``visibility_timeout`` (not always flagged as redelivered).
    """
    redelivered = (getattr(request, "delivery_info", None) or {}).get("redelivered")
    return bool(redelivered or request.retries or request.eta or _header(request).get("requeued"))


def _delay(options: Mapping[str, Any]) -> float:
    countdown = options.get("countdown")
    if countdown:
        return max(float(countdown), 0.0)
    eta = options.get("eta")
    if isinstance(eta, datetime):
        now = datetime.now(eta.tzinfo or timezone.utc) if eta.tzinfo else datetime.now()
        return max((eta - now).total_seconds(), 0.0)
    return 0.0


def _time_limit(task: Any, request: Any) -> float | None:
    limits = getattr(request, "timelimit", None) or (None, None)
    hard = limits[0] if limits and limits[0] else getattr(task, "time_limit", None)
    if hard is None:
        hard = task.app.conf.get("task_time_limit")
    return float(hard) if hard else None


_builders: dict[tuple[type, str, Any], KeyBuilder] = {}
_builders_lock = threading.Lock()


def _key_builder(cls: type, spec: Any, name: str | None) -> KeyBuilder | None:
    """Return the (cached) key builder of task class ``cls``; None before it has a name."""
    run = inspect.getattr_static(cls, "run", None)
    if run is None or not name:
        return None
    hashable = spec if isinstance(spec, (str, type(None))) or callable(spec) else tuple(spec)
    cache_key = (cls, name, hashable)
    with _builders_lock:
        builder = _builders.get(cache_key)
        if builder is None:
            if isinstance(run, staticmethod):
                func, bound = run.__func__, False
            else:
                func, bound = run, True
            builder = KeyBuilder(name, func, spec, skip_first=bound)
            _builders[cache_key] = builder
        return builder
