"""SQLite statements of the SQL store, each opened by a comment: its parameters, its result.

``{lease}`` and ``{fence}`` are the quoted table names (``schema.table_names``); ``?`` are
sqlite3 parameters. Times are integers: unix time in microseconds of the host clock, read by
Python inside the write transaction. ``BEGIN IMMEDIATE`` takes the database's one write lock,
so every transaction of the backend runs alone, across threads and processes of the host.

The statements work on the tables of ``schema.SCHEMA_VERSION`` (1); the DDL itself is in
``schema.py``, frozen per version. :data:`STATEMENTS` names each statement for the backend.
"""

from __future__ import annotations

from .schema import SQLITE_DDL

__all__ = [
    "SQLITE_BUMP",
    "SQLITE_CLEANUP_FENCES",
    "SQLITE_CLEANUP_LEASES",
    "SQLITE_COUNT_LIVE",
    "SQLITE_DROP_EXPIRED",
    "SQLITE_EXPIRY_OF",
    "SQLITE_EXTEND",
    "SQLITE_FENCE_OF",
    "SQLITE_FORCE_RELEASE",
    "SQLITE_HAND_OVER",
    "SQLITE_HOLDERS",
    "SQLITE_INSERT",
    "SQLITE_IS_DONE",
    "SQLITE_LAST_FENCE",
    "SQLITE_MARK_DONE",
    "SQLITE_META_OF",
    "SQLITE_OTHERS",
    "SQLITE_RELEASE",
    "SQLITE_SCAN",
    "SQLITE_SEED_COUNTER",
    "SQLITE_UPDATE_META",
    "STATEMENTS",
]

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


#: The statements the backend runs, by name (their ``{lease}``/``{fence}`` still to fill in).
STATEMENTS = {
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
}
