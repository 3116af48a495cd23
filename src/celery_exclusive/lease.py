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
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import events, forking
from .backends.base import Conflict, Holder, RenewRequest, encode_meta
from .exceptions import AlreadyHeld, BackendError, ConfigurationError, LeaseLost, Timeout
from .releasing import release_soon, settle

if TYPE_CHECKING:
    from .backends.base import Backend
    from .renewal import Renewer

__all__ = ["Lease"]

logger = logging.getLogger(__name__)

_HOST = socket.gethostname()


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

    def __init__(
        self,
        backend: Backend,
        key: str,
        *,
        ttl: float,
        limit: int = 1,
        meta: Mapping[str, Any] | None = None,
        token: str | None = None,
        max_hold: float | None = None,
        blocking: bool | None = None,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: Callable[[Lease, str], object] | None = None,
        renewer: Renewer | None = None,
    ) -> None:
        self.backend = backend
        self.key = key
        self.ttl = ttl
        self.limit = limit
        self.token = token or secrets.token_hex(16)
        # The store keeps each holder's limit with it, to refuse a caller with another one.
        self.meta: dict[str, Any] = {
            "host": _HOST,
            "pid": os.getpid(),
            **(meta or {}),
            "limit": limit,
        }
        self._meta_json = encode_meta(self.meta)
        self.max_hold = max_hold
        self.blocking = blocking
        self.timeout = timeout
        self.auto_renew = auto_renew
        self.on_lost = on_lost
        self._renewer = renewer
        self._lock = threading.Lock()
        self._epoch = forking.epoch()  # the process (fork) the grant belongs to
        self._fence: int | None = None
        self._deadline = 0.0  # monotonic time our grant surely lasts until
        self._acquired_at = 0.0  # monotonic time of the grant
        self._lost_reason: str | None = None
        self._holders: Sequence[Holder] = ()
        self.next_renewal = math.inf  # monotonic; read and written by the renewer
        # Counts grants. A renewal reply is applied only to the grant it was sent for:
        #   renewer sends renew(k) -> owner releases k -> store answers "not held"
        #   -> owner acquires k again -> the stale "not held" must not mark the new grant lost.
        self.generation = 0
        # (generation, _deadline) as one tuple, replaced whole under the lock whenever either
        # changes: the renewer reads it for every lease held, often, without taking the lock.
        self._grant: tuple[int, float] = (0, 0.0)
        self._renew_request = RenewRequest(self.key, self.token, self.ttl)

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
    def meta_json(self) -> str:
        """The holder metadata as the store keeps it (compact JSON text)."""
        return self._meta_json

    @property
    def lost_reason(self) -> str | None:
        """Why the lease was lost, or None."""
        return self._lost_reason

    @property
    def holder(self) -> dict[str, Any] | None:
        """Who holds the key: ourselves while held, else the first holder seen at the
        last refused acquire (task id, host, pid, fence, expiry...), else None."""
        if self.held:
            return {"token": self.token, "fence": self._fence, **self.meta}
        return self._holders[0].as_dict() if self._holders else None

    @property
    def holders(self) -> list[dict[str, Any]]:
        """Every holder seen at the last refused acquire (several for a semaphore)."""
        return [h.as_dict() for h in self._holders]

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
        if blocking is None:
            blocking = False
        deadline = None if timeout is None else time.monotonic() + timeout
        settle(self.backend, self.key)  # a release of ours still on its way: let it land
        while True:
            sent = time.monotonic()
            waits = 0.0 if not blocking else 3600.0 if deadline is None else deadline - sent
            if take_over is not None:
                result = self.backend.take_over(
                    self.key,
                    take_over,
                    self.token,
                    ttl=self.ttl,
                    limit=self.limit,
                    meta=self._meta_json,
                    wait=max(waits, 0.0),
                )
                take_over = None  # moved, or nothing was there to move
            else:
                result = self.backend.acquire(
                    self.key,
                    self.token,
                    ttl=self.ttl,
                    limit=self.limit,
                    meta=self._meta_json,
                    wait=max(waits, 0.0),
                )
            if not isinstance(result, Conflict):
                self._granted(result.fence, sent)
                return True
            self._holders = result.holders
            logger.debug("lease %r is held by %s", self.key, self.holder)
            events.lease_conflict.send(lease=self, holders=list(result.holders))
            if not blocking:
                return False
            remaining = math.inf if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            # Woken by a release; else re-check just after the earliest holder's expiry.
            self.backend.wait(self.key, min(remaining, result.retry_in + 0.002))

    def release(self) -> bool:
        """Give the lease back; return True if we still held it in the store.

        A late or doubled release returns False and never frees another owner's lease. In a
        process forked from the one that holds it, it returns False and frees nothing.
        """
        if not self._end_grant():
            return False
        released = self.backend.release(self.key, self.token)
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

        release_soon(self.backend, self.key, self.token, self.ttl, done)

    def _end_grant(self) -> bool:
        """Forget the grant locally and stop renewing it; return whether there was one."""
        self._check_fork()
        with self._lock:
            was_granted = self._fence is not None and self._deadline > 0
            self._set_deadline(0.0)
        if self._renewer is not None:
            self._renewer.discard(self)
        return was_granted

    def detach(self) -> None:
        """Stop renewing and forget the grant locally, leaving it in the store to expire.

        For hand-overs: a lease that another party (a queued message) now owns.
        """
        self._check_fork()
        with self._lock:
            self._set_deadline(0.0)
        if self._renewer is not None:
            self._renewer.discard(self)

    def renew(self) -> bool:
        """Extend the lease by ``ttl`` now; return False (and mark it lost) if it is gone."""
        self._check_fork()
        if self._fence is None or self._deadline == 0.0 or self._lost_reason is not None:
            return False
        sent = time.monotonic()
        (ok,) = self.backend.renew([self._renew_request])
        if ok:
            self.renewed(sent)
        else:
            self.mark_lost("the store no longer had it (expired, or released by force)")
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
            raise LeaseLost(f"lease on {self.key!r} is not held: {reason}", key=self.key)

    # -- context manager ------------------------------------------------------------------

    def __enter__(self) -> Lease:
        blocking = self.timeout is not None if self.blocking is None else self.blocking
        if self.acquire(blocking=blocking, timeout=self.timeout):
            return self
        if blocking:
            raise Timeout(
                f"could not acquire {self.key!r} within {self.timeout} s",
                key=self.key,
                timeout=self.timeout,
            )
        raise AlreadyHeld(
            f"{self.key!r} is held by {self.holder}", key=self.key, holder=self.holder
        )

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
                "releasing %r failed; it will expire in %s s", self.key, self.ttl, exc_info=True
            )

    # -- called by the renewer ------------------------------------------------------------

    def renewed(self, sent: float, generation: int | None = None) -> None:
        """Record a successful renewal sent at monotonic time ``sent`` for ``generation``."""
        with self._lock:  # the renewer calls this for every lease held, every interval
            if generation is not None and generation != self.generation:
                return
            if self._deadline > 0 and self._lost_reason is None:
                self._deadline = deadline = sent + self.ttl
                self._grant = (self.generation, deadline)
                self.next_renewal = sent + self.ttl / 3

    def mark_lost(self, reason: str, generation: int | None = None) -> None:
        """Mark the lease lost: log at WARNING, fire ``lease_lost`` and ``on_lost``.

        With ``generation``, only if the lease is still at that grant (see ``generation``).
        """
        with self._lock:
            if generation is not None and generation != self.generation:
                return
            if self._lost_reason is not None or self._deadline == 0.0:
                return
            self._lost_reason = reason
        if self._renewer is not None:
            self._renewer.discard(self)
        logger.warning(
            "lease on %r lost: %s (holder %s, fence %s)", self.key, reason, self.meta, self._fence
        )
        events.lease_lost.send(lease=self, reason=reason)
        if self.on_lost is not None:
            try:
                self.on_lost(self, reason)
            except Exception:
                logger.exception("on_lost callback of lease %r failed", self.key)

    def grant_deadline(self) -> tuple[int, float]:
        """The current grant's ``generation`` and local deadline (monotonic; 0 when free)."""
        return self._grant

    def renew_request(self) -> RenewRequest:
        """What the store is asked to renew this lease's current grant by."""
        return self._renew_request

    def _set_deadline(self, deadline: float) -> None:
        """Set the grant's local deadline (call with the lock held)."""
        self._deadline = deadline
        self._grant = (self.generation, deadline)

    def _check_fork(self) -> None:
        """In a process forked since the grant, forget it: it is the parent's (rule 6)."""
        if self._epoch == forking.epoch():
            return
        self._lock = threading.Lock()  # another thread may have held it at the fork
        self._epoch = forking.epoch()
        if self._deadline > 0.0:
            self._lost_reason = "it was granted to the process this one was forked from"
            self.generation += 1
            self._set_deadline(0.0)
            self.next_renewal = math.inf

    def past_max_hold(self, now: float) -> bool:
        """Whether ``max_hold`` seconds have passed since the grant."""
        return now >= self.max_hold_at()

    def max_hold_at(self) -> float:
        """When (monotonic) the grant reaches ``max_hold`` (infinity without one)."""
        return math.inf if self.max_hold is None else self._acquired_at + self.max_hold

    def _granted(self, fence: int, sent: float) -> None:
        with self._lock:
            if self._deadline == 0.0 or self._lost_reason is not None:
                self._acquired_at = sent
                self.generation += 1
            self._fence = fence
            self._set_deadline(sent + self.ttl)
            self._renew_request = RenewRequest(self.key, self.token, self.ttl)
            self._lost_reason = None
            self._holders = ()
            self.next_renewal = sent + self.ttl / 3
        if self.auto_renew and self._renewer is not None:
            self._renewer.add(self)
        events.lease_acquired.send(lease=self)

    def __repr__(self) -> str:
        state = (
            "held" if self.held else (f"lost: {self._lost_reason}" if self._lost_reason else "free")
        )
        return f"<Lease {self.key!r} fence={self._fence} {state}>"
