"""Fences your database can enforce: refuse a write whose fence is below one already accepted.

A lease cannot stop a holder that was paused past its ttl from writing when it resumes (see
docs/guarantees.md, "Where a lease alone is not enough: pauses")::

    t=0    A acquires "sync:42" (fence 7), ttl 30 s
    t=1    A's process is paused: a long GC, SIGSTOP, a VM migration
    t=30   A's lease expires; B acquires (fence 8) and writes with fence 8
    t=45   A resumes and writes with fence 7

The resource can: it remembers the highest fence it accepted and refuses a lower one. Two
ways, both one statement in the transaction of your write (docs/fencing.md):

1. **A fence table** for any resource (a file, a remote API, a set of rows)::

       with conn.transaction():
           accept_fence(conn, "sync:42", lease.fence)    # StaleFence if a higher one won
           conn.execute("UPDATE report SET ...")        # your write, same transaction

2. **A fence column** on the row you write::

       UPDATE account SET balance = %(balance)s, fence = %(fence)s
        WHERE id = %(id)s AND fence <= %(fence)s        -- 0 rows: missing or stale

``<=``, not ``<``: a holder may write several times with its one fence.

Why this is safe under concurrency (PostgreSQL, READ COMMITTED or stricter): the statement
locks the resource's row until your transaction ends. Writers with fences 7 and 8 at once::

    T8  accept_fence(8): row locked, fence 8 (uncommitted)
    T7  accept_fence(7): waits for T8's row lock
    T8  writes, COMMIT
    T7  ON CONFLICT DO UPDATE re-reads the row's newest version: 8 <= 7 is false, no row
        changed -> StaleFence; T7 rolls back and its write never happens

In the other order, T8 waits for T7 and then accepts 8 over 7. A new resource behaves the
same: the second INSERT waits for the first one's commit, then takes the conflict path.
So the writes that commit, in commit order, carry fences that never go down. SQLite
serialises all writers, which gives the same order. Under REPEATABLE READ or SERIALIZABLE,
T7 gets a serialization failure instead of StaleFence in this race (it is refused either way;
a retry with fence 7 then gets StaleFence).

This module needs no driver import: it takes a psycopg 3 connection or cursor (``%(name)s``
parameters). The Django versions are in :mod:`celery_exclusive.contrib.django.fencing`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from .exceptions import ConfigurationError, StaleFence

__all__ = [
    "ACCEPT_FENCE_SQL",
    "CREATE_FENCE_TABLE_SQL",
    "CURRENT_FENCE_SQL",
    "FENCE_TABLE",
    "accept_fence",
    "create_fence_table",
    "fence_sql",
    "valid_fence",
    "valid_resource",
]

#: The fence table's default name.
FENCE_TABLE = "exclusive_fence"

#: Creates the fence table (PostgreSQL and SQLite). ``{table}``: the quoted table name.
CREATE_FENCE_TABLE_SQL = """\
CREATE TABLE IF NOT EXISTS {table} (
    resource text PRIMARY KEY,
    fence bigint NOT NULL CHECK (fence >= 0)
)"""

#: Records ``fence`` as the highest accepted for ``resource``, unless a higher one was.
#: Parameters: ``%(resource)s``, ``%(fence)s``; ``{table}``: the quoted table name.
#: Changes one row (rowcount 1) when accepted: the resource is new, or its fence was <= this
#: one; changes nothing (rowcount 0) when refused. The row stays locked until the transaction
#: ends, so concurrent writers of one resource go one at a time (module docstring).
ACCEPT_FENCE_SQL = """\
INSERT INTO {table} (resource, fence) VALUES (%(resource)s, %(fence)s)
ON CONFLICT (resource) DO UPDATE SET fence = EXCLUDED.fence
WHERE {table}.fence <= EXCLUDED.fence"""

#: The highest fence accepted for ``%(resource)s`` (no row: none yet).
CURRENT_FENCE_SQL = "SELECT fence FROM {table} WHERE resource = %(resource)s"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BIGINT_MAX = 2**63 - 1


def valid_fence(fence: object) -> int:
    """Return ``fence`` if it is an ``int`` from 0 to 2**63 - 1 (not a bool).

    Raises :class:`ConfigurationError` (a ``ValueError``) otherwise, saying what was given.
    """
    if fence is None:
        raise ConfigurationError(
            "fence is None: pass lease.fence of a granted lease (it is None until acquired)"
        )
    if isinstance(fence, bool) or not isinstance(fence, int):
        raise ConfigurationError(
            f"fence must be an int (lease.fence), not {type(fence).__name__} {fence!r}"
        )
    if not 0 <= fence <= _BIGINT_MAX:
        raise ConfigurationError(f"fence must be from 0 to 2**63 - 1, not {fence}")
    return fence


def valid_resource(resource: object) -> str:
    """Return ``resource`` if it is a non-empty ``str``; else :class:`ConfigurationError`."""
    if not isinstance(resource, str) or not resource:
        raise ConfigurationError(f"resource must be a non-empty str, not {resource!r}")
    return resource


def fence_sql(template: str, table: str = FENCE_TABLE) -> str:
    """Return one of this module's SQL templates for ``table`` (``name`` or ``schema.name``).

    The name is double-quoted; anything but letters, digits and ``_`` is refused
    (:class:`ConfigurationError`), so a table name never carries SQL.
    """
    parts = table.split(".") if isinstance(table, str) else []
    if not 1 <= len(parts) <= 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise ConfigurationError(f"table must be a name or schema.name, not {table!r}")
    return template.format(table=".".join(f'"{p}"' for p in parts))


@contextlib.contextmanager
def _cursor(conn_or_cursor: Any) -> Iterator[tuple[Any, Any]]:
    """The (connection, cursor) of a psycopg connection or cursor (a new cursor, closed after)."""
    if hasattr(conn_or_cursor, "fetchone"):  # a cursor: the caller's, left open
        yield conn_or_cursor.connection, conn_or_cursor
        return
    with conn_or_cursor.cursor() as cur:
        yield conn_or_cursor, cur


def _require_transaction(conn: Any) -> None:
    # In autocommit mode outside `with conn.transaction()`, the fence row would be committed
    # (and unlocked) at once, before the write it guards: a stale writer that reads the fence
    # before the new holder's write commits would not be stopped.
    if getattr(conn, "autocommit", False) and int(conn.info.transaction_status) == 0:
        raise ConfigurationError(
            "accept_fence must run in the transaction of the write it guards: use "
            "`with conn.transaction():` (or a connection without autocommit)"
        )


def create_fence_table(conn_or_cursor: Any, *, table: str = FENCE_TABLE) -> None:
    """Create the fence table if it does not exist (``resource text``, ``fence bigint``).

    Or run :data:`CREATE_FENCE_TABLE_SQL` in your own migration.
    """
    with _cursor(conn_or_cursor) as (_, cur):
        cur.execute(fence_sql(CREATE_FENCE_TABLE_SQL, table))


def accept_fence(
    conn_or_cursor: Any, resource: str, fence: int, *, table: str = FENCE_TABLE
) -> None:
    """Record ``fence`` for ``resource`` in the current transaction, or raise StaleFence.

    Call it in the transaction of your write, before the write::

        with store.lease("sync:42") as lease, conn.transaction():
            accept_fence(conn, "sync:42", lease.fence)
            conn.execute("UPDATE report SET body = %s WHERE id = 42", (body,))

    Accepted when ``resource`` is new or its highest accepted fence is <= ``fence`` (the same
    fence twice is accepted). Otherwise nothing is changed and :class:`StaleFence` is raised
    (with ``current``, the highest accepted fence); leaving the block with it rolls the
    transaction back. ``conn_or_cursor`` is a psycopg 3 connection or cursor; ``table`` must
    exist (:func:`create_fence_table`).
    """
    resource = valid_resource(resource)
    fence = valid_fence(fence)
    params = {"resource": resource, "fence": fence}
    with _cursor(conn_or_cursor) as (conn, cur):
        _require_transaction(conn)
        cur.execute(fence_sql(ACCEPT_FENCE_SQL, table), params)
        if cur.rowcount == 1:
            return
        # Refused: read the winner's fence for the error (READ COMMITTED: the newest commit).
        cur.execute(fence_sql(CURRENT_FENCE_SQL, table), params)
        row = cur.fetchone()
    raise StaleFence(resource=resource, fence=fence, current=None if row is None else row[0])
