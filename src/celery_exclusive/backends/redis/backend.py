"""The Redis backend: what each operation of the contract sends, and how its reply is read.

Each operation is one Lua script (``lua/<name>.lua``, its KEYS and ARGV in its header); how
the calls travel (the fast path, releases read later, pipelines) is in :mod:`.calls`, and
URLs and clients in :mod:`.url`. The keys are drawn in the package's docstring.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from typing import Any

from ...exceptions import BackendError, LimitMismatch
from ..base import (
    DEFAULT_FENCE_RETENTION,
    DEFAULT_PREFIX,
    MAX_LOST_TASKS,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    LostCount,
    RenewRequest,
)
from ..url_options import count, seconds
from .calls import DEFAULT_REPLICA_TIMEOUT, Call, ScriptCalls, import_redis
from .url import OWN_OPTIONS, build_client, check_replica_timeout, parse_url

__all__ = [
    "LOST_COUNTS_TTL_MS",
    "RENEW_CHUNK",
    "SCAN_BATCH",
    "SCRIPTS",
    "SIGNAL_TTL_MS",
    "RedisBackend",
]

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

#: The scripts, one per operation: ``lua/<name>.lua``.
SCRIPTS = (
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


def _load_script(name: str) -> str:
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text(encoding="utf-8")


class RedisBackend(ScriptCalls, Backend):
    """Leases in Redis or Valkey.

    Build it from a URL with :func:`celery_exclusive.connect` or pass your own client::

        store = connect("redis://localhost:6379/0")
        store = connect(redis.Redis(...))          # or redis.cluster.RedisCluster(...)

    ``replicas=N``: each grant and renewal is confirmed by ``N`` replicas (``WAIT``) within
    ``replica_timeout`` seconds before it counts; a grant they do not confirm is given back and
    raises :class:`~celery_exclusive.BackendError`, a renewal they do not confirm raises it
    too (the renewer tries again until the lease's deadline). See ``docs/redis.md``.
    """

    scheme = "redis"

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_PREFIX,
        fence_retention: float = DEFAULT_FENCE_RETENTION,
        replicas: int = 0,
        replica_timeout: float = DEFAULT_REPLICA_TIMEOUT,
        description: str | None = None,
    ) -> None:
        redis = import_redis()
        self.replicas = count("replicas", replicas)
        self.replica_timeout = seconds("replica_timeout", replica_timeout)
        self.client: Any = client  # redis.Redis or redis.cluster.RedisCluster
        self.prefix = prefix
        self.fence_retention_ms = int(fence_retention * 1000)
        self._description = description or "redis"
        self._cluster = isinstance(client, redis.cluster.RedisCluster)
        self._setup_calls(client, {name: _load_script(name) for name in SCRIPTS})
        check_replica_timeout(self.replica_timeout, self._socket_timeout, self._description)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisBackend:
        """Build a backend from a ``redis://``, ``rediss://``, ``unix://``,
        ``redis+sentinel://`` or ``redis+cluster://`` URL.

        Sentinel: ``redis+sentinel://[:password@]host:port[,host:port...]/service/db``.
        Cluster: ``redis+cluster://host:port[,host:port...]`` (``rediss+cluster`` for TLS).
        ``prefix``, ``socket_timeout``, ``fence_retention``, ``replicas`` and
        ``replica_timeout`` are the store's options, in the query or as keyword arguments (a
        keyword wins); other keyword ``options`` go to
        redis-py, and so do the query's others on ``redis://``, ``rediss://`` and
        ``unix://`` (redis-py must know them). Every part is checked first
        (:func:`~celery_exclusive.backends.redis.parse_url`), before anything connects.
        """
        own = {name: options.pop(name) for name in OWN_OPTIONS if name in options}
        parsed = parse_url(url, **own)
        return cls(
            build_client(parsed, options),
            prefix=parsed.prefix,
            fence_retention=parsed.fence_retention,
            replicas=parsed.replicas,
            replica_timeout=parsed.replica_timeout,
            description=parsed.description,
        )

    # -- keys -----------------------------------------------------------------------------

    def _k(self, key: str, part: str) -> str:
        return f"{self.prefix}:{{{key}}}:{part}"

    # -- the contract ---------------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        call = self._acquire_call(key, token, ttl, limit, meta, wait)
        if self.replicas:
            return self._confirmed_grant(key, token, limit, self._confirmed_calls([call]))
        return self._granted(key, limit, self._call(*call))

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
        if self.replicas:
            replies = self._confirmed_calls([hand_over, acquire])
            return self._confirmed_grant(key, token, limit, replies[1:])
        replies = self._call_all([hand_over, acquire])
        return self._granted(key, limit, replies[1])

    def _acquire_call(
        self, key: str, token: str, ttl: float, limit: int, meta: str, wait: float
    ) -> Call:
        retention = max(self.fence_retention_ms, _ms(ttl) * 2)
        args = [token, _ms(ttl), limit, meta, retention, _ms(wait) if wait > 0 else 0]
        return "acquire", [self._k(key, "lease")], args

    def _release_call(self, key: str, token: str) -> Call:
        return "release", [self._k(key, "lease"), self._k(key, "signal")], [token, SIGNAL_TTL_MS]

    def _confirmed_calls(self, calls: Sequence[Call]) -> list[Any]:
        """The calls' replies, then how many replicas confirmed them (see ``_confirmed``)."""
        return self._confirmed(calls, self.replicas, self.replica_timeout)

    def _unconfirmed(self, what: str, acked: int) -> BackendError:
        return BackendError(
            f"{what} on {self._description} was not confirmed by {self.replicas} replica(s) "
            f"within {self.replica_timeout:g} s ({acked} did)"
        )

    def _confirmed_grant(
        self, key: str, token: str, limit: int, replies: Sequence[Any]
    ) -> Grant | Conflict:
        """Read an acquire's reply followed by ``WAIT``'s: a grant too few replicas confirmed
        is given back (a new one; a re-entered one was confirmed before) and raises."""
        result = self._granted(key, limit, replies[0])
        acked = int(replies[1])
        if isinstance(result, Conflict) or acked >= self.replicas:
            return result
        if not result.reentered:
            try:
                self.release(key, token)
            except BackendError:  # it expires at its ttl; nobody believes it held
                logger.warning("giving back an unconfirmed grant of %r failed", key, exc_info=True)
        raise self._unconfirmed(f"the grant of {key!r}", acked)

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
        # Sent on the fast path, its answer read by the connection's next user (_send_owed).
        if not self._release_loaded:
            return None  # the first release of a process waits: it loads the script
        return self._send_owed(
            self._release_call(key, token), lambda: self.release(key, token), done
        )

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
            if self.replicas:
                replies = self._confirmed_renewals(calls)
            else:
                replies = self._pipelined("renew", calls)
            for (_, batch), reply in zip(batches, replies, strict=True):
                flags = reply.decode() if isinstance(reply, bytes) else str(reply)
                for i, flag in zip(batch, flags, strict=True):
                    results[i] = flag == "1"
        except self._errors as exc:
            raise BackendError(f"renew on {self._description} failed: {exc}") from exc
        return results

    def _confirmed_renewals(self, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Renewal scripts with ``WAIT`` after them: one pipeline per node (one in all, but on
        a Cluster); raises BackendError unless the replicas confirmed every one."""
        by_node: dict[str, list[int]] = {}
        for i, (keys, _) in enumerate(calls):
            node = self.client.get_node_from_key(keys[0]).name if self._cluster else ""
            by_node.setdefault(node, []).append(i)
        replies: list[Any] = [None] * len(calls)
        for indexes in by_node.values():
            got = self._confirmed_calls([("renew", *calls[i]) for i in indexes])
            if int(got[-1]) < self.replicas:
                raise self._unconfirmed(f"the renewal of {len(indexes)} lease(s)", int(got[-1]))
            for i, reply in zip(indexes, got, strict=False):
                replies[i] = reply
        return replies

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
        call: Call = ("hand_over", [self._k(key, "lease")], args)
        if not self.replicas:
            return bool(int(self._call(*call)))
        moved, acked = self._confirmed_calls([call])
        if int(moved) and int(acked) < self.replicas:
            raise self._unconfirmed(f"the hand-over of {key!r}", int(acked))
        return bool(int(moved))

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
        self._close_connections()
        try:
            self.client.close()
        except self._errors:  # closing a broken connection is not worth an error
            logger.debug("closing %s failed", self._description, exc_info=True)

    def describe(self) -> str:
        return self._description


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
