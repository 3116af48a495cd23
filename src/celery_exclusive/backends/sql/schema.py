"""The SQL stores' tables: their names, and their DDL in frozen, versioned constants.

Two tables (names from ``table=``, default ``celery_exclusive_lease``)::

    celery_exclusive_lease        one row per (key, token): a live or expired hold
        key, token (primary key), fence, expires_at, acquired_at, renewed_at, meta (JSON text)
    celery_exclusive_lease_fence  one row per key: the last fence handed out
        key (primary key), fence, updated_at

**The DDL constants are history.** ``PG_DDL_V1`` and ``SQLITE_DDL_V1`` are what the Django
migration ``0002_lease_tables`` ran, and what every store created on first use since; a test
records a hash of each text. A schema change never edits them: it adds ``PG_DDL_V2`` /
``SQLITE_DDL_V2`` (with a migration of its own, and the statements written for it), points
``SCHEMA_VERSION``, ``PG_DDL`` and ``SQLITE_DDL`` at the new version, and leaves V1 as it was.

In the DDL text ``{lease}`` and ``{fence}`` stand for the quoted table names
(:func:`table_names`).
"""

from __future__ import annotations

import re

from ...exceptions import ConfigurationError

__all__ = [
    "DEFAULT_TABLE",
    "PG_DDL",
    "PG_DDL_V1",
    "SCHEMA_VERSION",
    "SQLITE_DDL",
    "SQLITE_DDL_V1",
    "check_table",
    "postgres_ddl",
    "sqlite_ddl",
    "table_names",
]

#: The lease table's default name; the fence-counter table is named after it + ``_fence``.
DEFAULT_TABLE = "celery_exclusive_lease"

#: The version of the tables the statements of ``postgres_sql`` and ``sqlite_sql`` work on.
SCHEMA_VERSION = 1

_TABLE_NAME = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,40}\.)?[A-Za-z_][A-Za-z0-9_]{0,40}$")

# ---------------------------------------------------------------------------------------------
# Version 1. Frozen: never edit (see the module docstring).
# ---------------------------------------------------------------------------------------------

PG_DDL_V1 = """
-- Create the lease table and the fence-counter table if missing.
-- Parameters: none. Returns nothing. Run under pg_advisory_xact_lock (transaction-scoped) so
-- that processes starting together do not race on CREATE TABLE IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS {lease} (
    key         text        NOT NULL,
    token       text        NOT NULL,
    fence       bigint      NOT NULL,
    expires_at  timestamptz NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    meta        text        NOT NULL DEFAULT '',
    PRIMARY KEY (key, token)
);
CREATE TABLE IF NOT EXISTS {fence} (
    key        text        PRIMARY KEY,
    fence      bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);
"""

SQLITE_DDL_V1 = """
-- Create the lease table and the fence-counter table if missing.
-- Parameters: none. Returns nothing. Times are unix microseconds (host clock).
CREATE TABLE IF NOT EXISTS {lease} (
    key         TEXT    NOT NULL,
    token       TEXT    NOT NULL,
    fence       INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    acquired_at INTEGER NOT NULL,
    renewed_at  INTEGER NOT NULL,
    meta        TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (key, token)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {fence} (
    key        TEXT    NOT NULL PRIMARY KEY,
    fence      INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
"""

# ---------------------------------------------------------------------------------------------
# The current version: what a store creates on first use.
# ---------------------------------------------------------------------------------------------

#: The PostgreSQL DDL of ``SCHEMA_VERSION``.
PG_DDL = PG_DDL_V1

#: The SQLite DDL of ``SCHEMA_VERSION``.
SQLITE_DDL = SQLITE_DDL_V1


def check_table(table: object, *, schema_allowed: bool) -> str:
    """Return ``table`` if it is a valid table name, else raise ConfigurationError.

    A name is letters, digits and ``_`` (at most 41 characters, not starting with a digit),
    with a ``schema.`` in front where ``schema_allowed`` (PostgreSQL): it is spliced into SQL
    text, quoted, so nothing else may pass.
    """
    if (
        not isinstance(table, str)
        or not _TABLE_NAME.match(table)
        or (not schema_allowed and "." in table)
    ):
        where = "[schema.]" if schema_allowed else ""
        raise ConfigurationError(
            f"invalid table name {table!r}: expected {where}name of letters, digits and _ "
            "(at most 41 characters each, not starting with a digit)"
        )
    return table


def _quote(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


def table_names(table: str) -> dict[str, str]:
    """The quoted names of ``table`` (``lease``) and its fence-counter table (``fence``)."""
    return {"lease": _quote(table), "fence": _quote(table + "_fence")}


def postgres_ddl(table: str = DEFAULT_TABLE) -> str:
    """Return the current PostgreSQL DDL for ``table`` (for migrations you manage yourself)."""
    check_table(table, schema_allowed=True)
    return PG_DDL.format(**table_names(table))


def sqlite_ddl(table: str = DEFAULT_TABLE) -> str:
    """Return the current SQLite DDL for ``table`` (for migrations you manage yourself)."""
    check_table(table, schema_allowed=False)
    return SQLITE_DDL.format(**table_names(table))
