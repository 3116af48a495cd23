"""PostgreSQL waiters: one ``LISTEN`` connection per backend and process, read by a thread.

A release (and a force-release, a take) notifies the channel ``NOTIFY_CHANNEL`` with the
stored key as payload, in its own transaction; :class:`Listener` turns each notification into
a pending signal that one waiter of that key takes, as the Redis store's signal list does.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .postgres_sql import NOTIFY_CHANNEL

if TYPE_CHECKING:
    import psycopg

__all__ = ["LISTENER_IDLE", "SIGNAL_TTL", "Listener"]

logger = logging.getLogger(__name__)

#: A release signal nobody waited for is forgotten after this many seconds (as on Redis).
SIGNAL_TTL = 5.0

#: A listener connection nobody waited on for this long is closed (re-opened on demand).
LISTENER_IDLE = 300.0


class Listener:
    """One LISTEN connection per backend and process, read by a daemon thread.

    Each notification for a key adds a pending signal (kept ``SIGNAL_TTL`` seconds, at most
    64 per key, like the Redis signal list); a waiter for that key takes one. A waiter that
    starts the thread, or sees the connection re-established, returns True at once (a
    spurious wake-up): a release could have happened while nobody listened.
    """

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], description: str) -> None:
        self._connect = connect
        self._description = description
        self._cond = threading.Condition()
        self._pending: dict[str, list[float]] = {}
        self._epoch = 0  # bumped whenever LISTEN is (re-)established
        self._connected = False
        self._failed = False
        self._closed = False
        self._last_used = time.monotonic()
        self._thread: threading.Thread | None = None

    def wait(self, key: str, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a release of ``key``: True if one (maybe) came."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._last_used = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._connected = self._failed = False
                self._thread = threading.Thread(
                    target=self._run, name="celery-exclusive-listener", daemon=True
                )
                self._thread.start()
                while not (self._connected or self._failed):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(remaining)
                if self._connected:
                    return True  # listening now; the caller re-checks what it may have missed
            epoch = self._epoch
            while True:
                if self._take(key) or self._epoch != epoch:
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if not self._connected:
                    # No listener (the database is unreachable): re-check soon instead.
                    self._cond.wait(min(remaining, 0.2))
                    return False
                self._cond.wait(remaining)

    def _take(self, key: str) -> bool:
        """Consume one fresh signal for ``key`` (call with the condition held)."""
        stamps = self._pending.pop(key, None)
        if not stamps:
            return False
        cutoff = time.monotonic() - SIGNAL_TTL
        fresh = [t for t in stamps if t > cutoff]
        if len(fresh) > 1:
            self._pending[key] = fresh[1:]
        return bool(fresh)

    def _signal(self, key: str, count: int = 1) -> None:
        """Record ``count`` releases of ``key`` (each wakes one waiter)."""
        with self._cond:
            now = time.monotonic()
            if len(self._pending) > 10_000:
                self._pending = {
                    k: v for k, v in self._pending.items() if v and v[-1] > now - SIGNAL_TTL
                }
            stamps = self._pending.setdefault(key, [])
            stamps.extend([now] * min(count, 64))
            del stamps[:-64]
            self._cond.notify_all()

    def _run(self) -> None:
        backoff = 0.1
        while True:
            conn = None
            try:
                conn = self._connect()
                conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                with self._cond:
                    self._connected, self._failed = True, False
                    self._epoch += 1
                    self._cond.notify_all()
                backoff = 0.1
                if self._pump(conn):
                    return
            except Exception as exc:  # any failure: report, back off, reconnect
                logger.debug("listener on %s failed: %s", self._description, exc)
                with self._cond:
                    self._connected, self._failed = False, True
                    self._cond.notify_all()
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
            with self._cond:
                if self._closed or time.monotonic() - self._last_used > LISTENER_IDLE:
                    self._connected = False
                    return
                self._cond.wait(backoff)
            backoff = min(backoff * 2, 2.0)

    def _pump(self, conn: psycopg.Connection[Any]) -> bool:
        """Read notifications until closed or idle (True) or the connection fails (raises)."""
        pgconn = conn.pgconn
        while True:
            with self._cond:
                if self._closed or time.monotonic() - self._last_used > LISTENER_IDLE:
                    self._connected = False
                    return True
            readable, _, _ = select.select([pgconn.socket], [], [], 1.0)
            if not readable:
                continue
            pgconn.consume_input()  # raises OperationalError when the connection is gone
            while True:
                note = pgconn.notifies()
                if note is None:
                    break
                key, _, count = note.extra.decode("utf-8", "replace").partition("\n")
                self._signal(key, int(count) if count.isdigit() else 1)

    def close(self) -> None:
        """Stop the thread (its connection is closed on its way out)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(3.0)
