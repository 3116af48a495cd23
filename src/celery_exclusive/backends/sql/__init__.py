"""SQL backends: PostgreSQL (psycopg 3) and SQLite (the standard library's ``sqlite3``).

One module per dialect, the shared part in one, and the SQL text in modules of its own::

    schema.py        table names and the DDL, in frozen constants per version (PG_DDL_V1, ...)
    common.py        _SQLBackend (key prefixing, cleanup pacing, listings), the shared options
    postgres.py      PostgresBackend: pooled autocommit connections, one round trip per operation
    postgres_sql.py  its statements, each headed by its parameters and what it returns
    listener.py      its waiters: one LISTEN connection per backend and process
    sqlite.py        SQLiteBackend: one BEGIN IMMEDIATE transaction per operation, one host
    sqlite_sql.py    its statements

Both stores keep one row per holder ``(key, token)`` and one fence counter per key (see
``schema.py`` and ``docs/sql.md``). Every operation is one transaction; expiry is judged by the
database's clock (PostgreSQL's ``clock_timestamp()``; for SQLite, one file on one host, the
host's clock). Waiters: PostgreSQL ``LISTEN``/``NOTIFY``; SQLite polls (``SQLITE_POLL``).

The names below were those of the single ``backends/sql.py`` module; they stay importable
from here.
"""

from __future__ import annotations

# Also importable from here as they were from the single module (explicit re-exports, not
# part of __all__): the tunables and the current DDL.
from .common import DEFAULT_CLEANUP_INTERVAL as DEFAULT_CLEANUP_INTERVAL
from .common import SCAN_PAGE as SCAN_PAGE
from .listener import LISTENER_IDLE as LISTENER_IDLE
from .listener import SIGNAL_TTL as SIGNAL_TTL
from .postgres import MAX_IDLE_CONNECTIONS as MAX_IDLE_CONNECTIONS
from .postgres import PostgresBackend
from .postgres_sql import NOTIFY_CHANNEL
from .schema import DEFAULT_TABLE, postgres_ddl, sqlite_ddl
from .schema import PG_DDL as PG_DDL
from .schema import SQLITE_DDL as SQLITE_DDL
from .sqlite import SQLITE_POLL as SQLITE_POLL
from .sqlite import SQLiteBackend

__all__ = [
    "DEFAULT_TABLE",
    "NOTIFY_CHANNEL",
    "PostgresBackend",
    "SQLiteBackend",
    "postgres_ddl",
    "sqlite_ddl",
]
