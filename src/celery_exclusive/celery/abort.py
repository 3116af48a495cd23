"""Interrupting a running task whose lease was lost (``on_lock_lost="abort"``).

The renewal thread learns that a lease is gone; the task runs in another thread (or greenlet).
:class:`Abort` raises :class:`LeaseLostAbort` in that thread, through
``PyThreadState_SetAsyncExc``, or through the gevent hub under the gevent pool.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
from typing import Any

__all__ = ["Abort", "LeaseLostAbort"]

logger = logging.getLogger(__name__)


class LeaseLostAbort(BaseException):
    """Raised asynchronously in a task's thread when its lease is lost (on_lock_lost=abort).

    A BaseException, so that a task's own ``except Exception`` does not swallow it; __call__
    turns it into a LeaseLost failure that says why.
    """


class Abort:
    """Interrupt the thread (or greenlet) that armed it, once, while armed.

    Timeline it guards: the renewal thread finds the lease gone and fires; the task gets
    LeaseLostAbort at its next bytecode (a thread) or its next switch (a gevent greenlet). If
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
        """Let :meth:`fire` interrupt the calling thread (or greenlet) from now on."""
        with self._lock:
            self._thread = threading.get_ident()
            self._greenlet = _current_greenlet()

    def disarm(self) -> None:
        """Stop interrupting; take back an interruption fired but not yet delivered."""
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
        """Interrupt the armed thread with :class:`LeaseLostAbort` (once; only while armed)."""
        with self._lock:
            if self._thread is None or self._fired:
                return
            self._fired = True
            self.reason = reason
            if self._greenlet is not None:
                self._pending = _throw_later(self._greenlet, LeaseLostAbort)
                return
            changed = _set_async_exc(self._thread, LeaseLostAbort)
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
