"""The database cache (``django.core.cache.backends.db.DatabaseCache``): records as rows.

A lease key's record (see ``common.py``) is one row of the cache table; compare-and-swap is
``UPDATE ... WHERE cache_key = %s AND value = %s``, a first grant an ``INSERT``. The SQL is
below, one constant per statement.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from ...exceptions import BackendError
from .connections import PerThread

__all__ = [
    "SQL_CLEANUP",
    "SQL_CREATE",
    "SQL_READ",
    "SQL_SCAN",
    "SQL_SWAP",
    "DatabaseCells",
]

# -- SQL on the cache table: {t} the table, {k} cache_key, {v} value, {e} expires ----------
# (names quoted for the database at hand; %s are the parameters, in order)

#: Parameters: the cells ({marks}: one %s each). Returns (cache_key, value) rows.
SQL_READ = "SELECT {k}, {v} FROM {t} WHERE {k} IN ({marks})"
#: Parameters: cell, record, expires. Raises IntegrityError when the row exists already.
SQL_CREATE = "INSERT INTO {t} ({k}, {v}, {e}) VALUES (%s, %s, %s)"
#: Parameters: new record, expires, cell, the record as read. Changes 1 row, or 0 when the row
#: changed (or went) since it was read: the compare-and-swap.
SQL_SWAP = "UPDATE {t} SET {v} = %s, {e} = %s WHERE {k} = %s AND {v} = %s"
#: Parameters: a LIKE pattern (escape character !). Returns (cache_key, value) rows.
SQL_SCAN = "SELECT {k}, {v} FROM {t} WHERE {k} LIKE %s ESCAPE '!'"
#: Parameters: a LIKE pattern, now. Deletes our records past their retention.
SQL_CLEANUP = "DELETE FROM {t} WHERE {k} LIKE %s ESCAPE '!' AND {e} < %s"


# -- the database cache ---------------------------------------------------------------------


class DatabaseCells:
    """Records as rows of a ``DatabaseCache`` table, on connections of our own.

    Why our own connections (one per thread, autocommit) rather than Django's: a lease taken
    inside ``transaction.atomic()`` (``ATOMIC_REQUESTS``, a test case) on Django's connection
    would stay invisible to other processes until that transaction commits, and a rollback
    would undo a release. The row's ``value`` is the record's JSON and is the compare-and-swap
    version; ``expires`` is when the record's retention ends, in Django's format, so Django's
    own culling of expired entries removes idle records too.
    """

    def __init__(self, cache: Any, description: str) -> None:
        from django.db import router

        self.description = description
        self._table = cache._table
        self._db = router.db_for_write(cache.cache_model_class)
        self._conns = PerThread(self._connect, lambda conn: conn.close())

    def _connect(self) -> Any:
        from django.db import connections

        conn = connections.create_connection(self._db)
        conn.inc_thread_sharing()  # close() may run in another thread
        return conn

    @contextlib.contextmanager
    def _cursor(self, what: str) -> Iterator[tuple[Any, Any, Any]]:
        from django.db import DatabaseError

        try:
            with self._conns.use(broken=(DatabaseError,)) as conn, conn.cursor() as cursor:
                yield conn, cursor, conn.ops.quote_name
        except DatabaseError as exc:
            raise BackendError(f"{what} on {self.description} failed: {exc}") from exc

    def _sql(self, template: str, quote: Any, **extra: str) -> str:
        return template.format(
            t=quote(self._table),
            k=quote("cache_key"),
            v=quote("value"),
            e=quote("expires"),
            **extra,
        )

    def _expires(self, conn: Any, keep: float) -> Any:
        from django.conf import settings

        tz = timezone.utc if settings.USE_TZ else None
        return conn.ops.adapt_datetimefield_value(datetime.fromtimestamp(time.time() + keep, tz))

    def read(self, cell: str) -> tuple[str, Any] | None:
        return self.read_many([cell]).get(cell)

    def read_many(self, cells: Sequence[str]) -> dict[str, tuple[str, Any]]:
        out: dict[str, tuple[str, Any]] = {}
        with self._cursor("read") as (conn, cursor, quote):
            for n in range(0, len(cells), 500):
                chunk = list(cells[n : n + 500])
                marks = ", ".join(["%s"] * len(chunk))
                cursor.execute(
                    self._sql(SQL_READ, quote, marks=marks),
                    chunk,
                )
                for cell, value in cursor.fetchall():
                    value = conn.ops.process_clob(value)
                    out[cell] = (value, value)
        return out

    def create(self, cell: str, value: str, keep: float, *, listed: bool = True) -> bool:
        from django.db import IntegrityError

        with self._cursor("insert") as (conn, cursor, quote):
            try:
                cursor.execute(
                    self._sql(SQL_CREATE, quote),
                    [cell, value, self._expires(conn, keep)],
                )
            except IntegrityError:
                return False  # another process created it first
        return True

    def replace(self, cell: str, value: str, version: Any, keep: float) -> bool:
        return self.replace_many([(cell, value, version)], keep)[0]

    def replace_many(self, writes: Sequence[tuple[str, str, Any]], keep: float) -> list[bool]:
        if not writes:
            return []
        with self._cursor("update") as (conn, cursor, quote):
            sql = self._sql(SQL_SWAP, quote)
            expires = self._expires(conn, keep)
            if len(writes) == 1:
                cell, value, version = writes[0]
                cursor.execute(sql, [value, expires, cell, version])
                return [cursor.rowcount == 1]
            # Many renewals: one transaction, one commit.
            conn.set_autocommit(False)
            try:
                done = []
                for cell, value, version in writes:
                    cursor.execute(sql, [value, expires, cell, version])
                    done.append(cursor.rowcount == 1)
                conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.rollback()
                raise
            finally:
                with contextlib.suppress(Exception):
                    conn.set_autocommit(True)
            return done

    def scan(self, prefix: str) -> Iterator[tuple[str, str]]:
        pattern = _like_prefix(prefix)
        with self._cursor("scan") as (conn, cursor, quote):
            cursor.execute(
                self._sql(SQL_SCAN, quote),
                [pattern],
            )
            rows = cursor.fetchall()
            found = [(str(k), conn.ops.process_clob(v)) for k, v in rows]
        # LIKE ignores case on some databases (SQLite): compare exactly here.
        yield from ((k, v) for k, v in found if k.startswith(prefix))

    def cleanup(self, prefix: str) -> None:
        with self._cursor("cleanup") as (conn, cursor, quote):
            cursor.execute(
                self._sql(SQL_CLEANUP, quote),
                [_like_prefix(prefix), self._expires(conn, 0.0)],
            )

    def close(self) -> None:
        self._conns.close()


def _like_prefix(prefix: str) -> str:
    escaped = prefix.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped + "%"
