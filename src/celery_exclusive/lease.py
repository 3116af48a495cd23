"""A lease: a lock on a key with an owner token, an expiry, renewal and a fencing number.

The :class:`Lease` owns all policy (blocking, deadlines, renewal, hooks); its backend only
performs atomic steps. Get one from :meth:`celery_exclusive.Store.lease`.

Why a lease and not a lock: a holder can die or pause without releasing. Every grant therefore
expires ``ttl`` seconds after its last renewal (judged by the store's clock), and while the
holder lives, the process's renewer (see ``renewal``) extends it every ``ttl / 3``. Timeline of the
failure this protects against::

    t=0    worker A acquires "sync:42" (fence 7), ttl 30 s
    t=5    A's process is SIGKILLed by the OOM killer: no finally, no release
    t=30   the lease expires in the store; worker B acquires "sync:42" (fence 8)

and of the one the fence answers::

    t=0    A acquires (fence 7), then A's process is paused (GC, SIGSTOP, a VM migration)
    t=30   A's lease expires; B acquires (fence 8) and writes with fence 8
    t=40   A resumes and writes with fence 7: the resource, having seen 8, refuses 7.
           A's release() returns False and frees nothing; A's ensure_held() raises.

What lives here: :class:`LeaseSpec` (what a lease is asked for: built and validated once, by
:meth:`celery_exclusive.Store.lease`) and :class:`Lease` (one lease's state and policy).

This module and :mod:`celery_exclusive.renewal` are one pair and use each other's private
names: the renewer reads a lease's ``_backend``, ``_spec``, ``_grant``, ``_generation``,
``_hold_until``, ``_next_renewal`` and ``_renew_request``, writes ``_next_renewal``, and reports
back through ``_renewed`` and ``_mark_lost``; the lease calls :meth:`Renewer.add` and
:meth:`Renewer.discard`. Nothing else touches them; a user sees only the public face.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

from . import events, forking
from .backends.base import Conflict, Grant, Holder, RenewRequest, encode_meta
from .exceptions import AlreadyHeld, BackendError, ConfigurationError, LeaseLost, Timeout
from .releasing import release_soon, settle

if TYPE_CHECKING:
    from .backends.base import Backend
    from .renewal import Renewer

__all__ = ["Lease", "LeaseSpec"]

logger = logging.getLogger(__name__)


class LeaseSpec(NamedTuple):
    """What a lease is asked for, validated once by :meth:`celery_exclusive.Store.lease`.

    ``meta`` is the holder metadata as the store keeps it (host, pid and limit included);
    ``token`` is decided here, before the lease exists. See :meth:`~celery_exclusive.Store.lease`
    for what each field means. Frozen, and read by name only; a named tuple rather than a
    frozen dataclass because a lease is made for every run of a protected task, and a tuple
    is built in a third of the time.
    """

    key: str
    ttl: float
    limit: int
    meta: dict[str, Any]
    token: str
    max_hold: float | None = None
    blocking: bool | None = None
    timeout: float | None = None
    auto_renew: bool = True
    on_lost: Callable[[Lease, str], object] | None = None


class Lease:
    """A lease on one key of a store.

    ``limit`` > 1 makes it a semaphore: up to ``limit`` holders at once, each with its own
    token, expiry and fence. Use it as a context manager, or call :meth:`acquire` and
    :meth:`release` yourself::

        with store.lease("nightly-sync", ttl=30) as lease:
            do_work(fence=lease.fence)        # raises AlreadyHeld if someone else has it

        lease = store.lease("report", limit=2)
        if lease.acquire(blocking=True, timeout=10):
            try:
                ...
                lease.ensure_held()           # raises LeaseLost if it expired meanwhile
            finally:
                lease.release()
    """

    # Slots: a lease is made for every run of a protected task.
    __slots__ = (
        "__weakref__",
        "_acquired_wall",
        "_backend",
        "_deadline",
        "_epoch",
        "_fence",
        "_generation",
        "_grant",
        "_hold_until",
        "_holders",
        "_lock",
        "_lost_reason",
        "_meta_json",
        "_next_renewal",
        "_renew_request",
        "_renewer",
        "_spec",
    )

    def __init__(self, backend: Backend, spec: LeaseSpec, renewer: Renewer | None = None) -> None:
        self._backend = backend
        self._spec = spec
        self._renewer = renewer
        self._meta_json = encode_meta(spec.meta)
        self._lock = threading.Lock()
        self._epoch = forking.epoch()  # the process (fork) the grant belongs to
        self._fence: int | None = None
        self._deadline = 0.0  # monotonic time our grant surely lasts until
        self._hold_until = math.inf  # monotonic time the grant reaches max_hold
        self._acquired_wall = 0.0  # wall-clock time of the grant (for ``holder``)
        self._lost_reason: str | None = None
        self._holders: Sequence[Holder] = ()
        self._next_renewal = math.inf  # monotonic; read and written by the renewer
        # Counts grants. A renewal reply is applied only to the grant it was sent for:
        #   renewer sends renew(k) -> owner releases k -> store answers "not held"
        #   -> owner acquires k again -> the stale "not held" must not mark the new grant lost.
        self._generation = 0
        # (generation, _deadline) as one tuple, replaced whole under the lock whenever either
        # changes: the renewer reads it for every lease held, often, without taking the lock.
        self._grant: tuple[int, float] = (0, 0.0)
        self._renew_request = RenewRequest(spec.key, spec.token, spec.ttl)

    # -- what it is -----------------------------------------------------------------------

    @property
    def key(self) -> str:
        """The key this lease is on."""
        return self._spec.key

    @property
    def ttl(self) -> float:
        """Seconds a grant lasts without renewal."""
        return self._spec.ttl

    @property
    def limit(self) -> int:
        """How many holders the key allows at once (1: a lock)."""
        return self._spec.limit

    @property
    def token(self) -> str:
        """The owner token: the same token asking again is the same owner."""
        return self._spec.token

    @property
    def meta(self) -> dict[str, Any]:
        """The holder metadata the store keeps with the grant (host, pid and limit included)."""
        return self._spec.meta

    # -- state ----------------------------------------------------------------------------

    @property
    def fence(self) -> int | None:
        """The fencing number of the current (or last) grant; None before the first grant.

        Strictly increasing across all grants of this key: pass it to the resource you write
        so it can refuse a write from a holder whose lease has since passed to another.
        """
        return self._fence

    @property
    def held(self) -> bool:
        """Whether we hold the lease now, as far as this process can tell.

        Turns False at release, when renewal finds the lease gone, and when the local
        deadline passes (``ttl`` after the last successful renewal was *sent*; the store's
        expiry comes no earlier).
        """
        self._check_fork()
        return (
            self._fence is not None
            and self._lost_reason is None
            and time.monotonic() < self._deadline
        )

    @property
    def lost_reason(self) -> str | None:
        """Why the lease was lost, or None."""
        return self._lost_reason

    @property
    def holder(self) -> Holder | None:
        """Who holds the key: ourselves while held, else the first holder seen at the last
        refused acquire, else None.

        Our own entry is as this process sees it: ``expires_in`` counts to the local deadline,
        and the times are this host's clock.
        """
        if self.held:
            now = time.monotonic()
            renewed = time.time() - (now - (self._deadline - self._spec.ttl))
            return Holder(
                token=self._spec.token,
                fence=self._fence or 0,
                expires_in=max(self._deadline - now, 0.0),
                acquired_at=self._acquired_wall,
                renewed_at=renewed,
                meta=self._spec.meta,
            )
        return self._holders[0] if self._holders else None

    @property
    def holders(self) -> list[Holder]:
        """Every holder seen at the last refused acquire (several for a semaphore)."""
        return list(self._holders)

    # -- operations -----------------------------------------------------------------------

    def acquire(
        self,
        blocking: bool | None = None,
        timeout: float | None = None,
        *,
        take_over: str | None = None,
    ) -> bool:
        """Try to take the lease; return True on success.

        Non-blocking by default. With ``blocking=True`` (or a ``timeout``), wait until the
        key is released, woken by the release itself rather than by polling, for at most
        ``timeout`` seconds (None: no limit). A waiter also re-checks when the current
        holder's lease is due to expire, so a holder that died without releasing is noticed.
        Taking a lease we already hold extends it and keeps its fence.

        ``take_over``: the token of a grant to move to this lease first, keeping its fence
        (a queued message's grant taken by the run of that message); raises
        ConfigurationError on a store that cannot hand a grant over.
        """
        self._check_fork()
        if timeout is not None:
            if not isinstance(timeout, (int, float)) or math.isnan(timeout) or timeout < 0:
                raise ConfigurationError(f"timeout must be a number >= 0 or None, not {timeout!r}")
            blocking = True if blocking is None else blocking
        deadline = None if timeout is None else time.monotonic() + timeout
        settle(self._backend, self._spec.key)  # a release of ours still on its way: let it land
        while True:
            sent = time.monotonic()
            waits = 0.0 if not blocking else 3600.0 if deadline is None else deadline - sent
            result = self._ask(max(waits, 0.0), take_over)
            take_over = None  # moved, or nothing was there to move
            if not isinstance(result, Conflict):
                self._granted(result.fence, sent)
                return True
            self._refused(result)
            if not blocking:
                return False
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Woken by a release; else re-check just after the earliest holder's expiry.
            self._backend.wait(self._spec.key, min(remaining, result.retry_in + 0.002))

    def release(self) -> bool:
        """Give the lease back; return True if we still held it in the store.

        A late or doubled release returns False and never frees another owner's lease. In a
        process forked from the one that holds it, it returns False and frees nothing.
        """
        if not self._end_grant():
            return False
        released = self._backend.release(self._spec.key, self._spec.token)
        events.lease_released.send(lease=self, released=released)
        return released

    def release_soon(self, then: Callable[[bool], object] | None = None) -> None:
        """Give the lease back without waiting for the store's answer.

        The release is sent now, so that whatever this process does next (a worker storing
        the task's result) reaches the store after it; its answer is read later (by the next
        command on that connection, or by this process's background thread), which fires
        ``lease_released`` and calls ``then(released)``; a release that failed is sent again
        until it succeeds or the lease has expired (see :mod:`celery_exclusive.releasing`).
        An acquire of the same key in this process reads that answer first. On a store that
        cannot send without waiting, the release is made here, as :meth:`release` does.
        Never raises for a store error.
        """
        if not self._end_grant():
            return

        def done(released: bool) -> None:
            events.lease_released.send(lease=self, released=released)
            if then is not None:
                then(released)

        spec = self._spec
        release_soon(self._backend, spec.key, spec.token, spec.ttl, done)

    def detach(self) -> None:
        """Stop renewing and forget the grant locally, leaving it in the store to expire.

        For hand-overs: a lease that another party (a queued message) now owns.
        """
        self._end_grant()

    def renew(self) -> bool:
        """Extend the lease by ``ttl`` now; return False (and mark it lost) if it is gone."""
        self._check_fork()
        if self._fence is None or self._deadline == 0.0 or self._lost_reason is not None:
            return False
        sent = time.monotonic()
        (ok,) = self._backend.renew([self._renew_request])
        if ok:
            self._renewed(sent)
        else:
            self._mark_lost("the store no longer had it (expired, or released by force)")
        return ok

    def ensure_held(self) -> None:
        """Raise :class:`LeaseLost` unless we hold the lease now."""
        if not self.held:
            if self._fence is None:
                reason = "it was never acquired"
            elif self._lost_reason is not None:
                reason = self._lost_reason
            elif self._deadline == 0.0:
                reason = "it was released"
            else:
                reason = "it expired before it could be renewed"
            key = self._spec.key
            raise LeaseLost(f"lease on {key!r} is not held: {reason}", key=key)

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Lease:
        spec = self._spec
        blocking = spec.timeout is not None if spec.blocking is None else spec.blocking
        if self.acquire(blocking=blocking, timeout=spec.timeout):
            return self
        if blocking:
            raise Timeout(
                f"could not acquire {spec.key!r} within {spec.timeout} s",
                key=spec.key,
                timeout=spec.timeout,
            )
        holder = self.holder
        shown = holder.as_dict() if holder is not None else None
        raise AlreadyHeld(f"{spec.key!r} is held by {shown}", key=spec.key, holder=shown)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except BackendError:
            if exc is None:
                raise
            # Don't hide the body's own error behind a release failure; the lease expires.
            logger.warning(
                "releasing %r failed; it will expire in %s s",
                self._spec.key,
                self._spec.ttl,
                exc_info=True,
            )

    def __repr__(self) -> str:
        state = (
            "held" if self.held else (f"lost: {self._lost_reason}" if self._lost_reason else "free")
        )
        return f"<Lease {self._spec.key!r} fence={self._fence} {state}>"

    # -- the grant ------------------------------------------------------------------------

    def _ask(self, wait: float, take_over: str | None) -> Grant | Conflict:
        """One acquire (or take-over) round trip: a Grant or a Conflict."""
        spec = self._spec
        if take_over is not None:
            return self._backend.take_over(
                spec.key,
                take_over,
                spec.token,
                ttl=spec.ttl,
                limit=spec.limit,
                meta=self._meta_json,
                wait=wait,
            )
        return self._backend.acquire(
            spec.key, spec.token, ttl=spec.ttl, limit=spec.limit, meta=self._meta_json, wait=wait
        )

    def _granted(self, fence: int, sent: float) -> None:
        spec = self._spec
        with self._lock:
            if self._deadline == 0.0 or self._lost_reason is not None:  # a new grant
                self._generation += 1
                self._acquired_wall = time.time()
                if spec.max_hold is not None:
                    self._hold_until = sent + spec.max_hold
            self._fence = fence
            self._set_deadline(sent + spec.ttl)
            self._lost_reason = None
            self._holders = ()
            self._next_renewal = sent + spec.ttl / 3
        if spec.auto_renew and self._renewer is not None:
            self._renewer.add(self)
        events.lease_acquired.send(lease=self)

    def _refused(self, conflict: Conflict) -> None:
        self._holders = conflict.holders
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("lease %r is held by %s", self._spec.key, self.holder)
        events.lease_conflict.send(lease=self, holders=list(conflict.holders))

    def _end_grant(self) -> bool:
        """Forget the grant locally and stop renewing it; return whether there was one."""
        self._check_fork()
        with self._lock:
            was_granted = self._fence is not None and self._deadline > 0
            self._set_deadline(0.0)
        if self._renewer is not None:
            self._renewer.discard(self)
        return was_granted

    def _set_deadline(self, deadline: float) -> None:
        """Set the grant's local deadline (call with the lock held)."""
        self._deadline = deadline
        self._grant = (self._generation, deadline)

    def _check_fork(self) -> None:
        """In a process forked since the grant, forget it: it is the parent's (rule 6)."""
        if self._epoch == forking.epoch():
            return
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._epoch = forking.epoch()
        if self._deadline > 0.0:
            self._lost_reason = "it was granted to the process this one was forked from"
            self._generation += 1
            self._set_deadline(0.0)
            self._next_renewal = math.inf

    # -- called by the renewer (see the module docstring) ---------------------------------

    def _renewed(self, sent: float, generation: int | None = None) -> None:
        """Record a successful renewal sent at monotonic time ``sent`` for ``generation``."""
        with self._lock:  # the renewer calls this for every lease held, every interval
            if generation is not None and generation != self._generation:
                return
            if self._deadline > 0 and self._lost_reason is None:
                ttl = self._spec.ttl
                self._deadline = deadline = sent + ttl
                self._grant = (self._generation, deadline)
                self._next_renewal = sent + ttl / 3

    def _mark_lost(self, reason: str, generation: int | None = None) -> None:
        """Mark the lease lost: log at WARNING, fire ``lease_lost`` and ``on_lost``.

        With ``generation``, only if the lease is still at that grant (see ``_generation``).
        """
        with self._lock:
            if generation is not None and generation != self._generation:
                return
            if self._lost_reason is not None or self._deadline == 0.0:
                return
            self._lost_reason = reason
        if self._renewer is not None:
            self._renewer.discard(self)
        spec = self._spec
        logger.warning(
            "lease on %r lost: %s (holder %s, fence %s)", spec.key, reason, spec.meta, self._fence
        )
        events.lease_lost.send(lease=self, reason=reason)
        if spec.on_lost is not None:
            try:
                spec.on_lost(self, reason)
            except Exception:
                logger.exception("on_lost callback of lease %r failed", spec.key)
