"""PostgreSQL statements of the SQL store, each opened by a comment: its parameters, its result.

``{lease}`` and ``{fence}`` are the quoted table names (``schema.table_names``); ``%(name)s``
are psycopg parameters. Times are timestamptz of the server clock (``clock_timestamp()``, not
``now()``: ``now()`` is the transaction's start, which may be long before a lock wait ends).

The statements work on the tables of ``schema.SCHEMA_VERSION`` (1); the DDL itself is in
``schema.py``, frozen per version. :data:`STATEMENTS` names each statement for the backend.
"""

from __future__ import annotations

from .schema import PG_DDL

__all__ = [
    "NOTIFY_CHANNEL",
    "PG_CLEANUP_FENCES",
    "PG_CLEANUP_LEASES",
    "PG_DDL_LOCK",
    "PG_DROP_EXPIRED",
    "PG_FORCE_RELEASE",
    "PG_GRANT",
    "PG_HAND_OVER",
    "PG_HOLDERS",
    "PG_IS_DONE",
    "PG_LOCK_COUNTER",
    "PG_MARK_DONE",
    "PG_RELEASE",
    "PG_RENEW",
    "PG_SCAN",
    "PG_TABLES_EXIST",
    "PG_TAKE",
    "PG_UPDATE_META",
    "STATEMENTS",
]

#: The channel a release notifies, with the (prefixed) key as payload.
NOTIFY_CHANNEL = "celery_exclusive"

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

#: The statements the backend runs, by name (their ``{lease}``/``{fence}`` still to fill in).
STATEMENTS = {
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
}
