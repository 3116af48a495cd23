"""Redis and Valkey backend: one Lua script per operation, one round trip each.

Keys of one lease share a hash tag, so the backend works on Redis Cluster too::

    exclusive:{<key>}:lease    hash: one field per holder token, plus "#f" (the fence counter)
                               and "#w" (until when a refused caller waits); it expires
                               ``fence_retention`` (7 days) after the key's last grant or renewal
    exclusive:{<key>}:signal   waiters BLPOP it; a release pushes only while someone waits
                               (the list expires within seconds)
    exclusive:stats:lost       hash: lost leases counted per task name, for ``stats`` (at most
                               MAX_LOST_TASKS names; it expires 30 days after the last loss)

Expiry is judged by the Redis server's clock (``TIME`` inside the scripts), never the
worker's. Works on Redis 6.2+ and Valkey: standalone, Sentinel and Cluster, plain or TLS.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from .. import forking
from ..exceptions import BackendError, ConfigurationError, LimitMismatch
from .base import (
    DEFAULT_FENCE_RETENTION,
    MAX_LOST_TASKS,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    LostCount,
    RenewRequest,
    redact_url,
)

__all__ = ["RedisBackend", "RedisURL", "parse_url"]

logger = logging.getLogger(__name__)

#: A release signal nobody took is dropped after this many ms; a waiter that missed it
#: notices the release at its next capped re-check instead.
SIGNAL_TTL_MS = 5_000

#: Leases renewed by one script: Redis serves no other client while a script runs.
RENEW_CHUNK = 200

#: Keys a listing asks SCAN for at a time: in one script (``list.lua``, which blocks Redis
#: for about 2-3 ms with 200 held keys on a slow 2-core VM), or on a Cluster, the keys whose
#: holders are read in one pipeline.
SCAN_BATCH = 200

#: How long the lost-lease counts outlive the last loss recorded.
LOST_COUNTS_TTL_MS = 30 * 24 * 3600 * 1000

#: The default socket timeout for clients built from a URL: a store that stops answering holds
#: its renewal sender this long (the loss itself is reported at the lease's deadline anyway).
DEFAULT_SOCKET_TIMEOUT = 10.0


def _import_redis() -> Any:
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "the Redis store needs redis-py: pip install 'celery-exclusive[redis]'"
        ) from exc
    return redis


def _load_script(name: str) -> str:
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class RedisBackend(Backend):
    """Leases in Redis or Valkey.

    Build it from a URL with :func:`celery_exclusive.connect` or pass your own client::

        store = connect("redis://localhost:6379/0")
        store = connect(redis.Redis(...))          # or redis.cluster.RedisCluster(...)
    """

    scheme = "redis"

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = "exclusive",
        fence_retention: float = DEFAULT_FENCE_RETENTION,
        description: str | None = None,
    ) -> None:
        redis = _import_redis()
        self.client: Any = client  # redis.Redis or redis.cluster.RedisCluster
        self.prefix = prefix
        self.fence_retention_ms = int(fence_retention * 1000)
        self._description = description or "redis"
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._socket_timeout = self._client_socket_timeout(client)
        self._sources = {
            name: _load_script(name)
            for name in (
                "acquire",
                "release",
                "renew",
                "holders",
                "list",
                "force_release",
                "update_meta",
                "take",
                "hand_over",
                "record_lost",
            )
        }
        self._scripts = {name: client.register_script(src) for name, src in self._sources.items()}
        self._shas = {name: script.sha for name, script in self._scripts.items()}
        # The fast path (see _send) talks to the client's connection pool: not on a Cluster
        # (a pool per node) nor on a client pinned to one connection.
        pool = getattr(client, "connection_pool", None)
        direct = not self._cluster and getattr(client, "connection", None) is None
        self._pool: Any = pool if direct and pool is not None else None
        self._pool_new_api = self._pool is not None and _get_connection_takes_no_name(pool)
        # Commands are packed here (see _pack) when the client encodes text as UTF-8 strictly,
        # as redis-py does by default; else by redis-py's own packer.
        settings = self._pool.connection_kwargs if self._pool is not None else {}
        encoding = str(settings.get("encoding", "utf-8")).lower().replace("_", "-")
        self._pack_here = (
            encoding in ("utf-8", "utf8") and settings.get("encoding_errors", "strict") == "strict"
        )
        # Connections taken from that pool and kept for the fast path: each one's last reply
        # was read in full, so none needs the pool's check for unread data (a non-blocking
        # read and two timeout changes: three system calls per command).
        self._idle: list[Any] = []
        # Answers of releases sent without waiting, by connection, read by its next user.
        self._owed: dict[int, tuple[Any, list[_Owed]]] = {}
        self._owed_lock = threading.Lock()
        self._release_loaded = False
        forking.call_after_fork(self, RedisBackend._forget_connections)
        self._no_script = redis.exceptions.NoScriptError
        self._reply_errors = (redis.exceptions.ResponseError,)
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            redis.exceptions.RedisClusterException,
            OSError,
        )

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """Build a backend from a ``redis://``, ``rediss://``, ``unix://``,
        ``redis+sentinel://`` or ``redis+cluster://`` URL.

        Sentinel: ``redis+sentinel://[:password@]host:port[,host:port...]/service/db``.
        Cluster: ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster`` for TLS).
        Query parameters ``prefix``, ``socket_timeout`` and ``fence_retention`` are ours;
        on ``redis://``, ``rediss://`` and ``unix://`` the others go to redis-py, which must
        know them. Every part is checked first (:func:`parse_url`), before anything connects.
        """
        redis = _import_redis()
        parsed = parse_url(url)
        prefix = parsed.prefix if parsed.prefix is not None else options.pop("prefix", "exclusive")
        options.pop("prefix", None)
        timeout = parsed.socket_timeout
        desc = parsed.description
        kwargs: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": min(timeout, 5.0),
            "health_check_interval": 30,
            **options,
        }
        parts = urlsplit(url)
        scheme = parsed.scheme
        try:
            if scheme in _SENTINEL_SCHEMES:
                client = _sentinel_client(parsed, kwargs)
            elif scheme in _CLUSTER_SCHEMES:
                nodes = [redis.cluster.ClusterNode(h, p) for h, p in parsed.hosts]
                if parts.password:
                    kwargs["password"] = unquote(parts.password)
                if scheme.startswith("rediss"):
                    kwargs["ssl"] = True
                kwargs.pop("health_check_interval", None)
                client = redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)
            else:
                plain = parts._replace(query=urlencode(parsed.query, quote_via=quote))
                client = redis.Redis.from_url(plain.geturl(), **kwargs)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"invalid Redis URL {desc!r}: {exc}") from exc
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            # RedisCluster connects while it is built, to learn the slot map.
            raise BackendError(f"could not connect to {desc}: {exc}") from exc
        return cls(client, prefix=prefix, fence_retention=parsed.fence_retention, description=desc)

    @staticmethod
    def _client_socket_timeout(client: Any) -> float | None:
        try:
            kwargs = client.connection_pool.connection_kwargs
        except AttributeError:  # a cluster client has one pool per node
            kwargs = getattr(client, "nodes_manager", None)
            kwargs = getattr(kwargs, "connection_kwargs", {}) if kwargs else {}
        value = kwargs.get("socket_timeout")
        return float(value) if value else None

    # -- keys -----------------------------------------------------------------------------

    def _k(self, key: str, part: str) -> str:
        return f"{self.prefix}:{{{key}}}:{part}"

    # -- the contract ---------------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        reply = self._call(*self._acquire_call(key, token, ttl, limit, meta, wait))
        return self._granted(key, limit, reply)

    def take_over(
        self,
        key: str,
        old_token: str,
        token: str,
        *,
        ttl: float,
        limit: int,
        meta: str,
        wait: float = 0.0,
    ) -> Grant | Conflict:
        # Both scripts in one round trip (the fast path pipelines them).
        hand_over = ("hand_over", [self._k(key, "lease")], [old_token, token, _ms(ttl), meta])
        acquire = self._acquire_call(key, token, ttl, limit, meta, wait)
        replies = self._call_all([hand_over, acquire])
        return self._granted(key, limit, replies[1])

    def _acquire_call(
        self, key: str, token: str, ttl: float, limit: int, meta: str, wait: float
    ) -> tuple[str, list[str], list[Any]]:
        retention = max(self.fence_retention_ms, _ms(ttl) * 2)
        args = [token, _ms(ttl), limit, meta, retention, _ms(wait) if wait > 0 else 0]
        return "acquire", [self._k(key, "lease")], args

    def _release_call(self, key: str, token: str) -> tuple[str, list[str], list[Any]]:
        return "release", [self._k(key, "lease"), self._k(key, "signal")], [token, SIGNAL_TTL_MS]

    @staticmethod
    def _granted(key: str, limit: int, reply: Any) -> Grant | Conflict:
        if int(reply[0]) == 1:
            return Grant(fence=int(reply[1]), reentered=bool(int(reply[2])))
        if int(reply[0]) == -1:
            raise LimitMismatch(key=key, limit=int(reply[1]), requested=limit)
        retry_in = max(int(reply[1]), 0) / 1000.0
        holders = _parse_holders(reply[3:], int(reply[2]))
        return Conflict(holders=holders, retry_in=retry_in)

    def release(self, key: str, token: str) -> bool:
        reply = self._call(*self._release_call(key, token))
        self._release_loaded = True  # the script is on the server now: see send_release
        return bool(int(reply))

    def send_release(
        self, key: str, token: str, done: Callable[[bool | BackendError], object]
    ) -> Callable[[], None] | None:
        # The answer is left on the connection, which goes back to the kept ones at once: its
        # next user (usually this process's next command) reads it first, so the release is
        # run by Redis before anything sent after it on that connection. The returned collect()
        # reads it now if nobody has (a fallback timer, settle()).
        if self._pool is None or not self._release_loaded:
            return None  # the first release of a process waits: it loads the script
        conn = self._write([self._release_call(key, token)])
        if conn is None:
            return None
        owed = _Owed(done, lambda: self.release(key, token))
        with self._owed_lock:
            self._owed.setdefault(id(conn), (conn, []))[1].append(owed)
        self._idle.append(conn)

        def collect() -> None:
            if owed.is_read():
                return
            try:
                self._idle.remove(conn)  # ours now: nobody else reads it meanwhile
            except ValueError:  # in use: its user reads the answer before anything else
                owed.wait_read(self._socket_timeout or DEFAULT_SOCKET_TIMEOUT)
                return
            self._collect(conn)
            self._idle.append(conn)

        return collect

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        if not requests:
            return []
        ttl_ms = {ttl: _ms(ttl) for ttl in {r.ttl for r in requests}}  # usually one ttl
        retention = max(self.fence_retention_ms, *(ms * 2 for ms in ttl_ms.values()))
        # One script per slot (Cluster: a script may only touch one slot), per ttl (usually
        # one) and per chunk of RENEW_CHUNK leases (a script blocks Redis while it runs), all
        # in one pipeline: one round trip (on Cluster, one per node).
        groups: dict[tuple[Any, float], list[int]] = {}
        for i, r in enumerate(requests):
            slot = self.client.keyslot(self._k(r.key, "lease")) if self._cluster else 0
            groups.setdefault((slot, r.ttl), []).append(i)
        batches = [
            (ttl_ms[ttl], indexes[n : n + RENEW_CHUNK])
            for (_, ttl), indexes in groups.items()
            for n in range(0, len(indexes), RENEW_CHUNK)
        ]
        results = [False] * len(requests)
        calls: list[tuple[list[str], list[Any]]] = []
        for ms, batch in batches:
            args: list[Any] = [requests[i].token for i in batch]
            args += [ms, retention]
            calls.append(([self._k(requests[i].key, "lease") for i in batch], args))
        try:
            for (_, batch), reply in zip(batches, self._pipelined("renew", calls), strict=True):
                flags = reply.decode() if isinstance(reply, bytes) else str(reply)
                for i, flag in zip(batch, flags, strict=True):
                    results[i] = flag == "1"
        except self._errors as exc:
            raise BackendError(f"renew on {self._description} failed: {exc}") from exc
        return results

    def wait(self, key: str, timeout: float) -> bool:
        if timeout <= 0:
            return False
        if self._socket_timeout is not None:
            # A blocking read longer than the socket timeout would fail; wait in slices.
            timeout = min(timeout, max(self._socket_timeout - 0.5, 0.1))
        try:
            reply = self.client.blpop([self._k(key, "signal")], timeout=max(timeout, 0.01))
        except self._errors as exc:
            raise BackendError(f"wait on {self._description} failed: {exc}") from exc
        return reply is not None

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        # A string beside the key's lease hash (same Cluster slot); scans match hashes only.
        try:
            self.client.set(self._k(key, f"done:{task_id}"), 1, px=_ms(ttl))
        except self._errors as exc:
            raise BackendError(f"mark_done on {self._description} failed: {exc}") from exc

    def is_done(self, key: str, task_id: str) -> bool:
        try:
            return bool(self.client.exists(self._k(key, f"done:{task_id}")))
        except self._errors as exc:
            raise BackendError(f"is_done on {self._description} failed: {exc}") from exc

    def holders(self, key: str) -> list[Holder]:
        reply = self._call("holders", [self._k(key, "lease")], [])
        return _parse_holders(reply[1:], int(reply[0]))

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        pattern = self._k(match or "*", "lease")
        start, end = len(self.prefix) + 2, -len("}:lease")
        try:
            if self._cluster:
                yield from self._scan_cluster(pattern, start, end)
                return
            # One script per step: SCAN and the holders of what it found, one round trip and
            # one JSON reply (parsed at once: redis-py parses a reply element by element). The
            # next step is asked for before this one's holders are parsed: Redis runs it
            # meanwhile.
            pending: Callable[[], Any] | None = self._list_step("0", pattern)
            try:
                while pending is not None:
                    step = pending()
                    cursor, now_ms = str(step[0]), int(step[1])
                    pending = None if cursor == "0" else self._list_step(cursor, pattern)
                    for i in range(2, len(step), 2):
                        found = _parse_holders(step[i + 1], now_ms)
                        if found:
                            yield LeaseInfo(key=step[i][start:end], holders=found)
            finally:
                if pending is not None:  # the caller stopped early: read what is on its way
                    pending()
        except self._errors as exc:
            raise BackendError(f"scan on {self._description} failed: {exc}") from exc

    def _list_step(self, cursor: str, pattern: str) -> Callable[[], Any]:
        """Send one listing step (``list.lua``) now; return the reader of its parsed reply."""
        read = self._call_later([("list", [], [cursor, pattern, SCAN_BATCH])])
        return lambda: json.loads(read()[0])

    def _scan_cluster(self, pattern: str, start: int, end: int) -> Iterator[LeaseInfo]:
        """A Cluster's listing: a script may only read keys of one slot, so SCAN, then the
        holders of each batch of keys in one pipeline (one round trip per node)."""
        names = self.client.scan_iter(match=pattern, count=SCAN_BATCH, _type="hash")
        while batch := list(itertools.islice(names, SCAN_BATCH)):
            keys = [(n.decode() if isinstance(n, bytes) else str(n))[start:end] for n in batch]
            calls: list[tuple[list[str], list[Any]]] = [
                ([self._k(key, "lease")], []) for key in keys
            ]
            for key, reply in zip(keys, self._pipelined("holders", calls), strict=True):
                found = _parse_holders(reply[1:], int(reply[0]))
                if found:
                    yield LeaseInfo(key=key, holders=found)

    def _pipelined(self, name: str, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run script ``name`` once per ``(keys, args)`` of ``calls`` in one pipeline
        (transaction=False): one round trip, one per node on Cluster. Returns the replies in
        order; raises what redis-py raises (the first error reply).
        """
        if self._pool is not None:  # the fast path pipelines them on a kept connection
            return self._call_all([(name, keys, args) for keys, args in calls])

        def send(calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                if self._cluster:  # redis-py refuses EVALSHA in a cluster pipeline
                    pipe.execute_command("EVAL", self._sources[name], len(keys), *keys, *args)
                else:
                    pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
            return list(pipe.execute(raise_on_error=self._cluster))  # Cluster: as before

        # EVALSHA as it is: a script registered on the pipeline would make redis-py send
        # SCRIPT EXISTS first, a second round trip every time. A call refused with NOSCRIPT (a
        # restarted or flushed server) did not run: load the script and send those again.
        replies = send(calls)
        noscript = _import_redis().exceptions.NoScriptError
        again = [i for i, reply in enumerate(replies) if isinstance(reply, noscript)]
        if again:
            self.client.script_load(self._sources[name])
            for i, reply in zip(again, send([calls[i] for i in again]), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def force_release(self, key: str, token: str | None = None) -> int:
        reply = self._call(
            "force_release",
            [self._k(key, "lease"), self._k(key, "signal")],
            [token or "", SIGNAL_TTL_MS],
        )
        return int(reply)

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        return bool(int(self._call("update_meta", [self._k(key, "lease")], [token, meta])))

    def take(self, key: str, token: str) -> str | None:
        reply = self._call(
            "take", [self._k(key, "lease"), self._k(key, "signal")], [token, SIGNAL_TTL_MS]
        )
        if reply is None:
            return None
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    def hand_over(
        self, key: str, token: str, new_token: str, ttl: float, *, meta: str | None = None
    ) -> bool:
        args = [token, new_token, _ms(ttl)] + ([] if meta is None else [meta])
        reply = self._call("hand_over", [self._k(key, "lease")], args)
        return bool(int(reply))

    def waiting(self, keys: Sequence[str]) -> list[bool] | None:
        # "#w" is the latest time a refused caller said it waits until (see acquire.lua): it
        # tells whether someone waits, not how many do. Two round trips: the pipeline (one
        # per node on Cluster), then the server's clock.
        if not keys:
            return []
        try:
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(self._k(key, "lease"), "#w")
            until: list[Any] = pipe.execute()
            now = self.client.time()
        except self._errors as exc:
            raise BackendError(f"waiting on {self._description} failed: {exc}") from exc
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        return [bool(u) and int(u) > now_ms for u in until]

    def record_lost(self, task: str) -> bool:
        reply = self._call(
            "record_lost",
            [f"{self.prefix}:stats:lost"],
            [task, MAX_LOST_TASKS, LOST_COUNTS_TTL_MS],
        )
        return bool(int(reply))

    def lost_counts(self) -> dict[str, LostCount] | None:
        try:
            raw = self.client.hgetall(f"{self.prefix}:stats:lost")
        except self._errors as exc:
            raise BackendError(f"lost_counts on {self._description} failed: {exc}") from exc
        fields = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
        return {
            name[2:]: LostCount(count=count, last_at=fields.get("t:" + name[2:], 0) / 1000.0)
            for name, count in fields.items()
            if name.startswith("n:")
        }

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            if self._owed:
                self._collect(conn)  # the answers of releases still owed on it
            conn.disconnect()
        try:
            self.client.close()
        except self._errors:  # closing a broken connection is not worth an error
            logger.debug("closing %s failed", self._description, exc_info=True)

    def describe(self) -> str:
        return self._description

    # -- helpers --------------------------------------------------------------------------

    def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._call_all([(name, keys, args)])[0]

    def _call_all(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run script calls in order, in one round trip on the fast path; return the replies."""
        return self._call_later(calls)()

    def _call_later(
        self, calls: Sequence[tuple[str, list[str], list[Any]]]
    ) -> Callable[[], list[Any]]:
        """Send script calls now on the fast path; return the reader of their replies, which
        makes the calls the usual way when the fast path could not (see _send)."""
        sent = self._send(calls) if self._pool is not None else None

        def replies() -> list[Any]:
            if sent is not None:
                read = sent()
                if read is not _RETRY:
                    return read  # type: ignore[no-any-return]
            return self._call_usual(calls)

        return replies

    def _call_usual(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> list[Any]:
        """Run script calls one by one through redis-py (which loads a script on NOSCRIPT)."""
        replies = []
        for name, keys, args in calls:
            try:
                replies.append(self._scripts[name](keys=keys, args=args))
            except self._errors as exc:
                raise BackendError(f"{name} on {self._description} failed: {exc}") from exc
        return replies

    def _send(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> Callable[[], Any] | None:
        """Send script calls on a kept connection now; return the reader of their replies.

        The fast path of every script call (a third of the client-side CPU of redis-py's
        command machinery, which a lease pays twice per run): ``EVALSHA`` written straight to
        a connection of the client's own pool, the reply read by the returned function, which
        gives the connection back. None when sending failed (nothing was sent: the caller
        takes the usual path). The reader returns ``_RETRY`` when the call must be made again
        the usual way, which loads the script (``NOSCRIPT``) and retries a broken connection
        as the client is configured to; it raises BackendError for any other error.
        """
        idle = self._idle
        conn = self._write(calls)
        if conn is None:
            return None

        def read() -> Any:
            replies: list[Any] = []
            error: tuple[str, BaseException] | None = None
            try:
                for name, _, _ in calls:  # read every reply: the connection stays in step
                    try:
                        replies.append(conn.read_response())
                    except self._reply_errors as exc:  # the server answered with an error
                        error = error or (name, exc)
            except BaseException:
                self._drop(conn)  # a reply half read must not reach the next user
                return _RETRY
            idle.append(conn)
            if error is None:
                return replies
            name, failure = error
            if isinstance(failure, self._no_script):
                return _RETRY  # the usual path loads the script (each call is safe to repeat)
            raise BackendError(f"{name} on {self._description} failed: {failure}") from failure

        return read

    def _write(self, calls: Sequence[tuple[str, list[str], list[Any]]]) -> Any:
        """Write script calls (EVALSHA) on a kept connection; return it, its replies unread.
        None when nothing could be sent."""
        conn = self._take()
        if conn is None:
            return None
        commands = [
            ("EVALSHA", self._shas[name], len(keys), *keys, *args) for name, keys, args in calls
        ]
        try:
            packed = _pack(commands) if self._pack_here else None
            conn.send_packed_command([packed] if packed else conn.pack_commands(commands))
        except BaseException:
            self._drop(conn)
            return None
        return conn

    def _take(self) -> Any:
        """A kept connection (or a new one from the pool), its owed answers read; None when
        the pool cannot give one."""
        try:
            conn = self._idle.pop()  # atomic: no two threads get one connection
        except IndexError:
            try:
                pool = self._pool
                conn = pool.get_connection() if self._pool_new_api else pool.get_connection("_")
            except self._errors:
                return None
        if self._owed:
            self._collect(conn)
        return conn

    def _collect(self, conn: Any) -> None:
        """Read the answers owed on ``conn`` (releases sent without waiting), in order."""
        with self._owed_lock:
            owed = self._owed.pop(id(conn), (None, []))[1]
        for n, item in enumerate(owed):
            try:
                reply = conn.read_response()
            except self._no_script:  # the server lost its scripts: load, release now
                item.answer(_try_release(item))
            except self._reply_errors as exc:  # answered with an error: still in step
                item.answer(BackendError(f"release on {self._description} failed: {exc}"))
            except BaseException as exc:
                conn.disconnect()  # every later answer on it is lost too; it reconnects
                error = BackendError(f"release on {self._description} failed: {exc}")
                for rest in owed[n:]:
                    rest.answer(error)
                return
            else:
                item.answer(bool(int(reply)))

    def _drop(self, conn: Any) -> None:
        if self._owed:
            self._collect(conn)  # sends nothing: the owed answers get their errors
        conn.disconnect()
        self._pool.release(conn)

    def _forget_connections(self) -> None:
        """In a forked child: the parent's connections are the parent's (never closed here)."""
        self._idle = []
        self._owed = {}
        self._owed_lock = threading.Lock()


def _try_release(item: _Owed) -> bool | BackendError:
    try:
        return item.again()
    except BackendError as exc:
        return exc


#: A fast-path reply that asks for the call to be made again the usual way (see _send).
_RETRY = object()


class _Owed:
    """A release sent whose answer is still to be read: ``done`` gets it (or the error);
    ``again`` makes the release the usual way."""

    __slots__ = ("_unread", "again", "done")

    def __init__(
        self, done: Callable[[bool | BackendError], object], again: Callable[[], bool]
    ) -> None:
        self.done = done
        self.again = again
        # Held until the answer is read: a lock, not an Event (one per release; an Event
        # costs a Condition and two locks).
        self._unread = threading.Lock()
        self._unread.acquire()

    def is_read(self) -> bool:
        return not self._unread.locked()

    def wait_read(self, timeout: float) -> None:
        if self._unread.acquire(timeout=timeout):
            self._unread.release()

    def answer(self, result: bool | BackendError) -> None:
        self._unread.release()  # called once: its answer is popped from the owed list
        try:
            self.done(result)
        except Exception:  # a receiver's error must not break the command that read it
            logger.exception("handling the answer of a release failed")


def _get_connection_takes_no_name(pool: Any) -> bool:
    """redis-py 5.3+ deprecates the command name ``ConnectionPool.get_connection`` required."""
    try:
        param = inspect.signature(pool.get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        return False
    return param is None or param.default is not inspect.Parameter.empty


def _pack(commands: Sequence[tuple[Any, ...]]) -> bytes | None:
    """The commands in the Redis protocol (RESP), as redis-py packs them with its default
    UTF-8 encoder, at a third of its cost; None when an argument is not str, bytes or int
    (redis-py packs those)."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is str:
                arg = arg.encode()
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes:
                return None
            out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _parse_holders(flat: Sequence[Any], now_ms: int) -> list[Holder]:
    """Parse ``field, value, ...`` pairs of a lease hash read at server time ``now_ms``; drop
    the "#" bookkeeping fields and expired holders."""
    holders = []
    for i in range(0, len(flat) - 1, 2):
        token = flat[i]
        if token[:1] in ("#", b"#"):
            continue
        value = flat[i + 1].decode() if isinstance(flat[i + 1], bytes) else str(flat[i + 1])
        exp, fence, acquired, renewed, meta = value.split("|", 4)
        if int(exp) > now_ms:
            holders.append(
                Holder.stored(
                    token, fence, exp, acquired, renewed, meta, now=now_ms, per_second=1000
                )
            )
    return holders


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    hosts = []
    for item in netloc.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or item.endswith("]"):  # no port given (or a bare [IPv6] address)
            host, port = item, str(default_port)
        if not host:
            raise ConfigurationError(f"invalid host:port {item!r} in Redis URL: no host")
        try:
            hosts.append((host.strip("[]"), int(port)))
        except ValueError as exc:
            raise ConfigurationError(f"invalid host:port {item!r} in Redis URL") from exc
    if not hosts or not all(h for h, _ in hosts):
        raise ConfigurationError("a Redis URL must name at least one host")
    return hosts


def _sentinel_client(parsed: RedisURL, kwargs: dict[str, Any]) -> Any:
    from redis.sentinel import Sentinel

    sentinel_kwargs = {"socket_timeout": kwargs["socket_timeout"]}
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        parsed.hosts,
        sentinel_kwargs=sentinel_kwargs,
        ssl=parsed.scheme.startswith("rediss"),
        **kwargs,
    )
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        parsed.service, db=parsed.db, password=parsed.password
    )


# -- URL parsing (no network) ---------------------------------------------------------------

_SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel", "sentinel"})
_CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
_PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})
#: Query parameters the store reads itself, on every Redis scheme.
OWN_OPTIONS = ("prefix", "socket_timeout", "fence_retention")
#: Query parameters of a Sentinel URL besides ours.
SENTINEL_OPTIONS = ("service_name", "db", "sentinel_password")


@dataclass(frozen=True)
class RedisURL:
    """A Redis store URL, parsed and checked: nothing is connected.

    ``query`` holds the parameters left for redis-py (plain schemes only), as given.
    """

    scheme: str
    description: str
    prefix: str | None
    socket_timeout: float
    fence_retention: float
    db: int
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    password: str | None = None
    sentinel_password: str | None = None
    query: dict[str, str] = field(default_factory=dict)


def parse_url(url: str) -> RedisURL:
    """Parse and check a Redis store URL without connecting; raise ConfigurationError.

    Every error names the bad part and the URL, with its password replaced by ``***``.
    ``valkey://`` and ``valkeys://`` are read as ``redis://`` and ``rediss://``.
    """
    if url[:6].lower() == "valkey":
        url = "redis" + url[len("valkey") :]
    desc = redact_url(url)

    def bad(what: str) -> ConfigurationError:
        return ConfigurationError(f"invalid Redis URL {desc!r}: {what}")

    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _PLAIN_SCHEMES | _SENTINEL_SCHEMES | _CLUSTER_SCHEMES:
        raise bad(f"not a Redis scheme: {scheme!r}")
    query: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        query[name] = value  # the last one wins, as in redis-py
    prefix = query.pop("prefix", None)
    if prefix is not None and (not prefix or "{" in prefix or "}" in prefix):
        raise bad(f"prefix must be a non-empty text without braces, not {prefix!r}")
    timeout = _seconds_option(bad, "socket_timeout", query.pop("socket_timeout", None))
    retention = _seconds_option(bad, "fence_retention", query.pop("fence_retention", None))
    common: dict[str, Any] = {
        "scheme": scheme,
        "description": desc,
        "prefix": prefix,
        "socket_timeout": DEFAULT_SOCKET_TIMEOUT if timeout is None else timeout,
        "fence_retention": DEFAULT_FENCE_RETENTION if retention is None else retention,
    }
    if scheme in _SENTINEL_SCHEMES:
        creds, _, hostlist = parts.netloc.rpartition("@")
        path = [p for p in parts.path.split("/") if p]
        service = query.pop("service_name", path[0] if path else "")
        if not service:
            raise ConfigurationError(
                "a Sentinel URL must name the service: redis+sentinel://host:26379/mymaster/0"
            )
        if len(path) > 2:
            raise bad(f"expected /service/db after the hosts, not {parts.path!r}")
        if len(path) > 1 and "db" in query:
            raise bad("the db is given twice: in the path and as ?db=")
        db = _db(bad, path[1] if len(path) > 1 else query.pop("db", "0"))
        sentinel_password = query.pop("sentinel_password", None)
        _refuse_rest(bad, query, OWN_OPTIONS + SENTINEL_OPTIONS, "a Sentinel URL")
        return RedisURL(
            **common,
            db=db,
            hosts=_checked_hosts(bad, hostlist, 26379),
            service=service,
            password=unquote(creds.partition(":")[2]) if creds else None,
            sentinel_password=sentinel_password,
        )
    if scheme in _CLUSTER_SCHEMES:
        if parts.path.strip("/"):
            raise bad("a Redis Cluster has only db 0: give no path after the hosts")
        _refuse_rest(bad, query, OWN_OPTIONS, "a Redis Cluster URL")
        hosts = _checked_hosts(bad, parts.netloc.rpartition("@")[2], 6379)
        return RedisURL(**common, db=0, hosts=hosts)
    if scheme == "unix":
        if not parts.path:
            raise bad("a unix:// URL needs the socket path: unix:///run/redis.sock")
        db_text = query.get("db", "0")
    else:
        try:
            parts.port  # noqa: B018  (read for its check: a port that is not a number)
        except ValueError as exc:
            raise bad(f"bad port: {exc}") from None
        if not parts.hostname:
            raise bad("no host")
        db_path = parts.path.strip("/") if parts.path not in ("", "/") else ""
        if db_path and "db" in query:
            raise bad("the db is given twice: in the path and as ?db=")
        db_text = query.get("db", db_path or "0")
    db = _db(bad, db_text)
    _check_redis_py_options(bad, query, scheme)
    return RedisURL(**common, db=db, query=query)


def _checked_hosts(bad: Any, netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    try:
        return tuple(_hosts(netloc, default_port))
    except ConfigurationError as exc:
        raise bad(str(exc)) from None


def _db(bad: Any, text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise bad(f"db must be a number >= 0 (as in redis://host:6379/0), not {text!r}")
    return int(text)


def _seconds_option(bad: Any, name: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise bad(f"{name} must be a number of seconds, not {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise bad(f"{name} must be a number of seconds > 0, not {text!r}")
    return value


def _refuse_rest(bad: Any, query: dict[str, str], known: tuple[str, ...], where: str) -> None:
    if query:
        raise bad(
            f"unknown option(s) {', '.join(sorted(query))} for {where} (known: "
            f"{', '.join(known)}); pass redis-py options as keyword arguments to connect()"
        )


def _check_redis_py_options(bad: Any, query: dict[str, str], scheme: str) -> None:
    """Refuse a query parameter redis-py does not know, or whose value it cannot read.

    redis-py passes unknown ones on to the connection class, which fails with a TypeError
    only when it first connects, inside a running task.
    """
    if not query:
        return
    redis = _import_redis()
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    connection_class = {
        "rediss": redis.SSLConnection,
        "unix": redis.UnixDomainSocketConnection,
    }.get(scheme, redis.Connection)
    known = set(URL_QUERY_ARGUMENT_PARSERS) - {"timeout"}  # timeout: BlockingConnectionPool's
    for klass in (*connection_class.__mro__, redis.ConnectionPool):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                known.add(param.name)
    known -= {"self", "host", "port", "path", "username", "password", "connection_class"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise bad(
            f"unknown option(s) {', '.join(unknown)}: neither the store's "
            f"({', '.join(OWN_OPTIONS)}) nor redis-py's"
        )
    parsers: dict[str, Any] = URL_QUERY_ARGUMENT_PARSERS
    for name, value in query.items():
        parser = parsers.get(name)
        if parser is None:
            continue
        try:
            parser(value)
        except (TypeError, ValueError):
            raise bad(f"{name} has an invalid value {value!r}") from None
