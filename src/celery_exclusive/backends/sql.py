"""SQL backends: PostgreSQL (psycopg 3) and SQLite (the standard library's ``sqlite3``).

Two tables (names from ``table=``, default ``celery_exclusive_lease``)::

    celery_exclusive_lease        one row per (key, token): a live or expired hold
        key, token (primary key), fence, expires_at, acquired_at, renewed_at, meta (JSON text)
    celery_exclusive_lease_fence  one row per key: the last fence handed out
        key (primary key), fence, updated_at

Every operation is one transaction, and on PostgreSQL one round trip (a single statement, or a
pipelined ``BEGIN; ...; COMMIT``). Expiry is judged by the database's clock: PostgreSQL's
``clock_timestamp()``; for SQLite, which is one file on one host, the host's clock.

An acquire first upserts the key's fence-counter row (``INSERT ... ON CONFLICT DO UPDATE``),
which locks it until the transaction ends: grants of one key are serialised, with no advisory
lock and no session state (so it works through PgBouncer in transaction mode). A new counter is
seeded from the database clock in microseconds, so fences keep rising even after an idle
key's counter row was cleaned up. See ``docs/sql.md`` for the DDL and the reasoning.

Waiters: PostgreSQL ``LISTEN``/``NOTIFY`` (a release notifies in its own transaction); SQLite
has no notification, so :meth:`SQLiteBackend.wait` sleeps for at most ``SQLITE_POLL`` and the
caller re-checks: a documented fallback.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import os
import re
import select
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from ..exceptions import BackendError, ConfigurationError, LimitMismatch
from .base import (
    DEFAULT_FENCE_RETENTION,
    DONE,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    RenewRequest,
    parse_meta,
    redact_url,
)

if TYPE_CHECKING:
    import psycopg

__all__ = [
    "DEFAULT_TABLE",
    "NOTIFY_CHANNEL",
    "PostgresBackend",
    "SQLiteBackend",
    "postgres_ddl",
    "sqlite_ddl",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The lease table's default name; the fence-counter table is named after it + ``_fence``.
DEFAULT_TABLE = "celery_exclusive_lease"

#: The PostgreSQL channel a release notifies, with the (prefixed) key as payload.
NOTIFY_CHANNEL = "celery_exclusive"

#: SQLite has no notification: a waiter sleeps at most this long, then the caller re-checks.
SQLITE_POLL = 0.05

#: A release signal nobody waited for is forgotten after this many seconds (as on Redis).
SIGNAL_TTL = 5.0

#: Expired lease rows and idle fence counters are deleted at most this often per backend.
DEFAULT_CLEANUP_INTERVAL = 300.0

#: A listener connection nobody waited on for this long is closed (re-opened on demand).
LISTENER_IDLE = 300.0

#: Connections kept open per PostgreSQL backend between operations.
MAX_IDLE_CONNECTIONS = 4

#: Rows fetched per round trip by :meth:`scan`.
SCAN_PAGE = 500

_TABLE_NAME = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]{0,40}\.)?[A-Za-z_][A-Za-z0-9_]{0,40}$")

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

# ---------------------------------------------------------------------------------------------
# PostgreSQL statements. {lease} and {fence} are the quoted table names; %(name)s are psycopg
# parameters. Times are timestamptz of the server clock (clock_timestamp(), not now(): now() is
# the transaction's start, which may be long before a lock wait ends).
# ---------------------------------------------------------------------------------------------

PG_DDL = """
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

PG_DDL_LOCK = """
-- Serialise table creation between processes until this transaction ends.
-- Parameters: none. Returns one row (void).
SELECT pg_advisory_xact_lock(7165213640271470405)
"""

PG_TABLES_EXIST = """
-- Whether both tables exist. Parameters: lease, fence (the quoted names as text).
-- Returns one row: (lease exists, fence exists).
SELECT to_regclass(%(lease)s) IS NOT NULL, to_regclass(%(fence)s) IS NOT NULL
"""

PG_LOCK_COUNTER = """
-- Acquire, step 1: create (seeded from the server clock in microseconds) or touch the key's
-- fence counter. The upsert locks the counter row until the transaction ends, so acquires of
-- one key run one after another; touching updated_at keeps a concurrent cleanup off it.
-- Parameters: key. Returns nothing.
INSERT INTO {fence} AS f (key, fence, updated_at)
VALUES (%(key)s, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint, clock_timestamp())
ON CONFLICT (key) DO UPDATE SET updated_at = excluded.updated_at
"""

PG_DROP_EXPIRED = """
-- Acquire, step 2 (a new statement: in READ COMMITTED it sees everything committed before the
-- counter lock was granted): delete the key's expired holders. A holder being renewed at this
-- moment is waited for and re-checked, so a renewal that wins keeps its row.
-- Parameters: key. Returns nothing.
DELETE FROM {lease} WHERE key = %(key)s AND expires_at <= clock_timestamp()
"""

PG_GRANT = """
-- Acquire, step 3 (new statement, new snapshot; the counter lock is held, so no other acquire
-- of this key runs). Every row left is a holder that was live in step 2, so all of them count.
--   * another holder holds the key under another limit (the "limit" of its meta): refuse;
--   * the token already holds the key: extend its row, keep its fence (re-entered);
--   * else, fewer than `limit` other holders: increment the counter and insert the token;
--   * else: report the holders.
-- Parameters: key, token, ttl (seconds), limit, meta.
-- Returns rows of (kind, fence, token, expires_in, acquired_at, renewed_at, meta):
--   one ('reentered', fence, NULL...) or one ('granted', fence, NULL...), or else one
--   ('holder', ...) per current holder (expires_in in seconds, times in unix seconds), and
--   first of them one ('mismatch', the key's limit, NULL...) on a limit mismatch.
WITH clock AS MATERIALIZED (
    SELECT clock_timestamp() AS now
),
others AS MATERIALIZED (
    SELECT count(*) AS n,
           max(o.lim) FILTER (WHERE o.lim <> %(limit)s) AS other_limit
    FROM (
        SELECT CASE WHEN left(meta, 1) = '{{' THEN (meta::jsonb ->> 'limit')::int END AS lim
        FROM {lease} WHERE key = %(key)s AND token <> %(token)s
    ) AS o
),
mine AS (
    UPDATE {lease} AS l
    SET expires_at = clock.now + %(ttl)s * interval '1 second', renewed_at = clock.now
    FROM clock, others
    WHERE l.key = %(key)s AND l.token = %(token)s AND others.other_limit IS NULL
    RETURNING l.fence
),
bump AS (
    UPDATE {fence} AS f
    SET fence = f.fence + 1, updated_at = clock.now
    FROM clock, others
    WHERE f.key = %(key)s AND others.n < %(limit)s AND others.other_limit IS NULL
      AND NOT EXISTS (SELECT FROM mine)
    RETURNING f.fence
),
granted AS (
    INSERT INTO {lease} (key, token, fence, expires_at, acquired_at, renewed_at, meta)
    SELECT %(key)s, %(token)s, bump.fence, clock.now + %(ttl)s * interval '1 second',
           clock.now, clock.now, %(meta)s
    FROM bump, clock
    RETURNING fence
)
SELECT 'mismatch', other_limit, NULL, NULL::float8, NULL::float8, NULL::float8, NULL
FROM others WHERE other_limit IS NOT NULL
UNION ALL
SELECT 'reentered', fence, NULL, NULL, NULL, NULL, NULL FROM mine
UNION ALL
SELECT 'granted', fence, NULL, NULL, NULL, NULL, NULL FROM granted
UNION ALL
SELECT 'holder', l.fence, l.token,
       extract(epoch FROM l.expires_at - clock.now)::float8,
       extract(epoch FROM l.acquired_at)::float8,
       extract(epoch FROM l.renewed_at)::float8,
       l.meta
FROM {lease} AS l, clock
WHERE l.key = %(key)s AND NOT EXISTS (SELECT FROM mine) AND NOT EXISTS (SELECT FROM granted)
"""

PG_RELEASE = """
-- Release: compare-and-delete the token's row; if there was one, notify waiters (NOTIFY is
-- delivered when this statement's transaction commits).
-- Parameters: key, token, channel. Returns one row (was the hold live?) or none.
WITH gone AS (
    DELETE FROM {lease} WHERE key = %(key)s AND token = %(token)s
    RETURNING expires_at > clock_timestamp() AS live
)
SELECT gone.live, pg_notify(%(channel)s, %(key)s)::text FROM gone
"""

PG_RENEW = """
-- Renew many holds at once: extend each (key, token) row that is still live.
-- Parameters: keys, tokens (text[]), ttls (float8[], seconds), all of one length, with no
-- (key, token) pair twice. Returns the 1-based positions of the renewed requests.
WITH req AS (
    SELECT * FROM unnest(%(keys)s::text[], %(tokens)s::text[], %(ttls)s::float8[])
        WITH ORDINALITY AS r(key, token, ttl, i)
),
clock AS MATERIALIZED (
    SELECT clock_timestamp() AS now
)
UPDATE {lease} AS l
SET expires_at = clock.now + req.ttl * interval '1 second', renewed_at = clock.now
FROM req, clock
WHERE l.key = req.key AND l.token = req.token AND l.expires_at > clock.now
RETURNING req.i
"""

PG_HOLDERS = """
-- The live holders of one key, lowest fence first.
-- Parameters: key. Returns rows of (token, fence, expires_in, acquired_at, renewed_at, meta),
-- expires_in in seconds, times in unix seconds (server clock).
SELECT l.token, l.fence,
       extract(epoch FROM l.expires_at - clock.now)::float8,
       extract(epoch FROM l.acquired_at)::float8,
       extract(epoch FROM l.renewed_at)::float8,
       l.meta
FROM {lease} AS l, (SELECT clock_timestamp() AS now) AS clock
WHERE l.key = %(key)s AND l.expires_at > clock.now
ORDER BY l.fence
"""

PG_SCAN = """
-- One page of live holds, in (key, token) order after a given (key, token); keyset paging on
-- the primary key, so no page scans the whole table.
-- Parameters: after_key, after_token, prefix (keys must start with it), page.
-- Returns rows of (key, token, fence, expires_in, acquired_at, renewed_at, meta).
SELECT l.key, l.token, l.fence,
       extract(epoch FROM l.expires_at - clock.now)::float8,
       extract(epoch FROM l.acquired_at)::float8,
       extract(epoch FROM l.renewed_at)::float8,
       l.meta
FROM {lease} AS l, (SELECT clock_timestamp() AS now) AS clock
WHERE (l.key, l.token) > (%(after_key)s::text, %(after_token)s::text)
  AND starts_with(l.key, %(prefix)s::text)
  AND l.expires_at > clock.now
ORDER BY l.key, l.token
LIMIT %(page)s
"""

PG_TAKE = """
-- Take (hand-over): compare-and-delete the token's row like a release, and return its meta.
-- Parameters: key, token, channel. Returns one row (was the hold live?, meta) or none.
WITH gone AS (
    DELETE FROM {lease} WHERE key = %(key)s AND token = %(token)s
    RETURNING expires_at > clock_timestamp() AS live, meta
)
SELECT gone.live, gone.meta, pg_notify(%(channel)s, %(key)s)::text FROM gone
"""

PG_UPDATE_META = """
-- Replace the meta of one live hold. Parameters: key, token, meta.
-- Returns one row if the token held a live lease, else none.
UPDATE {lease} SET meta = %(meta)s
WHERE key = %(key)s AND token = %(token)s AND expires_at > clock_timestamp()
RETURNING 1
"""

PG_HAND_OVER = """
-- Hand-over: move one live hold to another owner token, keeping its fence and grant time.
-- Parameters: key, token, new_token, ttl (seconds), meta (NULL: keep it). Returns one row if
-- the token held a live lease (now held by new_token), else none.
UPDATE {lease}
SET token = %(new_token)s,
    meta = COALESCE(%(meta)s::text, meta),
    expires_at = clock_timestamp() + %(ttl)s::float8 * interval '1 second',
    renewed_at = clock_timestamp()
WHERE key = %(key)s AND token = %(token)s AND expires_at > clock_timestamp()
RETURNING 1
"""

PG_FORCE_RELEASE = """
-- Force-release: delete one token's row of a key, or every row of the key when token is NULL;
-- count the live ones, and wake as many waiters: one notification "<key>", a line break, "<n>"
-- (PostgreSQL folds identical notifications of one transaction into one: n would not do).
-- Parameters: key, token (or NULL), channel. Returns one row: (live rows deleted, notify result).
WITH gone AS (
    DELETE FROM {lease}
    WHERE key = %(key)s AND (%(token)s::text IS NULL OR token = %(token)s::text)
    RETURNING expires_at > clock_timestamp() AS live
),
counted AS (
    SELECT count(*) FILTER (WHERE live) AS n FROM gone
)
SELECT n, CASE WHEN n > 0 THEN pg_notify(%(channel)s, %(key)s || chr(10) || n)::text END
FROM counted
"""

PG_MARK_DONE = """
-- Record that a task ran to its end: a row of the key "<key>" + DONE (never a lease key) whose
-- token is the task id, expiring after ttl; cleanup deletes it with the expired holds.
-- Parameters: key ("<key>" + DONE), token (task id), ttl (seconds). Returns nothing.
INSERT INTO {lease} (key, token, fence, expires_at, acquired_at, renewed_at, meta)
VALUES (%(key)s, %(token)s, 0, clock_timestamp() + %(ttl)s::float8 * interval '1 second',
        clock_timestamp(), clock_timestamp(), '')
ON CONFLICT (key, token) DO UPDATE SET expires_at = EXCLUDED.expires_at
"""

PG_IS_DONE = """
-- Whether a task's done mark is there. Parameters: key ("<key>" + DONE), token (task id).
-- Returns one row when it is.
SELECT 1 FROM {lease}
WHERE key = %(key)s AND token = %(token)s AND expires_at > clock_timestamp()
"""

PG_CLEANUP_LEASES = """
-- Housekeeping: delete expired holds of every key (a renewal in flight is waited for and
-- re-checked, as in acquire step 2). Parameters: none. Returns nothing.
DELETE FROM {lease} WHERE expires_at <= clock_timestamp()
"""

PG_CLEANUP_FENCES = """
-- Housekeeping: delete fence counters unused for `retention` seconds whose key has no row.
-- A counter created again later is seeded from the clock, above every fence it gave out.
-- Parameters: retention (seconds). Returns nothing.
DELETE FROM {fence} AS f
WHERE f.updated_at < clock_timestamp() - %(retention)s * interval '1 second'
  AND NOT EXISTS (SELECT FROM {lease} AS l WHERE l.key = f.key)
"""

# ---------------------------------------------------------------------------------------------
# SQLite statements (? parameters). Times are integers: unix time in microseconds of the host
# clock, read by Python inside the write transaction. BEGIN IMMEDIATE takes the database's one
# write lock, so every transaction below runs alone, across threads and processes of the host.
# ---------------------------------------------------------------------------------------------

SQLITE_DDL = """
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

SQLITE_SEED_COUNTER = """
-- Acquire, step 1: create the key's fence counter, seeded with the clock in microseconds.
-- Parameters: key, now (us), now (us). Returns nothing; does nothing if the counter exists.
INSERT OR IGNORE INTO {fence} (key, fence, updated_at) VALUES (?, ?, ?)
"""

SQLITE_DROP_EXPIRED = """
-- Acquire, step 2: delete the key's expired holders. Parameters: key, now (us).
-- Returns nothing.
DELETE FROM {lease} WHERE key = ? AND expires_at <= ?
"""

SQLITE_EXTEND = """
-- Extend one live hold (re-entry and renewal). Parameters: expires_at (us), renewed_at (us),
-- key, token, now (us). Returns nothing; the row count says whether the token held the key.
UPDATE {lease} SET expires_at = ?, renewed_at = ?
WHERE key = ? AND token = ? AND expires_at > ?
"""

SQLITE_FENCE_OF = """
-- The fence of one hold. Parameters: key, token. Returns zero or one row: (fence,).
SELECT fence FROM {lease} WHERE key = ? AND token = ?
"""

SQLITE_OTHERS = """
-- The other holders of a key (expired ones were deleted just before). Parameters: key, token.
-- Returns one row per holder: (meta,).
SELECT meta FROM {lease} WHERE key = ? AND token <> ?
"""

SQLITE_BUMP = """
-- Take the next fence of a key. Parameters: updated_at (us), key. Returns nothing.
UPDATE {fence} SET fence = fence + 1, updated_at = ? WHERE key = ?
"""

SQLITE_LAST_FENCE = """
-- The last fence handed out for a key. Parameters: key. Returns one row: (fence,).
SELECT fence FROM {fence} WHERE key = ?
"""

SQLITE_INSERT = """
-- Record a new hold. Parameters: key, token, fence, expires_at, acquired_at, renewed_at (us),
-- meta. Returns nothing.
INSERT INTO {lease} (key, token, fence, expires_at, acquired_at, renewed_at, meta)
VALUES (?, ?, ?, ?, ?, ?, ?)
"""

SQLITE_HOLDERS = """
-- The live holders of one key, lowest fence first. Parameters: key, now (us).
-- Returns rows of (token, fence, expires_at, acquired_at, renewed_at, meta), times in us.
SELECT token, fence, expires_at, acquired_at, renewed_at, meta FROM {lease}
WHERE key = ? AND expires_at > ? ORDER BY fence
"""

SQLITE_RELEASE = """
-- Release: compare-and-delete the token's hold. Parameters: key, token. Returns nothing; run
-- after SQLITE_EXPIRY_OF in the same transaction to learn whether the hold was live.
DELETE FROM {lease} WHERE key = ? AND token = ?
"""

SQLITE_EXPIRY_OF = """
-- The expiry of one hold. Parameters: key, token. Returns zero or one row: (expires_at us,).
SELECT expires_at FROM {lease} WHERE key = ? AND token = ?
"""

SQLITE_META_OF = """
-- The expiry and meta of one hold. Parameters: key, token.
-- Returns zero or one row: (expires_at us, meta).
SELECT expires_at, meta FROM {lease} WHERE key = ? AND token = ?
"""

SQLITE_UPDATE_META = """
-- Replace the meta of one live hold. Parameters: meta, key, token, now (us).
-- Returns nothing; the row count says whether the token held a live lease.
UPDATE {lease} SET meta = ? WHERE key = ? AND token = ? AND expires_at > ?
"""

SQLITE_HAND_OVER = """
-- Hand-over: move one live hold to another owner token, keeping its fence and grant time.
-- Parameters: new_token, meta (NULL: keep it), expires_at (us), renewed_at (us), key, token,
-- now (us). Returns nothing; the row count says whether the token held a live lease.
UPDATE {lease} SET token = ?, meta = COALESCE(?, meta), expires_at = ?, renewed_at = ?
WHERE key = ? AND token = ? AND expires_at > ?
"""

SQLITE_COUNT_LIVE = """
-- How many live holds a force-release is about to remove. Parameters: key, token (or NULL),
-- token again, now (us). Returns one row: (count,).
SELECT count(*) FROM {lease} WHERE key = ? AND (? IS NULL OR token = ?) AND expires_at > ?
"""

SQLITE_FORCE_RELEASE = """
-- Force-release one token's hold of a key, or every hold when token is NULL.
-- Parameters: key, token (or NULL), token again. Returns nothing.
DELETE FROM {lease} WHERE key = ? AND (? IS NULL OR token = ?)
"""

SQLITE_SCAN = """
-- One page of live holds in (key, token) order after a given (key, token).
-- Parameters: after_key, after_key, after_token, prefix length, prefix, now (us), page.
-- Returns rows of (key, token, fence, expires_at, acquired_at, renewed_at, meta), times in us.
SELECT key, token, fence, expires_at, acquired_at, renewed_at, meta FROM {lease}
WHERE (key > ? OR (key = ? AND token > ?))
  AND substr(key, 1, ?) = ?
  AND expires_at > ?
ORDER BY key, token
LIMIT ?
"""

SQLITE_MARK_DONE = """
-- Record that a task ran to its end (see PG_MARK_DONE).
-- Parameters: key ("<key>" + DONE), token (task id), expires (us), now (us), now (us).
INSERT INTO {lease} (key, token, fence, expires_at, acquired_at, renewed_at, meta)
VALUES (?, ?, 0, ?, ?, ?, '')
ON CONFLICT (key, token) DO UPDATE SET expires_at = excluded.expires_at
"""

SQLITE_IS_DONE = """
-- Whether a task's done mark is there. Parameters: key ("<key>" + DONE), token (task id), now.
-- Returns one row when it is.
SELECT 1 FROM {lease} WHERE key = ? AND token = ? AND expires_at > ?
"""

SQLITE_CLEANUP_LEASES = """
-- Housekeeping: delete expired holds of every key. Parameters: now (us). Returns nothing.
DELETE FROM {lease} WHERE expires_at <= ?
"""

SQLITE_CLEANUP_FENCES = """
-- Housekeeping: delete fence counters unused since `before` whose key has no row.
-- Parameters: before (us). Returns nothing.
DELETE FROM {fence}
WHERE updated_at < ? AND NOT EXISTS (SELECT 1 FROM {lease} AS l WHERE l.key = {fence}.key)
"""


# ---------------------------------------------------------------------------------------------
# Shared parts
# ---------------------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


def _check_table(table: str, *, schema_allowed: bool) -> str:
    if not _TABLE_NAME.match(table) or (not schema_allowed and "." in table):
        where = "[schema.]" if schema_allowed else ""
        raise ConfigurationError(
            f"invalid table name {table!r}: expected {where}name of letters, digits and _ "
            "(at most 41 characters each, not starting with a digit)"
        )
    return table


def postgres_ddl(table: str = DEFAULT_TABLE) -> str:
    """Return the PostgreSQL DDL for ``table`` (for migrations you manage yourself)."""
    _check_table(table, schema_allowed=True)
    return PG_DDL.format(lease=_quote(table), fence=_quote(table + "_fence"))


def sqlite_ddl(table: str = DEFAULT_TABLE) -> str:
    """Return the SQLite DDL for ``table`` (for migrations you manage yourself)."""
    _check_table(table, schema_allowed=False)
    return SQLITE_DDL.format(lease=_quote(table), fence=_quote(table + "_fence"))


def _bool_option(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name} must be true or false, not {value!r}")


def _shared_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The options both SQL stores take (from a URL's query or keywords), checked."""
    return {
        "table": str(settings.get("table", DEFAULT_TABLE)),
        "prefix": str(settings.get("prefix", "")),
        "fence_retention": _float_option(
            "fence_retention", settings.get("fence_retention", DEFAULT_FENCE_RETENTION)
        ),
        "cleanup_interval": _float_option(
            "cleanup_interval", settings.get("cleanup_interval", DEFAULT_CLEANUP_INTERVAL)
        ),
        "create_tables": _bool_option("create_tables", settings.get("create_tables", True)),
    }


def _float_option(name: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name} must be a number, not {value!r}") from None
    if not number > 0 or not math.isfinite(number):
        raise ConfigurationError(f"{name} must be > 0, not {value!r}")
    return number


@contextlib.contextmanager
def _naming(description: str) -> Iterator[None]:
    """Add the store's (redacted) URL to the ConfigurationError of a bad option."""
    try:
        yield
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc} (in the store URL {description!r})") from None


def _glob_prefix(match: str | None) -> str:
    """The literal start of a glob (everything before its first wildcard)."""
    if not match:
        return ""
    cut = len(match)
    for char in "*?[":
        at = match.find(char)
        if at != -1:
            cut = min(cut, at)
    return match[:cut]


class _SQLBackend(Backend):
    """What both SQL backends share: key prefixing, options, cleanup pacing, listings."""

    def __init__(
        self,
        *,
        table: str,
        prefix: str,
        fence_retention: float,
        cleanup_interval: float,
        create_tables: bool,
        description: str,
    ) -> None:
        self.table = table
        self.prefix = prefix
        self.fence_retention = fence_retention
        self.cleanup_interval = cleanup_interval
        self.create_tables = create_tables
        self._description = description
        self._pid = os.getpid()
        self._ready = False
        self._setup_lock = threading.Lock()
        # First cleanup after one interval, not at start-up (many processes start together).
        self._next_cleanup = time.monotonic() + cleanup_interval

    # -- keys -----------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return f"{self.prefix}:{key}" if self.prefix else key

    def _done_key(self, key: str) -> str:
        """The stored key of ``key``'s done marks (rows whose token is a task id)."""
        return self._k(key + DONE)

    def _unk(self, stored: str) -> str:
        return stored[len(self.prefix) + 1 :] if self.prefix else stored

    def _scan_prefix(self, match: str | None) -> str:
        return self._k(_glob_prefix(match)) if self.prefix else _glob_prefix(match)

    def describe(self) -> str:
        return self._description

    # -- cleanup --------------------------------------------------------------------------

    def _cleanup_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_cleanup:
            return False
        self._next_cleanup = now + self.cleanup_interval
        return True

    def _maybe_cleanup(self) -> None:
        if not self._cleanup_due():
            return
        try:
            self.cleanup()
        except BackendError:  # housekeeping only: the next interval tries again
            logger.debug("cleanup of %s failed", self._description, exc_info=True)

    def cleanup(self) -> None:
        """Delete expired holds, and fence counters idle for ``fence_retention`` seconds.

        Runs by itself at most every ``cleanup_interval`` seconds (after an acquire); call it
        from a periodic job if you prefer.
        """
        raise NotImplementedError  # pragma: no cover

    # -- listings -------------------------------------------------------------------------

    def _scan_rows(
        self, match: str | None, page: Callable[[str, str, str], list[tuple[Any, ...]]]
    ) -> Iterator[LeaseInfo]:
        """Group the rows of ``page(after_key, after_token, prefix)`` calls into LeaseInfos."""
        prefix = self._scan_prefix(match)
        after_key, after_token = "", ""
        current: str | None = None
        holders: list[Holder] = []
        while True:
            rows = page(after_key, after_token, prefix)
            for stored, *rest in rows:
                if stored != current:
                    if current is not None and holders:
                        yield LeaseInfo(key=self._unk(current), holders=holders)
                    current, holders = stored, []
                key = self._unk(stored)
                if self.prefix and not stored.startswith(self.prefix + ":"):
                    continue
                if stored.endswith(DONE):  # done marks (mark_done), not leases
                    continue
                if match is not None and not fnmatch.fnmatchcase(key, match):
                    continue
                holders.append(self._holder_row(rest))
            if len(rows) < SCAN_PAGE:
                break
            after_key, after_token = rows[-1][0], rows[-1][1]
        if current is not None and holders:
            yield LeaseInfo(key=self._unk(current), holders=holders)

    def _holder_row(self, row: Sequence[Any]) -> Holder:
        raise NotImplementedError  # pragma: no cover


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


def _renew_plan(
    requests: Sequence[RenewRequest], stored: Callable[[str], str]
) -> tuple[list[tuple[str, str, float]], list[int]]:
    """Deduplicate (key, token) pairs (keeping the longest ttl); map each request to its pair."""
    index: dict[tuple[str, str], int] = {}
    unique: list[tuple[str, str, float]] = []
    where: list[int] = []
    for r in requests:
        pair = (stored(r.key), r.token)
        at = index.get(pair)
        if at is None:
            at = index[pair] = len(unique)
            unique.append((pair[0], pair[1], r.ttl))
        elif r.ttl > unique[at][2]:
            unique[at] = (pair[0], pair[1], r.ttl)
        where.append(at)
    return unique, where


# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------


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


class _Listener:
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
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(3.0)


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
        _check_table(table, schema_allowed=True)
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
        lease, fence = _quote(table), _quote(table + "_fence")
        self._lease_name, self._fence_name = lease, fence
        self._sql = {
            name: text.format(lease=lease, fence=fence)
            for name, text in {
                "ddl": PG_DDL,
                "lock_counter": PG_LOCK_COUNTER,
                "drop_expired": PG_DROP_EXPIRED,
                "grant": PG_GRANT,
                "release": PG_RELEASE,
                "renew": PG_RENEW,
                "holders": PG_HOLDERS,
                "scan": PG_SCAN,
                "force_release": PG_FORCE_RELEASE,
                "take": PG_TAKE,
                "update_meta": PG_UPDATE_META,
                "hand_over": PG_HAND_OVER,
                "mark_done": PG_MARK_DONE,
                "is_done": PG_IS_DONE,
                "cleanup_leases": PG_CLEANUP_LEASES,
                "cleanup_fences": PG_CLEANUP_FENCES,
            }.items()
        }
        self._errors: tuple[type[BaseException], ...] = (self._psycopg.Error, OSError)
        self._pool_lock = threading.Lock()
        self._idle: list[psycopg.Connection[Any]] = []
        self._listener: _Listener | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresBackend:
        """Build a backend from a ``postgresql://`` or ``postgres://`` URL.

        Query parameters ``table``, ``prefix``, ``fence_retention``, ``cleanup_interval``
        and ``create_tables`` are ours (they may also be passed as keyword ``options``, as
        may ``listen_url``: a direct connection for ``LISTEN`` when the URL goes through
        PgBouncer in transaction mode); the others go to libpq (``sslmode``, ...).
        """
        parts = urlsplit(url)
        ours = {"table", "prefix", "fence_retention", "cleanup_interval", "create_tables"}
        query = parse_qsl(parts.query, keep_blank_values=True)
        taken = {k: v for k, v in query if k in ours}
        rest = [(k, v) for k, v in query if k not in ours]
        unknown = set(options) - ours - {"listen_url"}
        if unknown:
            raise ConfigurationError(
                f"unknown PostgreSQL store option(s) {sorted(unknown)}; "
                f"known: {sorted(ours | {'listen_url'})}"
            )
        settings: dict[str, Any] = {**taken, **options}
        # Rebuilt by hand: urlunsplit turns postgresql:///db into postgresql:/db, and libpq
        # decodes %20 but not the + that urlencode writes for a space by default.
        base = url.split("#", 1)[0].split("?", 1)[0]
        plain = base + ("?" + urlencode(rest, quote_via=quote) if rest else "")
        listen_url = settings.pop("listen_url", None)
        with _naming(redact_url(url)):
            shared = _shared_options(settings)
        return cls(
            plain,
            **shared,
            listen_conninfo=str(listen_url) if listen_url else None,
            description=redact_url(url),
        )

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
        unique, where = _renew_plan(requests, self._k)
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
                self._listener = _Listener(lambda: self._new_connection(params), self._description)
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


# ---------------------------------------------------------------------------------------------
# SQLite
# ---------------------------------------------------------------------------------------------

#: Connections a forked child inherited: kept referenced so they are never closed in the child.
_inherited: list[object] = []


def _now_us() -> int:
    return time.time_ns() // 1000


def _us(seconds: float) -> int:
    return max(1, round(seconds * 1_000_000))


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
        busy_timeout: float = 10.0,
        description: str | None = None,
    ) -> None:
        _check_table(table, schema_allowed=False)
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
        lease, fence = _quote(table), _quote(table + "_fence")
        self._sql = {
            name: text.format(lease=lease, fence=fence)
            for name, text in {
                "ddl": SQLITE_DDL,
                "seed_counter": SQLITE_SEED_COUNTER,
                "drop_expired": SQLITE_DROP_EXPIRED,
                "extend": SQLITE_EXTEND,
                "fence_of": SQLITE_FENCE_OF,
                "others": SQLITE_OTHERS,
                "bump": SQLITE_BUMP,
                "last_fence": SQLITE_LAST_FENCE,
                "insert": SQLITE_INSERT,
                "holders": SQLITE_HOLDERS,
                "release": SQLITE_RELEASE,
                "expiry_of": SQLITE_EXPIRY_OF,
                "meta_of": SQLITE_META_OF,
                "update_meta": SQLITE_UPDATE_META,
                "hand_over": SQLITE_HAND_OVER,
                "force_release": SQLITE_FORCE_RELEASE,
                "count_live": SQLITE_COUNT_LIVE,
                "scan": SQLITE_SCAN,
                "mark_done": SQLITE_MARK_DONE,
                "is_done": SQLITE_IS_DONE,
                "cleanup_leases": SQLITE_CLEANUP_LEASES,
                "cleanup_fences": SQLITE_CLEANUP_FENCES,
            }.items()
        }
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteBackend:
        """Build a backend from ``sqlite:///relative/path.db`` or ``sqlite:////absolute.db``.

        Query parameters (or keyword ``options``): ``table``, ``prefix``,
        ``fence_retention``, ``cleanup_interval``, ``create_tables``, ``busy_timeout``
        (seconds a transaction waits for the write lock; default 10).
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
        ours = {
            "table", "prefix", "fence_retention", "cleanup_interval", "create_tables",
            "busy_timeout",
        }  # fmt: skip
        settings: dict[str, Any] = dict(parse_qsl(query_text, keep_blank_values=True))
        settings.update(options)
        unknown = set(settings) - ours
        if unknown:
            raise ConfigurationError(
                f"unknown SQLite store option(s) {sorted(unknown)}; known: {sorted(ours)}"
            )
        with _naming(f"{scheme}:///{path}"):
            shared = _shared_options(settings)
            busy_timeout = _float_option("busy_timeout", settings.get("busy_timeout", 10.0))
        return cls(path, **shared, busy_timeout=busy_timeout, description=f"{scheme}:///{path}")

    # -- connection -----------------------------------------------------------------------

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
