"""Lease renewal: one scheduler thread per process, and one sender thread per store.

Each lease wants renewing every ``ttl / 3``. When a store's earliest lease falls due, the
scheduler hands that store's sender every lease of the store that falls due within the next
``ttl / 6``, so leases drift into step and a process holding 1,000 leases sends one request
per interval, not 1,000.

One sender per store, because a store that stops answering (a paused server, a lost network)
holds its sender in a socket read for seconds; it must not hold up renewals on other stores.
The scheduler never waits on a store: it also watches every lease's local deadline, and a
lease whose renewal was not confirmed in time is reported lost just before the deadline (by
``min(ttl / 10, 0.5)`` s), while the store still holds it::

    t=0     renewal sent, confirmed          deadline = 0 + ttl
    t=ttl/3 renewal sent; the store hangs    (the sender waits for its reply)
    t=ttl-g no reply yet: lease_lost fired   (the scheduler; on_lost runs, `held` is False)
    t>=ttl  the store may free the key       (never before: its expiry counts from the
                                               moment it received the last renewal)

What happens when renewal fails::

    refused (the store says the token no longer holds the key)  -> lost at once
    store unreachable (BackendError)                              -> retried shortly; lost
                                                                     at the local deadline
    max_hold reached                                               -> lost at once (renewal
                                                                     stops; the store frees it
                                                                     within ttl)

Threads are created lazily in the process that first holds a lease. In a forked child every
renewer starts empty (see ``forking``): a thread does not survive ``fork()`` and the parent's
leases are the parent's to renew (Celery prefork children are forked from the worker).

This module and :mod:`celery_exclusive.lease` are one pair and use each other's private names
(listed in ``lease``'s docstring): the renewer reads a lease's grant and schedule
(``_grant``, ``_generation``, ``_hold_until``, ``_next_renewal``, ``_renew_request``,
``_backend``, ``_spec``) and reports through ``_renewed`` and ``_mark_lost``, each told the
grant's generation it was sent for; a lease calls the renewer's public
:meth:`Renewer.add` and :meth:`Renewer.discard`.
"""

from __future__ import annotations

import logging
import operator
import sys
import threading
import time
from typing import TYPE_CHECKING

from . import forking
from .exceptions import BackendError

if TYPE_CHECKING:
    from .backends.base import Backend
    from .lease import Lease

__all__ = ["Renewer", "get_renewer"]

logger = logging.getLogger(__name__)

_OVERDUE = "could not renew it before its deadline: the store did not confirm a renewal in time"
_MAX_HOLD = "it reached max_hold={:g} s: renewal stopped, and the store frees it within {:g} s"

#: After a failed round trip, try again after this fraction of the ttl (at most 1 s).
_RETRY_FRACTION = 0.1


class Renewer:
    """Renews registered leases: a scheduler thread, and a sender thread per store."""

    def __init__(self) -> None:
        self.round_trips = 0  # renewal requests sent, for tests and benchmarks
        self._reset_after_fork()
        forking.call_after_fork(self, Renewer._reset_after_fork)

    def _reset_after_fork(self) -> None:
        # Also the constructor: in a forked child, start empty with new locks (see forking).
        self._cond = threading.Condition()
        self._leases: dict[int, Lease] = {}
        self._senders: dict[int, _Sender] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the scheduler will next wake by itself (monotonic)
        # With nothing to renew the scheduler still wakes every so often (the shortest renewal
        # interval seen), so that a short task's lease, due after that, need not wake it.
        self._idle_interval = 60.0

    def add(self, lease: Lease) -> None:
        """Start renewing ``lease`` (idempotent)."""
        with self._cond:
            self._leases[id(lease)] = lease
            self._idle_interval = min(self._idle_interval, max(lease._spec.ttl / 3, 0.05))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="celery-exclusive-renewer", daemon=True
                )
                self._thread.start()
            # Wake the thread only if this lease is due before it would wake anyway: with
            # many leases held, waking it (and its scan) on every acquire costs every acquire.
            self._wake_by(min(lease._next_renewal, lease._hold_until))

    def discard(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (idempotent)."""
        with self._cond:
            self._leases.pop(id(lease), None)

    def leases(self) -> list[Lease]:
        """Return the leases being renewed now (a snapshot)."""
        with self._cond:
            return list(self._leases.values())

    def __len__(self) -> int:
        return len(self._leases)

    # -- the scheduler --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                for lease, generation, reason in self._schedule():
                    lease._mark_lost(reason, generation)
            except Exception:  # the thread must survive anything
                logger.exception("lease renewal scheduling failed")
                time.sleep(0.1)

    def _schedule(self) -> list[tuple[Lease, int, str]]:
        """Wait until something is to be done; hand due leases to their store's sender.

        Returns the leases lost (past their deadline, or at ``max_hold``), each with its
        grant's generation and why, to be reported outside the lock.

        A pass over every lease runs only when ``_wake_at`` comes: the earliest time a pass
        planned for (a renewal due, a deadline, ``max_hold``), brought forward by ``add`` and
        by a sender that finished (its batch's next renewal). So a process holding many
        leases of one store scans them once per renewal interval.
        """
        with self._cond:
            while True:
                now = time.monotonic()
                if now < self._wake_at:
                    self._cond.wait(self._wake_at - now)
                    continue
                lost: list[tuple[Lease, int, str]] = []
                due: dict[int, list[Lease]] = {}
                # With leases held, the pass wakes for their next renewal and deadlines (an
                # idle wake-up just before a batch's next renewal would cost a pass per round).
                wake = now + (self._idle_interval if not self._leases else 3600.0)
                # A busy sender stays busy while we hold the condition: its stores' leases
                # are not due (they are still checked for their deadline).
                busy = {store for store, sender in self._senders.items() if sender.busy}
                for store in busy:  # its leases are not looked at for renewal in this pass:
                    self._senders[store].skipped = True  # a pass follows when it is free
                # This loop runs over every lease held, a few times per renewal interval:
                # each call saved here counts with 10,000 leases.
                for lease in list(self._leases.values()):
                    generation, deadline = lease._grant
                    ttl = lease._spec.ttl  # reported lost min(ttl / 10, 0.5) s before the deadline
                    give_up = deadline - (ttl / 10 if ttl < 5.0 else 0.5)
                    hold_until = lease._hold_until
                    reason = None
                    if now >= hold_until:  # max_hold reached
                        reason = _MAX_HOLD.format(lease._spec.max_hold, ttl)
                    elif give_up <= now:
                        reason = _OVERDUE
                    if reason is not None:
                        del self._leases[id(lease)]
                        lost.append((lease, generation, reason))
                        continue
                    if give_up < wake:
                        wake = give_up
                    if hold_until < wake:
                        wake = hold_until
                    store = id(lease._backend)
                    if store not in busy:
                        due.setdefault(store, []).append(lease)
                for leases in due.values():
                    earliest = min(map(_next_renewal, leases))
                    if earliest > now:
                        wake = min(wake, earliest)
                        continue
                    batch = [le for le in leases if le._next_renewal <= now + le._spec.ttl / 6]
                    self._sender_for(batch[0]._backend).send(batch)
                self._wake_at = wake
                if lost:
                    return lost

    def _sender_for(self, backend: Backend) -> _Sender:
        """The sender thread of ``backend`` (call with the condition held)."""
        sender = self._senders.get(id(backend))
        if sender is None or not sender.alive:
            sender = _Sender(self, backend)
            self._senders[id(backend)] = sender
        return sender

    def _renewed(self, sender: _Sender, next_due: float) -> None:
        """A sender is free again, its batch next due at ``next_due`` (monotonic)."""
        with self._cond:
            sender.busy = False
            if sender.skipped:  # a pass ran while it was busy and left its leases out
                sender.skipped = False
                next_due = 0.0
            self._wake_by(next_due)

    def _wake_by(self, when: float) -> None:
        """Have the scheduler pass over the leases by ``when`` (call with the condition held)."""
        if when < self._wake_at:
            self._wake_at = when
            self._cond.notify_all()


class _Sender:
    """Sends one store's renewal batches from its own thread, one batch at a time.

    Its state is guarded by the renewer's condition.
    """

    #: A sender with nothing to send for this long ends its thread (a new one starts on use).
    IDLE = 60.0

    def __init__(self, renewer: Renewer, backend: Backend) -> None:
        self._renewer = renewer
        self._backend = backend
        self._batch: list[Lease] = []
        self.busy = False
        self.skipped = False  # a scheduler pass left this store's leases out while busy
        self.alive = True
        thread = threading.Thread(target=self._run, name="celery-exclusive-renewer-send")
        thread.daemon = True
        thread.start()

    def send(self, batch: list[Lease]) -> None:
        """Queue ``batch`` (call with the renewer's condition held, the sender not busy)."""
        self._batch = batch
        self.busy = True
        self._renewer._cond.notify_all()

    def _run(self) -> None:
        cond = self._renewer._cond
        while True:
            with cond:
                idle_until = time.monotonic() + self.IDLE
                while not self._batch:
                    remaining = idle_until - time.monotonic()
                    if remaining <= 0:
                        self.alive = False
                        return
                    cond.wait(remaining)
                batch, self._batch = self._batch, []
            next_due = 0.0  # when this batch is next due; 0: at once (let the scheduler see)
            try:
                next_due = self._renew(batch)
            except Exception as exc:  # the thread must survive anything a backend does
                # Tried again shortly; the scheduler reports a lease lost at its deadline.
                expected = isinstance(exc, BackendError)
                logger.log(
                    logging.WARNING if expected else logging.ERROR,
                    "renewing %s failed, will retry: %s",
                    ", ".join(repr(lease.key) for lease in batch[:5]),
                    exc,
                    exc_info=not expected,
                )
                now = time.monotonic()
                for lease in batch:
                    lease._next_renewal = now + _retry_in(lease._spec.ttl)
                next_due = min(lease._next_renewal for lease in batch)
            finally:
                self._renewer._renewed(self, next_due)

    def _renew(self, leases: list[Lease]) -> float:
        """Renew ``leases`` in one request; return when the earliest of them is next due."""
        sent = time.monotonic()
        generations = [lease._generation for lease in leases]
        self._renewer.round_trips += 1
        results = self._backend.renew([lease._renew_request for lease in leases])
        for lease, generation, ok in zip(leases, generations, results, strict=True):
            if ok:
                lease._renewed(sent, generation)
            else:
                lease._mark_lost("renewal refused: the store no longer had it", generation)
        return sent + min(lease._spec.ttl for lease in leases) / 3


_next_renewal = operator.attrgetter("_next_renewal")


def _retry_in(ttl: float) -> float:
    """After a failed round trip, try again after this long."""
    return min(ttl * _RETRY_FRACTION, 1.0)


_renewer: Renewer | None = None
_renewer_lock = threading.Lock()


def get_renewer() -> Renewer:
    """Return this process's renewer, creating it on first use."""
    global _renewer
    renewer = _renewer
    if renewer is not None:  # the lock only for the first use (one lookup per lease made)
        return renewer
    with _renewer_lock:
        if _renewer is None:
            _renewer = Renewer()
        return _renewer


forking.replace_after_fork(sys.modules[__name__], "_renewer_lock", threading.Lock)
