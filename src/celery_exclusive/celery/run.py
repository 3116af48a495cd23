"""The worker side of :class:`~celery_exclusive.celery.ExclusiveTask`: one run of a task.

The run lease is taken in ``ExclusiveTask.__call__`` (Celery's tracer calls it for every
worker run and every eager run) and released in a ``finally`` around the body, because Celery
calls no ``after_return`` for RETRY, IGNORED and REJECTED, and no handler at all when the pool
child is killed (then the lease expires within ``ttl``). The enqueue lease of the call is
given back as the run starts (``queued``) or ends (``until_done``).

A redelivered message (same task id: ``acks_late`` with a Redis ``visibility_timeout`` shorter
than the task) finds the key held by its own task id. It waits for that copy to end (woken by
the release) instead of running beside it or being skipped, and then does not run again if
the store holds the task id's done mark, written when a copy ran to its end (with any outcome
but a retry or a requeue; kept two visibility timeouts). After a real crash it waits only
until the dead copy's lease expires, then runs: no work is lost and nothing deadlocks.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from celery.exceptions import Ignore, Reject, Retry

from ..backends.base import Holder
from ..exceptions import AlreadyRunning, BackendError, ConfigurationError, LeaseLost
from ..lease import Lease
from ..releasing import release_later, release_soon
from . import signals
from .abort import Abort, LeaseLostAbort
from .config import settings_for, store_for
from .enqueue import hand_back
from .keying import call_options
from .message import HEADER, enqueue_key, may_have_run, read_header, time_limit

__all__ = ["Run", "current_lease", "pending_release", "skip_record"]

logger = logging.getLogger(__name__)


def skip_record(key: str, holder: Holder | None, reason: str = "already running") -> dict[str, Any]:
    """The result of a run skipped because ``holder`` holds ``key``."""
    shown = holder.as_dict() if holder is not None else {}
    return {
        "exclusive": "skipped",
        "reason": reason,
        "key": key,
        "holder_task_id": shown.get("task_id"),
        "holder": {k: v for k, v in shown.items() if k != "token"},
    }


class _Skipped(Exception):
    """End the run now with ``value`` as its result (``ignore``: store none)."""

    def __init__(self, value: Any, *, ignore: bool = False) -> None:
        super().__init__(value)
        self.value = value
        self.ignore = ignore


class Run:
    """One worker (or eager) run of a protected task: its key, options, store and leases."""

    def __init__(self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.task = task
        self.request = request = task.request
        header = read_header(request)
        self.opts = call_options(task, header.get("opts"))
        self.key: str = header.get("key") or task.exclusive_key(args, kwargs, header.get("opts"))
        self.store = store_for(task.app)
        self.task_id = str(request.id)
        self.abort = Abort()
        #: The run lease, once made.
        self.lease: Lease | None = None

    def __call__(self, body: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Take the leases, run ``body(*args, **kwargs)``, give them back; return its result."""
        asked = time.monotonic()
        try:
            lease = self._take_run_lease()
        except _Skipped as skipped:
            self._release_enqueue_lease()
            if skipped.ignore:
                raise Ignore() from None  # Celery stores nothing for this run
            return skipped.value
        except Retry:
            raise  # the retry is this task id again: it keeps the enqueue lease
        except BaseException:
            # No run will come of this message (a conflict that raises, retries given up, a
            # store error): its enqueue lease must not keep the key for queue_ttl.
            self._release_enqueue_lease()
            raise
        waited = time.monotonic() - asked
        call = self._release_enqueue_lease()
        if call is not None:  # keep_last: run with the newest arguments handed to us
            args, kwargs = tuple(call.get("args") or ()), dict(call.get("kwargs") or {})
            # ... and so does a retry(), which republishes the request's arguments
            self.request.args, self.request.kwargs = list(args), kwargs
        if lease is None:
            return body(*args, **kwargs)
        signals.exclusive_acquired.send(
            sender=self.task, task_id=self.task_id, key=self.key, lease=lease, waited=waited
        )
        return self._run_holding(lease, body, args, kwargs)

    def _run_holding(self, lease: Lease, body: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Run the body while holding ``lease``; release it (or keep it for a retry) after."""
        request, opts = self.request, self.opts
        request._exclusive_lease = self.lease = lease
        retrying = ended = False
        try:
            if opts.on_lock_lost == "abort":
                self.abort.arm()
            try:
                result = body(*args, **kwargs)
            finally:
                self.abort.disarm()
            ended = True
            return result
        except LeaseLostAbort:
            raise LeaseLost(
                f"{self.task.name}[{self.task_id}] aborted: its lease on {self.key!r} was lost "
                f"({self.abort.reason})",
                key=self.key,
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
            redeliverable = (self.task.acks_late or request.eta) and not request.is_eager
            if ended and redeliverable:
                self._mark_done()
            if retrying and opts.hold == "until_done":
                # kept for the retry (apply_async did it already)
                hand_back(lease, self.store.backend, self.task_id)
            elif request.is_eager:
                self._release(lease)
            elif self.task.acks_late:
                # Released once Celery has stored the result and acked (task_postrun, see
                # handlers.release_after_run): a redelivered copy waiting for this release
                # then finds the done mark written above, and the result in place.
                request._exclusive_release = self
            else:
                self.release_soon()

    # -- taking the run lease -------------------------------------------------------------

    def _new_lease(self, token: str) -> Lease:
        """The run lease with owner ``token`` (kept as :attr:`lease`)."""
        task, request, opts = self.task, self.request, self.opts
        self.lease = lease = self.store.lease(
            self.key,
            token=token,
            ttl=opts.ttl,
            limit=opts.limit,
            meta={
                "task_id": self.task_id,
                "task_name": task.name,
                "node": request.hostname or "",
                "state": "running",
            },
            max_hold=opts.max_hold or time_limit(task, request),
            on_lost=lambda _lease, reason: self._lost(reason),
        )
        return lease

    def _take_run_lease(self) -> Lease | None:
        """Take the lease a run holds (None when ``hold`` has none); raise _Skipped to skip.

        Never returns or raises with the lease held, except by returning it.
        """
        if not self.opts.has_run_lease:
            return None
        # Each delivery is its own owner, so a redelivered copy of a running task is refused
        # rather than let in. until_done: the enqueue lease (owned by the task id) is handed
        # over to this delivery, same grant and fence, and renewed while the task runs.
        lease = self._new_lease(f"{self.task_id}/{secrets.token_hex(6)}")
        try:
            lease, waited_for_own_copy = self._acquire(lease)
            if waited_for_own_copy or may_have_run(self.request):
                self._skip_if_done(lease)
        except BackendError as exc:
            lease = self.lease or lease  # a store without hand-over: the one by task id
            if lease.held:
                self._release(lease)
            else:
                # The acquire may have reached the store and been granted with its reply lost
                # (a store that stalled, then answered): free what this token may hold.
                release_later(self.store.backend, lease.key, lease.token, lease.ttl)
            self._store_failed(exc)
        except BaseException:
            lease = self.lease or lease
            if lease.held:
                self._release(lease)  # never keep a key for a run that won't come
            raise
        return lease

    def _acquire(self, lease: Lease) -> tuple[Lease, bool]:
        """Take the run lease; on a conflict apply ``on_conflict`` (raise _Skipped to skip).

        Returns the lease taken, and True when the key was held by another delivery of this
        task id (a redelivered message), which this one waited for.
        """
        opts = self.opts
        wait = opts.conflict == "wait" or opts.on_duplicate == "keep_last"
        timeout = opts.wait_timeout if wait else None
        # until_done: the enqueue grant (owned by the task id) is moved to this delivery in
        # the same round trip: same grant and fence, the run's metadata, renewed while it runs.
        # (A redelivered copy finds the key held by the running copy's token and waits.)
        take_over = self.task_id if opts.hold == "until_done" else None
        try:
            acquired = lease.acquire(blocking=wait, timeout=timeout, take_over=take_over)
        except ConfigurationError:
            if take_over is None:
                raise
            lease = self._new_lease(self.task_id)  # no hand-over: one owner per task id
            acquired = lease.acquire(blocking=wait, timeout=timeout)
        if acquired:
            return lease, False
        holder = lease.holder
        if holder is not None and holder.meta.get("task_id") == self.task_id:
            self._redelivered(lease)
            return lease, True
        self._conflict(holder)

    def _conflict(self, holder: Holder | None) -> NoReturn:
        """The key is held by another task id: ``on_conflict`` (or a pending copy's requeue)."""
        opts, key = self.opts, self.key
        shown = holder.as_dict() if holder is not None else {}
        held_by = shown.get("task_id")
        if opts.pending_waits and not self.request.is_eager:
            # The pending copy keeps its place (its enqueue lease, and keep_last's newest
            # arguments) until the running one ends: back to the queue, as often as it takes.
            # (An eager run has no queue to go back to: it gives up as "wait" does, below.)
            self._signal_conflict(shown, "requeue")
            raise self._requeue(
                min(opts.retry_countdown, opts.retry_max_countdown),
                f"pending: {key!r} is held by task {held_by}",
            )
        conflict = opts.conflict
        self._signal_conflict(shown, conflict)
        message = f"{self.task.name} is already running for {key!r} (held by task {held_by})"
        if conflict == "skip":
            logger.info("%s: skipped", message)
            raise _Skipped(skip_record(key, holder))
        if conflict == "retry":
            countdown = min(
                opts.retry_countdown * opts.retry_backoff ** (self.request.retries or 0),
                opts.retry_max_countdown,
            )
            raise self.task.retry(
                countdown=countdown,
                max_retries=opts.max_retries,
                exc=AlreadyRunning(message, key=key, holder=shown),
            )
        if conflict == "wait":
            message += f"; gave up after waiting {opts.wait_timeout:g} s"
        raise AlreadyRunning(message, key=key, holder=shown)

    def _signal_conflict(self, holder: Mapping[str, Any] | None, action: str) -> None:
        signals.exclusive_conflict.send(
            sender=self.task, task_id=self.task_id, key=self.key, holder=holder, action=action
        )

    def _redelivered(self, lease: Lease) -> None:
        """The broker delivered this task id again while a copy of it holds the key.

        Wait for that copy to end; if it runs on, go back to the queue (freeing this worker
        slot) as often as it takes: the copy that comes back checks the done mark first.
        """
        holder = lease.holder
        self._signal_conflict(holder.as_dict() if holder is not None else None, "redelivered")
        logger.warning(
            "%s[%s] was delivered again while a copy of it holds %r: waiting for that copy",
            self.task.name,
            self.task_id,
            self.key,
        )
        opts = self.opts
        if not lease.acquire(blocking=True, timeout=max(opts.wait_timeout, opts.ttl * 2)):
            raise self._requeue(
                min(opts.retry_countdown, opts.retry_max_countdown),
                f"another delivery of this task id still holds {self.key!r}",
            )

    def _requeue(self, countdown: float, reason: str, exc: BaseException | None = None) -> Retry:
        """Publish this task id again in ``countdown`` s; return the Retry to raise.

        The library's own going back to the queue, unlimited and not counted in
        ``request.retries``: Celery's ``retry(max_retries=None)`` means the task's own limit
        (3 by default), and counting ours would spend the user's retries. The message carries
        the call's key and options, and how often it went back (``requeued`` in the header),
        which also tells the copy that comes back to check the done mark.
        """
        task, request = self.task, self.request
        logger.info(
            "%s[%s] back to the queue in %g s: %s", task.name, request.id, countdown, reason
        )
        header = read_header(request)
        header["requeued"] = int(header.get("requeued") or 0) + 1
        headers = {**(request.headers or {}), HEADER: header}
        signature = task.signature_from_request(request, countdown=countdown, headers=headers)
        signature.apply_async()
        return Retry(reason, exc=exc, when=countdown, sig=signature)

    def _store_failed(self, exc: BackendError) -> NoReturn:
        """The store failed as the run started: fail, or go back to the queue (on_store_error)."""
        opts, name, task_id = self.opts, self.task.name, self.task_id
        action = opts.on_store_error
        signals.exclusive_store_error.send(
            sender=self.task, task_id=task_id, key=self.key, error=exc, action=action
        )
        if action == "fail" or self.request.is_eager:  # an eager run has no queue to go back to
            logger.error("%s[%s] could not reach the lease store: %s", name, task_id, exc)
            raise exc
        tries = int(read_header(self.request).get("requeued") or 0)
        countdown = min(opts.retry_countdown * opts.retry_backoff**tries, opts.retry_max_countdown)
        logger.warning(
            "%s[%s] could not reach the lease store (%s): trying again in %g s",
            name,
            task_id,
            exc,
            countdown,
        )
        raise self._requeue(countdown, "the lease store could not be reached", exc=exc) from exc

    # -- the done mark --------------------------------------------------------------------

    def _skip_if_done(self, lease: Lease) -> None:
        """Another copy of this task id ran to its end: release the key and skip the run.

        Known from the store's done mark (:meth:`_mark_done`), not from the result backend,
        which may be off (``ignore_result``), down, or not say SUCCESS (a failed run, or a
        ``track_started`` STARTED that a redelivered copy wrote over SUCCESS).
        """
        if not self.store.backend.is_done(self.key, self.task_id):
            return
        self._release(lease)
        logger.warning(
            "%s[%s] was delivered again after a copy of it ran to its end: not running it again",
            self.task.name,
            self.task_id,
        )
        # Ignore: Celery stores nothing (the first copy's SUCCESS or FAILURE stays) and sends
        # no callback, chain or chord step a second time (returning a value would).
        raise _Skipped(None, ignore=True)

    def _mark_done(self) -> None:
        """Record in the store that this task id ran to its end (read by :meth:`_skip_if_done`).

        Written before the run lease is released, so a redelivered copy waiting for that
        release finds it. Kept for two visibility timeouts (at least an hour): the longest a
        broker keeps an unacked message before it delivers it again.
        """
        options = self.task.app.conf.broker_transport_options or {}
        ttl = max(2 * float(options.get("visibility_timeout") or 3600), 3600.0)
        try:
            self.store.backend.mark_done(self.key, self.task_id, ttl)
        except BackendError:
            logger.warning(
                "could not record that %s[%s] ended: a redelivered copy would run it again",
                self.task.name,
                self.task_id,
                exc_info=True,
            )

    # -- giving the leases back -----------------------------------------------------------

    def _release_enqueue_lease(self) -> dict[str, Any] | None:
        """Give back the enqueue lease at the start of a run; return keep_last's newest call.

        The run does not wait for the answer (keep_last does: it needs the newest arguments),
        and a release that fails is tried again in the background (see ``releasing``).
        """
        opts, backend, task_id = self.opts, self.store.backend, self.task_id
        if opts.hold not in ("queued", "queued_and_running"):
            return None
        key = enqueue_key(self.key, opts)
        queue_ttl = opts.queue_ttl or settings_for(self.task.app).queue_ttl
        if opts.on_duplicate != "keep_last" and not self.request.is_eager:
            release_soon(backend, key, task_id, queue_ttl)
            return None
        try:
            if opts.on_duplicate != "keep_last":
                backend.release(key, task_id)
                return None
            taken = backend.take(key, task_id)
        except BackendError:
            logger.warning(
                "could not release the enqueue lease of %s now: trying again in the background",
                self.key,
                exc_info=True,
            )
            release_later(backend, key, task_id, queue_ttl)
            return None
        call = json.loads(taken).get("call") if taken else None
        return call if isinstance(call, dict) else None

    def release_soon(self) -> None:
        """The end of a worker run: send the release of the run lease, and let the background
        thread read its answer (and send ``exclusive_released``): the task does not wait a
        round trip for it. Sent before Celery stores the result, so a caller that sees the
        result finds the key free (see :mod:`celery_exclusive.releasing`)."""
        lease = self.lease
        if lease is not None:
            lease.release_soon(lambda released: self._released(lease, released))

    def _release(self, lease: Lease) -> None:
        try:
            released = lease.release()
        except BackendError:
            logger.warning(
                "releasing %r failed: trying again in the background", self.key, exc_info=True
            )
            release_later(self.store.backend, lease.key, lease.token, lease.ttl)
            released = False
        self._released(lease, released)

    def _released(self, lease: Lease, released: bool) -> None:
        signals.exclusive_released.send(
            sender=self.task, task_id=self.task_id, key=self.key, released=released, lease=lease
        )

    def _lost(self, reason: str) -> None:
        signals.exclusive_lost.send(
            sender=self.task, task_id=self.task_id, key=self.key, reason=reason
        )
        self.abort.fire(reason)


def current_lease(request: Any) -> Lease | None:
    """The lease of the run ``request`` stands for (None outside a protected run)."""
    return getattr(request, "_exclusive_lease", None)


def pending_release(request: Any) -> Run | None:
    """The acks_late run whose release waits for Celery to store its result (taken once)."""
    run = getattr(request, "_exclusive_release", None)
    if run is not None:
        request._exclusive_release = None
    return run if isinstance(run, Run) else None
