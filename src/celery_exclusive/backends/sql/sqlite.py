"""The SQLite store (the standard library's ``sqlite3``): leases in one file, for one host.

Every operation is one ``BEGIN IMMEDIATE`` transaction, so the processes sharing the file are
serialised by SQLite's one write lock; expiry is judged by the host's clock, read inside that
transaction. SQLite has no notification: :meth:`SQLiteBackend.wait` sleeps for at most
``SQLITE_POLL`` and the caller re-checks (a documented fallback). The statements are in
:mod:`.sqlite_sql`, the DDL in :mod:`.schema`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

from ...exceptions import BackendError, ConfigurationError, LimitMismatch
from ..base import (
    DEFAULT_FENCE_RETENTION,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    RenewRequest,
    parse_meta,
)
from ..url_options import Converter, parse_options, seconds
from .common import (
    DEFAULT_CLEANUP_INTERVAL,
    SCAN_PAGE,
    SHARED_DEFAULTS,
    _SQLBackend,
    shared_options,
)
from .schema import DEFAULT_TABLE, check_table, table_names
from .sqlite_sql import STATEMENTS

__all__ = ["DEFAULT_BUSY_TIMEOUT", "SQLITE_POLL", "SQLiteBackend"]

T = TypeVar("T")

#: SQLite has no notification: a waiter sleeps at most this long, then the caller re-checks.
SQLITE_POLL = 0.05

#: Seconds a transaction waits for the database's write lock, unless ``busy_timeout`` says.
DEFAULT_BUSY_TIMEOUT = 10.0

#: The store's own options: the shared ones, and ``busy_timeout``.
_OPTIONS: dict[str, Converter] = {**shared_options(schema_allowed=False), "busy_timeout": seconds}
_DEFAULTS: dict[str, Any] = {**SHARED_DEFAULTS, "busy_timeout": DEFAULT_BUSY_TIMEOUT}

#: Connections a forked child inherited: kept referenced so they are never closed in the child.
_inherited: list[object] = []


def _now_us() -> int:
    return time.time_ns() // 1000


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


def _other_limit(metas: Sequence[str], limit: int) -> int:
    """The limit another holder took the key under, if it is not ``limit`` (else 0).

    Each holder's limit is the ``limit`` of its metadata (holders written before it was
    recorded have none and match any limit).
    """
    for meta in metas:
        theirs = parse_meta(meta).get("limit")
        if isinstance(theirs, int) and theirs != limit:
            return theirs
    return 0


class SQLiteBackend(_SQLBackend):
    """Leases in one SQLite file, for the processes of **one host**.

    Expiry is judged by that host's clock. Every operation is one ``BEGIN IMMEDIATE``
    transaction (the database's single write lock), so processes sharing the file are
    serialised by SQLite itself; the file is in WAL mode with a busy timeout. Not for a
    network filesystem (SQLite's locks are not reliable there), and blocking waits poll
    (every ``SQLITE_POLL`` seconds): SQLite has no notification.

    ::

        store = connect("sqlite:////var/lib/myapp/leases.db")    # absolute path
        store = connect("sqlite:///leases.db")                    # relative to the cwd
    """

    scheme = "sqlite"

    def __init__(
        self,
        path: str,
        *,
        table: str = DEFAULT_TABLE,
        prefix: str = "",
        fence_retention: float = DEFAULT_FENCE_RETENTION,
        cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL,
        create_tables: bool = True,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        description: str | None = None,
    ) -> None:
        check_table(table, schema_allowed=False)
        super().__init__(
            table=table,
            prefix=prefix,
            fence_retention=fence_retention,
            cleanup_interval=cleanup_interval,
            create_tables=create_tables,
            description=description or f"sqlite:///{path}",
        )
        self.path = path
        self.busy_timeout = busy_timeout
        self._sql = {name: sql.format(**table_names(table)) for name, sql in STATEMENTS.items()}
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBackend:
        """Build a backend from ``sqlite:///relative/path.db`` or ``sqlite:////absolute.db``.

        Query parameters (or keyword ``options``, which win over the query): ``table``,
        ``prefix``, ``fence_retention``, ``cleanup_interval``, ``create_tables``,
        ``busy_timeout`` (seconds a transaction waits for the write lock; default 10).
        """
        scheme, _, rest = url.partition("://")
        path_part, _, query_text = rest.partition("?")
        if not path_part.startswith("/"):
            raise ConfigurationError(
                f"invalid SQLite URL {url!r}: expected sqlite:///relative/path.db or "
                "sqlite:////absolute/path.db"
            )
        path = unquote(path_part[1:])
        if not path:
            raise ConfigurationError(f"invalid SQLite URL {url!r}: no file path")
        shown = f"{scheme}:///{path}"
        ours, _ = parse_options(
            store="SQLite",
            shown_url=shown,
            options=_OPTIONS,
            defaults=_DEFAULTS,
            query=parse_qsl(query_text, keep_blank_values=True),
            keywords=options,
        )
        return cls(path, **ours, description=shown)

    def _check_pid(self) -> None:
        if os.getpid() != self._pid:
            # SQLite must not use a connection across fork(), nor close it in the child; and
            # the lock is replaced without taking it (another thread may have held it).
            if self._conn is not None:
                _inherited.append(self._conn)
            self._conn, self._pid, self._lock = None, os.getpid(), threading.Lock()

    def _connection(self) -> sqlite3.Connection:
        """The process's connection (call with ``self._lock`` held)."""
        if self._conn is None:
            conn = sqlite3.connect(
                self.path,
                timeout=self.busy_timeout,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # guarded by self._lock
            )
            try:
                self._enable_wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
                if self.create_tables and not self._ready:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in self._sql["ddl"].split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute("COMMIT")
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                self._ready = True
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch the file to WAL mode (once per file; kept by SQLite from then on).

        Processes opening a new file together race for the switch, and SQLite answers the
        losers "database is locked" at once, not after the busy timeout: retry until then.
        """
        deadline = time.monotonic() + self.busy_timeout
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def _tx(self, what: str, op: Callable[[sqlite3.Connection, int], T]) -> T:
        """Run ``op(conn, now_us)`` in one BEGIN IMMEDIATE transaction."""
        self._check_pid()
        with self._lock:
            try:
                conn = self._connection()
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = op(conn, _now_us())  # the clock is read holding the write lock
                    conn.execute("COMMIT")
                except BaseException:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise BackendError(f"{what} on {self._description} failed: {exc}") from exc
            return result

    # -- the contract ---------------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        k = self._k(key)
        sql = self._sql

        def op(conn: sqlite3.Connection, now: int) -> Grant | Conflict | LimitMismatch:
            conn.execute(sql["seed_counter"], (k, now, now))
            conn.execute(sql["drop_expired"], (k, now))
            metas = [m for (m,) in conn.execute(sql["others"], (k, token)).fetchall()]
            other_limit = _other_limit(metas, limit)
            if other_limit:
                return LimitMismatch(key=key, limit=other_limit, requested=limit)
            expires = now + _us(ttl)
            if conn.execute(sql["extend"], (expires, now, k, token, now)).rowcount:
                (fence,) = conn.execute(sql["fence_of"], (k, token)).fetchone()
                return Grant(fence=int(fence), reentered=True)
            if len(metas) < limit:
                conn.execute(sql["bump"], (now, k))
                (fence,) = conn.execute(sql["last_fence"], (k,)).fetchone()
                conn.execute(sql["insert"], (k, token, fence, expires, now, now, meta))
                return Grant(fence=int(fence))
            rows = conn.execute(sql["holders"], (k, now)).fetchall()
            holders = [self._holder_row((*r, now)) for r in rows]
            retry_in = max(min((h.expires_in for h in holders), default=0.0), 0.0)
            return Conflict(holders=holders, retry_in=retry_in)

        result = self._tx("acquire", op)
        if isinstance(result, LimitMismatch):
            raise result
        self._maybe_cleanup()
        return result

    def release(self, key: str, token: str) -> bool:
        k = self._k(key)

        def op(conn: sqlite3.Connection, now: int) -> bool:
            row = conn.execute(self._sql["expiry_of"], (k, token)).fetchone()
            if row is None:
                return False
            conn.execute(self._sql["release"], (k, token))
            return bool(row[0] > now)

        return self._tx("release", op)

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        if not requests:
            return []

        def op(conn: sqlite3.Connection, now: int) -> list[bool]:
            out = []
            for r in requests:
                args = (now + _us(r.ttl), now, self._k(r.key), r.token, now)
                out.append(conn.execute(self._sql["extend"], args).rowcount > 0)
            return out

        return self._tx("renew", op)

    def wait(self, key: str, timeout: float) -> bool:
        """Sleep ``min(timeout, SQLITE_POLL)`` and return False: SQLite cannot notify.

        The caller re-checks after every wait, so a release is noticed within
        ``SQLITE_POLL`` seconds (each check is one short write transaction).
        """
        if timeout > 0:
            time.sleep(min(timeout, SQLITE_POLL))
        return False

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        k = self._done_key(key)

        def op(conn: sqlite3.Connection, now: int) -> None:
            conn.execute(self._sql["mark_done"], (k, task_id, now + _us(ttl), now, now))

        self._tx("mark_done", op)

    def is_done(self, key: str, task_id: str) -> bool:
        k = self._done_key(key)

        def op(conn: sqlite3.Connection, now: int) -> bool:
            return conn.execute(self._sql["is_done"], (k, task_id, now)).fetchone() is not None

        return self._tx("is_done", op)

    def holders(self, key: str) -> list[Holder]:
        k = self._k(key)

        def op(conn: sqlite3.Connection, now: int) -> list[Holder]:
            rows = conn.execute(self._sql["holders"], (k, now)).fetchall()
            return [self._holder_row((*r, now)) for r in rows]

        return self._tx("holders", op)

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        def page(after_key: str, after_token: str, prefix: str) -> list[tuple[Any, ...]]:
            def op(conn: sqlite3.Connection, now: int) -> list[tuple[Any, ...]]:
                args = (after_key, after_key, after_token, len(prefix), prefix, now, SCAN_PAGE)
                return [(*r, now) for r in conn.execute(self._sql["scan"], args).fetchall()]

            return self._tx("scan", op)

        return self._scan_rows(match, page)

    def force_release(self, key: str, token: str | None = None) -> int:
        k = self._k(key)

        def op(conn: sqlite3.Connection, now: int) -> int:
            (live,) = conn.execute(self._sql["count_live"], (k, token, token, now)).fetchone()
            conn.execute(self._sql["force_release"], (k, token, token))
            return int(live)

        return int(self._tx("force_release", op))

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        args = (meta, self._k(key), token)
        return self._tx(
            "update_meta",
            lambda conn, now: conn.execute(self._sql["update_meta"], (*args, now)).rowcount > 0,
        )

    def hand_over(
        self, key: str, token: str, new_token: str, ttl: float, *, meta: str | None = None
    ) -> bool:
        k = self._k(key)

        def op(conn: sqlite3.Connection, now: int) -> bool:
            args = (new_token, meta, now + _us(ttl), now, k, token, now)
            return conn.execute(self._sql["hand_over"], args).rowcount > 0

        return self._tx("hand_over", op)

    def take(self, key: str, token: str) -> str | None:
        k = self._k(key)

        def op(conn: sqlite3.Connection, now: int) -> str | None:
            row = conn.execute(self._sql["meta_of"], (k, token)).fetchone()
            if row is None:
                return None
            conn.execute(self._sql["release"], (k, token))
            return str(row[1]) if row[0] > now else None

        return self._tx("take", op)

    def cleanup(self) -> None:
        """Delete expired holds and idle fence counters (see :meth:`_SQLBackend.cleanup`)."""

        def op(conn: sqlite3.Connection, now: int) -> None:
            conn.execute(self._sql["cleanup_leases"], (now,))
            conn.execute(self._sql["cleanup_fences"], (now - _us(self.fence_retention),))

        self._tx("cleanup", op)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None and os.getpid() == self._pid:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _holder_row(self, row: Sequence[Any]) -> Holder:
        token, fence, expires, acquired, renewed, meta, now = row
        return Holder.stored(
            token, fence, expires, acquired, renewed, meta, now=now, per_second=1e6
        )
