"""Connections of the database and Memcached caches: one per thread and per process.

Shared by ``database.py`` (a Django database connection of our own per thread) and
``memcached.py`` (a pymemcache client per thread: they are not thread-safe).
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from ... import forking

__all__ = ["PerThread"]


class PerThread:
    """One connection (or client) per thread and per process, each used under its own lock.

    The lock is uncontended in normal use; it lets :meth:`close`, called from any thread,
    wait for a call in flight instead of closing a connection under it (SQLite crashes the
    process on that). A thread that ended leaves its connection behind; the next thread that
    opens one closes those first, so threads that come and go (a thread per request, per
    blocking acquire) never hold more connections than there are live threads. A forked
    child never touches its parent's connections (closing one there would end the parent's
    session): it opens its own and keeps the parent's referenced.
    """

    def __init__(self, make: Any, close: Any) -> None:
        self._make = make
        self._close = close
        self._local = threading.local()
        self._lock = threading.Lock()
        forking.replace_after_fork(self, "_lock", threading.Lock)
        self._slots: list[_Slot] = []

    @contextlib.contextmanager
    def use(self, broken: tuple[type[BaseException], ...] = ()) -> Iterator[Any]:
        """Yield this thread's connection; drop it when the block raises one of ``broken``."""
        pid = os.getpid()
        slot: _Slot | None = getattr(self._local, "slot", None)
        if slot is None or slot.pid != pid:
            slot = _Slot(pid, threading.current_thread())
            self._local.slot = slot
            with self._lock:
                ended = [s for s in self._slots if s.pid == pid and not s.thread_alive()]
                self._slots = [s for s in self._slots if s not in ended] + [slot]
            for old in ended:
                old.close(self._close, wait=False)
        with slot.lock:
            if slot.conn is None:
                slot.conn = self._make()
            try:
                yield slot.conn
            except broken:
                with contextlib.suppress(Exception):
                    self._close(slot.conn)
                slot.conn = None  # replaced at the next call
                raise

    def close(self) -> None:
        """Close every connection of this process (each after the call using it, if any)."""
        pid = os.getpid()
        with self._lock:
            slots = [slot for slot in self._slots if slot.pid == pid]
        for slot in slots:
            slot.close(self._close, wait=True)


class _Slot:
    """One thread's connection in one process, and the lock its calls hold."""

    __slots__ = ("conn", "lock", "pid", "thread")

    def __init__(self, pid: int, thread: threading.Thread) -> None:
        self.pid = pid
        self.thread = weakref.ref(thread)
        self.lock = threading.Lock()
        self.conn: Any = None

    def thread_alive(self) -> bool:
        thread = self.thread()
        return thread is not None and thread.is_alive()

    def close(self, close: Any, *, wait: bool) -> None:
        """Close the connection; without ``wait``, only if no call holds it."""
        if not self.lock.acquire(blocking=wait):
            return
        try:
            if self.conn is not None:
                with contextlib.suppress(Exception):
                    close(self.conn)
                self.conn = None
        finally:
            self.lock.release()
