"""The PostgreSQL store (psycopg 3): leases as rows, server time, one round trip per operation.

Every operation is one transaction and one round trip: a single statement, or a pipelined
``BEGIN; ...; COMMIT``. Expiry is judged by the server's ``clock_timestamp()``. An acquire first
upserts the key's fence-counter row (``INSERT ... ON CONFLICT DO UPDATE``), which locks it until
the transaction ends: grants of one key are serialised, with no advisory lock and no session
state (so it works through PgBouncer in transaction mode). A new counter is seeded from the
database clock in microseconds, so fences keep rising even after an idle key's counter row was
cleaned up. Waiters ``LISTEN`` (:mod:`.listener`). The statements are in :mod:`.postgres_sql`,
the DDL in :mod:`.schema`; see ``docs/sql.md`` for the reasoning.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

from ...exceptions import BackendError, ConfigurationError, LimitMismatch
from ..base import (
    DEFAULT_FENCE_RETENTION,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    RenewRequest,
    redact_url,
)
from ..url_options import Converter, parse_options, query_items, text
from .common import (
    DEFAULT_CLEANUP_INTERVAL,
    SCAN_PAGE,
    SHARED_DEFAULTS,
    _SQLBackend,
    renew_plan,
    shared_options,
)
from .listener import Listener
from .postgres_sql import NOTIFY_CHANNEL, PG_DDL_LOCK, PG_TABLES_EXIST, STATEMENTS
from .schema import DEFAULT_TABLE, check_table, table_names

if TYPE_CHECKING:
    import psycopg

__all__ = ["MAX_IDLE_CONNECTIONS", "PostgresBackend"]

T = TypeVar("T")

#: Connections kept open per PostgreSQL backend between operations.
MAX_IDLE_CONNECTIONS = 4

#: The store's own options: the shared ones, and ``listen_url`` (a keyword argument only).
_OPTIONS: dict[str, Converter] = {**shared_options(schema_allowed=True), "listen_url": text}

# libpq settings applied unless the URL sets them: a database that cannot be reached must not
# hold its renewal sender for long (the loss is reported at the lease's deadline anyway).
_PG_DEFAULTS = {
    "connect_timeout": "5",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "application_name": "celery-exclusive",
}


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise ConfigurationError(
            "the PostgreSQL store needs psycopg 3: pip install 'celery-exclusive[postgres]'"
        ) from exc
    return psycopg


def _pg_params(url_or_params: str | dict[str, str]) -> dict[str, str]:
    psycopg = _import_psycopg()
    if isinstance(url_or_params, str):
        try:
            params: dict[str, str] = psycopg.conninfo.conninfo_to_dict(url_or_params)
        except psycopg.Error as exc:
            raise ConfigurationError(
                f"invalid PostgreSQL URL {redact_url(url_or_params)!r}: {exc}"
            ) from exc
    else:
        params = dict(url_or_params)
    for name, value in _PG_DEFAULTS.items():
        params.setdefault(name, value)
    if psycopg.pq.version() >= 120000:  # libpq 12+ knows tcp_user_timeout
        params.setdefault("tcp_user_timeout", "15000")
    return params


def _libpq_option(name: str) -> bool:
    """Tell ``parse_options`` that a query item not ours is libpq's: every one is.

    libpq itself refuses a name it does not know when the URL is parsed (``invalid PostgreSQL
    URL``, a ConfigurationError). Its keyword list is not the whole story (a URI also takes
    aliases such as ``ssl=true``), so it is libpq's parser that judges, not a copy of its list.
    """
    return True


class PostgresBackend(_SQLBackend):
    """Leases in PostgreSQL (9.5+ for ``ON CONFLICT``; 11+ for listings), through psycopg 3.

    Build it from a URL with :func:`celery_exclusive.connect`::

        store = connect("postgresql://user:pass@db.example.com:5432/app")
        store = connect("postgresql://.../app?table=my_leases")   # another table name

    Operations use a small pool of autocommit connections (server-side prepared statements
    off, for PgBouncer); blocking waits use one more connection that ``LISTEN`` s on
    ``celery_exclusive``. In a forked child both are opened afresh.
    """

    scheme = "postgresql"

    def __init__(
        self,
        conninfo: str | dict[str, str],
        *,
        table: str = DEFAULT_TABLE,
        prefix: str = "",
        fence_retention: float = DEFAULT_FENCE_RETENTION,
        cleanup_interval: float = DEFAULT_CLEANUP_INTERVAL,
        create_tables: bool = True,
        listen_conninfo: str | dict[str, str] | None = None,
        description: str | None = None,
    ) -> None:
        self._psycopg = _import_psycopg()
        check_table(table, schema_allowed=True)
        super().__init__(
            table=table,
            prefix=prefix,
            fence_retention=fence_retention,
            cleanup_interval=cleanup_interval,
            create_tables=create_tables,
            description=description or "postgresql",
        )
        self._params = _pg_params(conninfo)
        self._listen_params = _pg_params(listen_conninfo) if listen_conninfo else self._params
        names = table_names(table)
        self._lease_name, self._fence_name = names["lease"], names["fence"]
        self._sql = {name: sql.format(**names) for name, sql in STATEMENTS.items()}
        self._errors: tuple[type[BaseException], ...] = (self._psycopg.Error, OSError)
        self._pool_lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._listener: Listener | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresBackend:
        """Build a backend from a ``postgresql://`` or ``postgres://`` URL.

        Query parameters ``table``, ``prefix``, ``fence_retention``, ``cleanup_interval``
        and ``create_tables`` are ours (they may also be passed as keyword ``options``, as
        may ``listen_url``: a direct connection for ``LISTEN`` when the URL goes through
        PgBouncer in transaction mode); the others go to libpq (``sslmode``, ...). A keyword
        wins over the same option in the query.
        """
        shown = redact_url(url)
        query = query_items(url)
        # listen_url is itself a URL (with a password and a query of its own): a keyword only,
        # as documented, rather than a query item that would need escaping inside this one.
        if any(name == "listen_url" for name, _ in query):
            raise ConfigurationError(
                f"PostgreSQL store {shown!r}: listen_url is a keyword argument only, "
                "not a URL query option"
            )
        ours, rest = parse_options(
            store="PostgreSQL",
            shown_url=shown,
            options=_OPTIONS,
            defaults=SHARED_DEFAULTS,
            query=query,
            keywords=options,
            foreign=_libpq_option,
        )
        listen_url = ours.pop("listen_url", None)
        # Rebuilt by hand: urlunsplit turns postgresql:///db into postgresql:/db, and libpq
        # decodes %20 but not the + that urlencode writes for a space by default.
        base = url.split("#", 1)[0].split("?", 1)[0]
        plain = base + ("?" + urlencode(rest, quote_via=quote) if rest else "")
        return cls(plain, **ours, listen_conninfo=listen_url, description=shown)

    # -- connections ----------------------------------------------------------------------

    def _new_connection(self, params: dict[str, str]) -> psycopg.Connection[Any]:
        conn: psycopg.Connection[Any] = self._psycopg.connect(
            **params, autocommit=True, prepare_threshold=None
        )
        return conn

    def _check_pid(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            # A forked child: the parent's connections are the parent's. Drop them unclosed
            # (psycopg never closes a connection in a process that did not open it), and
            # replace the locks without taking them: another thread may have held one at fork.
            self._pool_lock = threading.Lock()
            self._setup_lock = threading.Lock()
            self._idle = []
            self._listener = None
            self._pid = pid

    @staticmethod
    def _usable(conn: psycopg.Connection[Any]) -> bool:
        """False for a pooled connection known or likely to be dead (no round trip)."""
        if conn.closed or conn.broken:
            return False
        try:
            readable, _, _ = select.select([conn.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        # An idle connection has nothing to read unless the server closed it (or sent a
        # notice, which is rare enough to cost a reconnect).
        return not readable

    def _run(self, what: str, op: Callable[[psycopg.Connection[Any]], T]) -> T:
        self._check_pid()
        conn: psycopg.Connection[Any] | None = None
        try:
            with self._pool_lock:
                while self._idle and conn is None:
                    candidate = self._idle.pop()
                    if self._usable(candidate):
                        conn = candidate
                    else:
                        with contextlib.suppress(Exception):
                            candidate.close()
            if conn is None:
                conn = self._new_connection(self._params)
            if not self._ready:
                self._setup(conn)
            result = op(conn)
        except self._errors as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            raise BackendError(f"{what} on {self._description} failed: {exc}") from exc
        with self._pool_lock:
            if len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(conn)
                conn = None
        if conn is not None:
            conn.close()
        return result

    def _setup(self, conn: psycopg.Connection[Any]) -> None:
        with self._setup_lock:
            if self._ready:
                return
            if self.create_tables:
                names = {"lease": self._lease_name, "fence": self._fence_name}
                row = conn.execute(PG_TABLES_EXIST, names).fetchone()
                if row is None or not all(row):
                    with conn.transaction():
                        conn.execute(PG_DDL_LOCK)
                        conn.execute(self._sql["ddl"])
            self._ready = True

    # -- the contract ---------------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        # ``wait`` is not needed: a release always notifies (NOTIFY costs nothing unheard).
        params = {
            "key": self._k(key),
            "token": token,
            "ttl": float(ttl),
            "limit": int(limit),
            "meta": meta,
        }

        def op(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            with conn.pipeline():
                conn.execute("BEGIN")
                conn.execute(self._sql["lock_counter"], params)
                conn.execute(self._sql["drop_expired"], params)
                cur = conn.execute(self._sql["grant"], params)
                conn.execute("COMMIT")
            return cur.fetchall()

        rows = self._run("acquire", op)
        self._maybe_cleanup()
        if rows and rows[0][0] in ("granted", "reentered"):
            return Grant(fence=int(rows[0][1]), reentered=rows[0][0] == "reentered")
        if rows and rows[0][0] == "mismatch":
            raise LimitMismatch(key=key, limit=int(rows[0][1]), requested=limit)
        holders = [self._holder_row((r[2], r[1], *r[3:])) for r in rows]
        retry_in = max(min((h.expires_in for h in holders), default=0.0), 0.0)
        return Conflict(holders=holders, retry_in=retry_in)

    def release(self, key: str, token: str) -> bool:
        params = {"key": self._k(key), "token": token, "channel": NOTIFY_CHANNEL}
        row = self._run(
            "release", lambda conn: conn.execute(self._sql["release"], params).fetchone()
        )
        return bool(row and row[0])

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        if not requests:
            return []
        unique, where = renew_plan(requests, self._k)
        params = {
            "keys": [u[0] for u in unique],
            "tokens": [u[1] for u in unique],
            "ttls": [float(u[2]) for u in unique],
        }
        rows = self._run("renew", lambda conn: conn.execute(self._sql["renew"], params).fetchall())
        renewed = {int(r[0]) - 1 for r in rows}
        return [at in renewed for at in where]

    def wait(self, key: str, timeout: float) -> bool:
        if timeout <= 0:
            return False
        self._check_pid()
        with self._pool_lock:
            if self._listener is None:
                params = self._listen_params
                self._listener = Listener(lambda: self._new_connection(params), self._description)
            listener = self._listener
        return listener.wait(self._k(key), timeout)

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        params = {"key": self._done_key(key), "token": task_id, "ttl": float(ttl)}
        self._run("mark_done", lambda conn: conn.execute(self._sql["mark_done"], params))

    def is_done(self, key: str, task_id: str) -> bool:
        params = {"key": self._done_key(key), "token": task_id}
        row = self._run(
            "is_done", lambda conn: conn.execute(self._sql["is_done"], params).fetchone()
        )
        return row is not None

    def holders(self, key: str) -> list[Holder]:
        params = {"key": self._k(key)}
        rows = self._run(
            "holders", lambda conn: conn.execute(self._sql["holders"], params).fetchall()
        )
        return [self._holder_row(r) for r in rows]

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        def page(after_key: str, after_token: str, prefix: str) -> list[tuple[Any, ...]]:
            params = {
                "after_key": after_key,
                "after_token": after_token,
                "prefix": prefix,
                "page": SCAN_PAGE,
            }
            return self._run(
                "scan", lambda conn: conn.execute(self._sql["scan"], params).fetchall()
            )

        return self._scan_rows(match, page)

    def force_release(self, key: str, token: str | None = None) -> int:
        params = {"key": self._k(key), "token": token, "channel": NOTIFY_CHANNEL}
        row = self._run(
            "force_release",
            lambda conn: conn.execute(self._sql["force_release"], params).fetchone(),
        )
        return int(row[0]) if row else 0

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        params = {"key": self._k(key), "token": token, "meta": meta}
        row = self._run(
            "update_meta", lambda conn: conn.execute(self._sql["update_meta"], params).fetchone()
        )
        return row is not None

    def hand_over(
        self, key: str, token: str, new_token: str, ttl: float, *, meta: str | None = None
    ) -> bool:
        params = {
            "key": self._k(key),
            "token": token,
            "new_token": new_token,
            "ttl": ttl,
            "meta": meta,
        }
        row = self._run(
            "hand_over", lambda conn: conn.execute(self._sql["hand_over"], params).fetchone()
        )
        return row is not None

    def take(self, key: str, token: str) -> str | None:
        params = {"key": self._k(key), "token": token, "channel": NOTIFY_CHANNEL}
        row = self._run("take", lambda conn: conn.execute(self._sql["take"], params).fetchone())
        return str(row[1]) if row and row[0] else None

    def cleanup(self) -> None:
        """Delete expired holds and idle fence counters (see :meth:`_SQLBackend.cleanup`)."""
        params = {"retention": self.fence_retention}

        def op(conn: psycopg.Connection[Any]) -> None:
            conn.execute(self._sql["cleanup_leases"])
            conn.execute(self._sql["cleanup_fences"], params)

        self._run("cleanup", op)

    def close(self) -> None:
        with self._pool_lock:
            idle, self._idle = self._idle, []
            listener, self._listener = self._listener, None
        if os.getpid() != self._pid:
            return  # a forked child never closes its parent's connections
        for conn in idle:
            with contextlib.suppress(Exception):
                conn.close()
        if listener is not None:
            listener.close()

    def _holder_row(self, row: Sequence[Any]) -> Holder:
        token, fence, expires_in, acquired, renewed, meta = row
        return Holder.stored(token, fence, expires_in, acquired, renewed, meta)
