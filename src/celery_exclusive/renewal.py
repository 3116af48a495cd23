"""One renewal thread per process, renewing every held lease in one round trip per store.

Each lease wants renewing every ``ttl / 3``. When the thread wakes for the earliest one, it
also renews every other lease of the same store that falls due within the next ``ttl / 6``,
so leases drift into step and a process holding 1,000 leases sends one request per interval,
not 1,000.

What happens when renewal fails::

    refused (the store says the token no longer holds the key)  -> lost at once
    store unreachable (BackendError)                              -> retried shortly; lost
                                                                     once the local deadline
                                                                     (ttl after the last
                                                                     successful renewal was
                                                                     sent) has passed
    max_hold reached                                               -> renewal stops (WARNING);
                                                                     the lease expires by itself

The thread is created lazily in the process that first holds a lease, and a forked child
starts with a fresh, empty renewer: a thread does not survive ``fork()`` and the parent's
leases are the parent's to renew (Celery prefork children are forked from the worker).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from .backends.base import RenewRequest
from .exceptions import BackendError

if TYPE_CHECKING:
    from .backends.base import Backend
    from .lease import Lease

__all__ = ["Renewer", "get_renewer"]

logger = logging.getLogger(__name__)

#: After a failed round trip, try again after this fraction of the ttl (at most 1 s).
_RETRY_FRACTION = 0.1


class Renewer:
    """Renews registered leases from one daemon thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._leases: dict[int, Lease] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the thread will next wake by itself (monotonic)
        # With nothing to renew the thread still wakes every so often (the shortest renewal
        # interval seen), so that a short task's lease, due after that, need not wake it.
        self._idle_interval = 60.0
        self.round_trips = 0  # renewal requests sent, for tests and benchmarks

    def add(self, lease: Lease) -> None:
        """Start renewing ``lease`` (idempotent)."""
        with self._cond:
            self._leases[id(lease)] = lease
            self._idle_interval = min(self._idle_interval, max(lease.ttl / 3, 0.05))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="celery-exclusive-renewer", daemon=True
                )
                self._thread.start()
            # Wake the thread only if this lease is due before it would wake anyway: with
            # many leases held, waking it (and its scan) on every acquire costs every acquire.
            if lease.next_renewal < self._wake_at:
                self._cond.notify()

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

    def _run(self) -> None:
        while True:
            try:
                due = self._wait_for_due()
                self._renew(due)
            except Exception:  # the thread must survive anything a backend does
                logger.exception("lease renewal round failed")
                time.sleep(0.1)

    def _wait_for_due(self) -> list[Lease]:
        with self._cond:
            while True:
                now = time.monotonic()
                if not self._leases:
                    self._wake_at = now + self._idle_interval
                    self._cond.wait(self._idle_interval)
                    continue
                earliest = min(lease.next_renewal for lease in self._leases.values())
                if earliest <= now:
                    self._wake_at = 0.0  # busy renewing: a new lease waits for the next round
                    return [
                        lease
                        for lease in self._leases.values()
                        if lease.next_renewal <= now + lease.ttl / 6
                    ]
                self._wake_at = earliest
                self._cond.wait(earliest - now)

    def _renew(self, due: list[Lease]) -> None:
        by_backend: dict[int, list[Lease]] = defaultdict(list)
        now = time.monotonic()
        for lease in due:
            if lease.past_max_hold(now):
                self.discard(lease)
                logger.warning(
                    "lease on %r reached max_hold=%s s: renewal stopped, it expires within %s s",
                    lease.key,
                    lease.max_hold,
                    lease.ttl,
                )
                continue
            by_backend[id(lease.backend)].append(lease)
        for leases in by_backend.values():
            self._renew_batch(leases[0].backend, leases)

    def _renew_batch(self, backend: Backend, leases: list[Lease]) -> None:
        sent = time.monotonic()
        generations = [lease.generation for lease in leases]
        self.round_trips += 1
        try:
            results = backend.renew([RenewRequest(le.key, le.token, le.ttl) for le in leases])
        except BackendError as exc:
            now = time.monotonic()
            for lease, generation in zip(leases, generations, strict=True):
                if not lease.held:
                    lease.mark_lost(f"could not renew before it expired: {exc}", generation)
                else:
                    lease.next_renewal = now + min(lease.ttl * _RETRY_FRACTION, 1.0)
                    logger.warning("renewing %r failed, will retry: %s", lease.key, exc)
            return
        for lease, generation, ok in zip(leases, generations, results, strict=True):
            if ok:
                lease.renewed(sent, generation)
            else:
                lease.mark_lost("renewal refused: the store no longer had it", generation)


_renewer: Renewer | None = None
_renewer_lock = threading.Lock()


def get_renewer() -> Renewer:
    """Return this process's renewer, creating it on first use."""
    global _renewer
    with _renewer_lock:
        if _renewer is None:
            _renewer = Renewer()
        return _renewer


def _after_fork_in_child() -> None:
    global _renewer, _renewer_lock
    _renewer = None
    _renewer_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
