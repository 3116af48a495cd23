"""Releases that failed, sent again from a background thread until they succeed or expire.

(The same thread sends the other writes that must not hold up their caller and may be tried a
few times: :meth:`Releaser.send_later`, used to count lost leases for ``stats``.)

A release is owner-safe (the store frees a key only for the token that holds it), so sending
it late is harmless. Losing it is not: a lease whose release failed in a store blip stays held
until its ttl runs out, and for an enqueue lease that is ``queue_ttl`` (an hour), during which
every call of the key is answered with the old task. So a release that raised
:class:`BackendError` is handed to :func:`release_later`::

    t=0     release fails (store unreachable)      -> queued here, until the lease's expiry
    t=0.2   tried again, fails                     -> next try after 0.4 s, then 0.8 s, ... 5 s
    t=3     the store answers: released            -> a waiter on the key is woken as usual
    t>=exp  never answered until the expiry        -> dropped: the store has freed it anyway

:meth:`Releaser.cancel` forgets a queued release when its owner takes the key again (a task's
retry takes its enqueue lease again with the same task id). At interpreter exit each queued
release is tried once more. In a forked child the queue starts empty (it is the parent's).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import forking
from .exceptions import BackendError

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = ["Releaser", "get_releaser", "release_later"]

logger = logging.getLogger(__name__)

#: First and longest pause between two tries of one release.
FIRST_RETRY = 0.2
MAX_RETRY = 5.0


@dataclass
class _Pending:
    send: Callable[[], object]  # the write; done unless it raises
    what: str  # for the log
    until: float  # monotonic: given up by then (a lease has expired: nothing left to release)
    at: float  # monotonic: next try
    pause: float = FIRST_RETRY


class Releaser:
    """Tries queued releases again from one daemon thread (started on first use)."""

    def __init__(self) -> None:
        self._reset_after_fork()
        forking.call_after_fork(self, Releaser._reset_after_fork)

    def _reset_after_fork(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[object, _Pending] = {}
        self._thread: threading.Thread | None = None

    def release_later(self, backend: Backend, key: str, token: str, expires_in: float) -> None:
        """Send ``release(key, token)`` again until it succeeds or ``expires_in`` s passed."""

        def release() -> None:
            released = backend.release(key, token)
            logger.info(
                "released %r, whose release had failed%s",
                key,
                "" if released else " (it had expired meanwhile)",
            )

        self.send_later(
            release,
            f"releasing {key!r}",
            expires_in=expires_in,
            first_try=FIRST_RETRY,
            ident=(id(backend), key, token),
        )

    def send_later(
        self,
        send: Callable[[], object],
        what: str,
        *,
        expires_in: float,
        first_try: float = 0.0,
        ident: object = None,
    ) -> None:
        """Call ``send()`` from the background thread in ``first_try`` s, and again with
        backoff while it raises, for at most ``expires_in`` s. A later call with the same
        ``ident`` replaces it (a release is named by its lease, which :meth:`cancel` uses)."""
        now = time.monotonic()
        entry = _Pending(send, what, until=now + expires_in, at=now + first_try)
        with self._cond:
            self._pending[object() if ident is None else ident] = entry
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="celery-exclusive-releaser", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def cancel(self, backend: Backend, key: str, token: str) -> None:
        """Forget a queued release of ``key`` by ``token`` (its owner holds the key again)."""
        if self._pending:  # the common case costs one attribute read
            with self._cond:
                self._pending.pop((id(backend), key, token), None)

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self) -> None:
        """Try every queued release (and other write) once now (at exit); forget them."""
        with self._cond:
            pending, self._pending = list(self._pending.values()), {}
        for entry in pending:
            self._try(entry)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [(i, e) for i, e in self._pending.items() if e.at <= now]
                if not due:
                    if not self._pending:
                        self._cond.wait(60.0)
                        if not self._pending:
                            self._thread = None
                            return
                        continue
                    self._cond.wait(min(e.at for e in self._pending.values()) - now)
                    continue
            for ident, entry in due:
                done = self._try(entry)
                with self._cond:
                    if self._pending.get(ident) is not entry:
                        continue  # cancelled, or queued anew meanwhile
                    now = time.monotonic()
                    if done or now >= entry.until:
                        del self._pending[ident]
                    else:
                        entry.pause = min(entry.pause * 2, MAX_RETRY)
                        entry.at = min(now + entry.pause, entry.until)

    @staticmethod
    def _try(entry: _Pending) -> bool:
        try:
            entry.send()
        except BackendError as exc:
            logger.debug("%s failed again: %s", entry.what, exc)
            return False
        except Exception:  # the thread must survive anything a backend does
            logger.exception("%s failed", entry.what)
            return False
        return True


_releaser: Releaser | None = None
_releaser_lock = threading.Lock()


def get_releaser() -> Releaser:
    """Return this process's releaser, creating it on first use."""
    global _releaser
    with _releaser_lock:
        if _releaser is None:
            _releaser = Releaser()
            atexit.register(_releaser.flush)
        return _releaser


def release_later(backend: Backend, key: str, token: str, expires_in: float) -> None:
    """Queue ``release(key, token)`` on this process's :class:`Releaser`."""
    get_releaser().release_later(backend, key, token, expires_in)


forking.replace_after_fork(sys.modules[__name__], "_releaser_lock", threading.Lock)
