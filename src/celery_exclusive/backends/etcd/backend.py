"""The etcd backend: each grant is a key with an etcd lease of its own.

Keys (``<prefix>`` is the store's prefix, ``exclusive`` unless named)::

    <prefix>/lease/<key>{<i>}        slot i (0 <= i < limit) of a lease key: JSON
                                     {"t": token, "l": etcd lease id, "n": limit,
                                      "a": unix time of the grant, "m": metadata JSON text},
                                     attached to the holder's own etcd lease
    <prefix>/done/<key>{<task id>}   a done mark, attached to a lease of its ttl
    <prefix>/stats/lost/<task>       lost leases of a task: {"n": count, "t": unix time}

A lease key cannot contain braces, so the slots of one key are exactly the range
``<prefix>/lease/<key>{`` .. ``<prefix>/lease/<key>|``.

- **Grant**: one transaction: "if no slot of the key exists, create slot 0"; when it fails it
  returns the slots, and the next transaction creates a free slot "if no slot of the key
  changed since that read" (a compare of ``mod_revision`` over the key's whole range). A key
  this process was refused since its last grant here is read first (a refused Celery
  duplicate, a woken waiter): a read that finds it full refuses with no etcd lease granted
  (read + the holders' time left: 2 requests for one holder, not 4), and one that finds a
  free slot is the first step of the grant (read, grant, transaction on "unchanged since").
  The fence is the grant's revision (the slot's ``create_revision``): etcd's revision is
  cluster-wide, never repeats and only rises, so fences rise strictly per key, across leader
  changes.
- **Expiry**: each grant has an etcd lease of its own, of ``ceil(ttl)`` seconds (etcd's unit;
  etcd raises it to its minimum, 2 s with default settings). Expiry is judged by the etcd
  leader; a lease's keys are deleted when it expires. The holder's local deadline stays
  ``ttl``, never later than etcd's.
- **Renewal**: one keep-alive request for every lease of the batch (the gateway takes many
  lease ids in one request body), then one read-only transaction per 128 leases (etcd's
  default ``--max-txn-ops``): "each slot is still attached to its etcd lease". A take or a
  hand-over deletes or rewrites a slot and then revokes the old etcd lease; if that revoke is
  lost, the lease lives on with no slot, and only this check refuses its renewal.
- **Release, force-release**: a revoke of the holder's etcd lease, which deletes its slot in
  the same step. A lease id belongs to one (slot, token) for its whole life: a hand-over gives
  the new owner a new etcd lease, so revoking an old owner's lease never frees a new owner.
- **Waiting**: a watch of the key's range from the revision of the refused read, woken by the
  next deletion (a release, a revoke, an expiry).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ... import forking
from ...exceptions import BackendError, LimitMismatch
from ..base import (
    MAX_LOST_TASKS,
    Backend,
    Conflict,
    Grant,
    Holder,
    LeaseInfo,
    LostCount,
    RenewRequest,
    parse_meta,
)
from .gateway import NOT_FOUND, EtcdError, Gateway, b64, unb64
from .url import parse_url

__all__ = ["MAX_TRIES", "MAX_TXN_OPS", "SCAN_PAGE", "EtcdBackend", "lease_seconds"]

logger = logging.getLogger(__name__)

#: Transactions one acquire may send before it gives up on a key that keeps changing.
MAX_TRIES = 32

#: Operations one transaction may hold (etcd's default ``--max-txn-ops``): a renewal checks
#: at most this many slots per transaction.
MAX_TXN_OPS = 128

#: Slots a listing reads at a time.
SCAN_PAGE = 500

#: Grants this process remembers (key, token) -> (slot, etcd lease), so that a release or a
#: renewal need not read the key first; forgotten ones are read again.
MAX_REMEMBERED = 100_000


def lease_seconds(ttl: float) -> int:
    """The etcd lease TTL of a lease of ``ttl`` seconds: whole seconds, rounded up."""
    return max(1, math.ceil(ttl))


def range_end(prefix: bytes) -> bytes:
    """The end of the range of every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


@dataclass(frozen=True)
class _Slot:
    name: bytes
    index: int
    token: str
    lease: int
    limit: int
    acquired: float
    meta: str
    fence: int
    mod: int


def _slot(kv: dict[str, Any]) -> _Slot | None:
    name = unb64(kv.get("key", ""))
    try:
        value = json.loads(unb64(kv.get("value", "")))
        index = int(name[name.rindex(b"{") + 1 : -1])
        return _Slot(
            name=name,
            index=index,
            token=str(value["t"]),
            lease=int(value["l"]),
            limit=int(value["n"]),
            acquired=float(value.get("a", 0.0)),
            meta=str(value.get("m", "")),
            fence=int(kv.get("create_revision", 0)),
            mod=int(kv.get("mod_revision", 0)),
        )
    except (ValueError, KeyError, TypeError):
        return None  # not a slot of ours


def _value(token: str, lease: int, limit: int, meta: str, acquired: float) -> str:
    return json.dumps(
        {"t": token, "l": str(lease), "n": limit, "a": round(acquired, 6), "m": meta},
        separators=(",", ":"),
    )


class EtcdBackend(Backend):
    """Leases in etcd (3.4 or later), through its JSON gateway.

    Build it with ``connect("etcd://host:2379,host2:2379")``; ``prefix`` and
    ``socket_timeout`` are its options (query or keywords).
    """

    scheme = "etcd"

    def __init__(self, gateway: Gateway, *, prefix: str, description: str = "etcd") -> None:
        self.gateway = gateway
        self.prefix = prefix
        self._description = description
        self._root = f"{prefix}/lease/".encode()
        self._grants: dict[tuple[str, str], tuple[bytes, int]] = {}
        #: Keys refused here since their last grant here: their next acquire reads first.
        self._refused: dict[str, None] = {}
        self._lock = threading.Lock()
        forking.replace_after_fork(self, "_lock", threading.Lock)
        self._seen = threading.local()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> EtcdBackend:
        """Build a backend from an ``etcd://`` or ``etcd+https://`` URL (nothing connects)."""
        parsed = parse_url(url, **options)
        gateway = Gateway(parsed.members, timeout=parsed.socket_timeout, tls=parsed.ssl_context())
        return cls(gateway, prefix=parsed.prefix, description=parsed.description)

    # -- keys and small calls ---------------------------------------------------------------

    def _range(self, key: str) -> tuple[bytes, bytes]:
        start = self._root + key.encode() + b"{"
        return start, range_end(start)

    def _read(self, key: str) -> tuple[list[_Slot], int]:
        start, end = self._range(key)
        reply = self.gateway.call("kv/range", {"key": b64(start), "range_end": b64(end)})
        return _slots(reply.get("kvs", [])), int(reply["header"]["revision"])

    def _grant_lease(self, ttl: float) -> int:
        reply = self.gateway.call("lease/grant", {"TTL": str(lease_seconds(ttl))})
        return int(reply["ID"])

    def _revoke(self, lease: int) -> bool:
        """Revoke ``lease`` (deleting its slot); False when etcd no longer had it."""
        try:
            self.gateway.call("lease/revoke", {"ID": str(lease)})
        except EtcdError as exc:
            if exc.code == NOT_FOUND:
                return False
            raise
        return True

    def _revoke_quietly(self, lease: int) -> None:
        try:
            self._revoke(lease)
        except BackendError:  # it expires by itself within its ttl
            logger.debug("revoking etcd lease %x failed", lease, exc_info=True)

    def _revoke_moved(self, lease: int) -> None:
        """Revoke the etcd lease of a grant whose slot was just taken or handed over: no key
        is attached to it any more. Best effort: if this fails, the old owner's keep-alives
        still succeed, and its renewal is refused by the slot check in :meth:`renew`."""
        self._revoke_quietly(lease)

    def _ttl(self, lease: int) -> tuple[int, int]:
        """(seconds left, granted seconds) of ``lease``; (-1, 0) when it is gone."""
        reply = self.gateway.call("lease/timetolive", {"ID": str(lease)})
        return int(reply.get("TTL", 0)), int(reply.get("grantedTTL", 0))  # 0 is left out

    def _alive(self, lease: int) -> bool:
        """Whether ``lease`` lives (renewing it): etcd answers 0 for an expired one."""
        return self.gateway.keep_alive([lease]).get(lease, 0) > 0

    def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]]) -> dict[str, Any]:
        return self.gateway.call("kv/txn", {"compare": compare, "success": success})

    # -- what this process granted -----------------------------------------------------------

    def _remember(self, key: str, token: str, name: bytes, lease: int) -> None:
        with self._lock:
            if len(self._grants) >= MAX_REMEMBERED:
                self._grants.clear()  # read again when needed
            self._grants[key, token] = (name, lease)

    def _forget(self, key: str, token: str) -> tuple[bytes, int] | None:
        with self._lock:
            return self._grants.pop((key, token), None)

    def _find(self, key: str, token: str) -> _Slot | None:
        slots, _ = self._read(key)
        return next((s for s in slots if s.token == token), None)

    def _grant_of(self, key: str, token: str) -> tuple[bytes, int] | None:
        """(slot name, etcd lease) of ``token``'s grant on ``key``, remembered or read."""
        with self._lock:
            known = self._grants.get((key, token))
        if known is not None:
            return known
        found = self._find(key, token)
        if found is None:
            return None
        self._remember(key, token, found.name, found.lease)
        return found.name, found.lease

    # -- the contract ----------------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        read: tuple[int, int] | None = None  # (free slot, revision) a read found
        if key in self._refused:  # refused lately here: likely full, so look before granting
            slots, revision = self._read(key)
            decided = self._decide(key, token, limit, slots, revision, lease=0)
            if not isinstance(decided, int):
                return decided  # refused or re-entered: no etcd lease granted
            read = (decided, revision)
        lease = self._grant_lease(ttl)
        used = False
        try:
            result = self._take_slot(key, token, limit, meta, lease, read)
            used = isinstance(result, Grant) and not result.reentered
            return result
        finally:
            if not used:  # refused, re-entered or failed: nothing holds this etcd lease
                self._revoke_quietly(lease)

    def _take_slot(
        self, key: str, token: str, limit: int, meta: str, lease: int, read: tuple[int, int] | None
    ) -> Grant | Conflict:
        """Transactions that put a slot of ``key`` under ``lease``: "if the key has no slot"
        first, or "if no slot changed since ``read``" (a free slot and the read's revision)."""
        start, end = self._range(key)
        whole = {"key": b64(start), "range_end": b64(end)}
        index, compare = (
            0,
            [{**whole, "target": "CREATE", "create_revision": "0", "result": "EQUAL"}],
        )
        if read is not None:
            index, compare = read[0], [_unchanged_since(whole, read[1])]
        value = b64(_value(token, lease, limit, meta, time.time()))
        for _ in range(MAX_TRIES):
            name = start + f"{index}}}".encode()
            put = {"request_put": {"key": b64(name), "value": value, "lease": str(lease)}}
            reply = self.gateway.call(
                "kv/txn",
                {"compare": compare, "success": [put], "failure": [{"request_range": whole}]},
            )
            revision = int(reply["header"]["revision"])
            if reply.get("succeeded"):
                self._remember(key, token, name, lease)
                self._refused.pop(key, None)
                return Grant(fence=revision)
            kvs = reply["responses"][0]["response_range"].get("kvs", [])
            decided = self._decide(key, token, limit, _slots(kvs), revision, lease)
            if not isinstance(decided, int):
                return decided
            index = decided
            compare = [_unchanged_since(whole, revision)]
        raise BackendError(f"acquire of {key!r} on {self._description}: the key kept changing")

    def _decide(
        self, key: str, token: str, limit: int, slots: list[_Slot], revision: int, lease: int
    ) -> Grant | Conflict | int:
        """What the slots read at ``revision`` allow: a re-entry, a refusal, or a free slot.

        A slot of ``token`` under ``lease`` (this acquire's own etcd lease) is this acquire's
        grant: a transaction that timed out on one member and was applied all the same.
        """
        mine = next((s for s in slots if s.token == token), None)
        if mine is not None and mine.lease == lease:
            self._remember(key, token, mine.name, lease)
            return Grant(fence=mine.fence)
        if mine is not None and self._alive(mine.lease):
            self._remember(key, token, mine.name, mine.lease)
            return Grant(fence=mine.fence, reentered=True)
        for other in slots:
            if other.token != token and other.limit != limit:
                raise LimitMismatch(key=key, limit=other.limit, requested=limit)
        if len(slots) >= limit:
            self._seen_revisions()[key] = revision
            if len(self._refused) >= MAX_REMEMBERED:
                self._refused.clear()
            self._refused[key] = None
            holders = self._describe(slots)
            retry_in = min((h.expires_in for h in holders), default=0.5)
            return Conflict(holders=holders, retry_in=max(retry_in, 0.05))
        return min(set(range(limit)) - {s.index for s in slots})

    def _describe(self, slots: Sequence[_Slot]) -> list[Holder]:
        """The holders of ``slots`` whose etcd lease is still there, as listings show them.

        etcd tells a lease's time left in whole seconds, rounded down: ``expires_in`` is that
        plus half a second (at most the lease's TTL).
        """
        holders = []
        now = time.time()
        for s in slots:
            left, granted = self._ttl(s.lease)
            if left < 0:
                continue  # revoked or expired: its slot is being deleted
            expires_in = min(left + 0.5, float(granted))
            holders.append(
                Holder(
                    token=s.token,
                    fence=s.fence,
                    expires_in=expires_in,
                    acquired_at=s.acquired,
                    renewed_at=max(now - (granted - expires_in), s.acquired),
                    meta=parse_meta(s.meta),
                )
            )
        return holders

    def _seen_revisions(self) -> dict[str, int]:
        seen: dict[str, int] | None = getattr(self._seen, "revisions", None)
        if seen is None or len(seen) > 1000:
            seen = self._seen.revisions = {}
        return seen

    def release(self, key: str, token: str) -> bool:
        known = self._forget(key, token)
        if known is None:
            found = self._find(key, token)
            if found is None:
                return False
            known = (found.name, found.lease)
        return self._revoke(known[1])

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        """Keep every request's etcd lease alive (one keep-alive batch), then check that each
        live one still carries its slot: a slot taken or handed over, whose old etcd lease
        could not be revoked, must not be renewed as if it were still held."""
        if not requests:
            return []
        grants = [self._grant_of(r.key, r.token) for r in requests]
        ttls = self.gateway.keep_alive(list(dict.fromkeys(g[1] for g in grants if g)))
        live = [
            (i, requests[i].token, g) for i, g in enumerate(grants) if g and ttls.get(g[1], 0) > 0
        ]
        results = [False] * len(requests)
        for start in range(0, len(live), MAX_TXN_OPS):
            chunk = live[start : start + MAX_TXN_OPS]
            owned = self._still_owned([(token, *grant) for _, token, grant in chunk])
            for (i, _, _), ok in zip(chunk, owned, strict=True):
                results[i] = ok
        for r, ok in zip(requests, results, strict=True):
            if not ok:
                self._forget(r.key, r.token)
        return results

    def _still_owned(self, grants: Sequence[tuple[str, bytes, int]]) -> list[bool]:
        """Whether each (token, slot name, etcd lease) slot still carries that lease and token.

        One read-only transaction: "every slot is attached to its lease" (a lease belongs to
        one grant, so to one token); only when that fails are the slots read and told apart.
        """
        compare = [
            {"key": b64(name), "target": "LEASE", "lease": str(lease), "result": "EQUAL"}
            for _, name, lease in grants
        ]
        reads = [{"request_range": {"key": b64(name)}} for _, name, _ in grants]
        reply = self.gateway.call("kv/txn", {"compare": compare, "success": [], "failure": reads})
        if reply.get("succeeded"):
            return [True] * len(grants)
        owned = []
        for (token, _, lease), answer in zip(grants, reply["responses"], strict=True):
            slots = _slots(answer["response_range"].get("kvs", []))
            owned.append(bool(slots) and (slots[0].token, slots[0].lease) == (token, lease))
        return owned

    def wait(self, key: str, timeout: float) -> bool:
        if timeout <= 0:
            return False
        revision = self._seen_revisions().pop(key, 0)
        start, end = self._range(key)
        return self.gateway.watch_deletes(start, end, revision + 1 if revision else 0, timeout)

    def holders(self, key: str) -> list[Holder]:
        slots, _ = self._read(key)
        return self._describe(slots)

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        end = range_end(self._root)
        start = self._root
        group: list[_Slot] = []
        for _ in range(10_000_000):  # one page per step, each one past the last
            reply = self.gateway.call(
                "kv/range", {"key": b64(start), "range_end": b64(end), "limit": str(SCAN_PAGE)}
            )
            kvs = reply.get("kvs", [])
            for slot in _slots(kvs):
                if group and self._key_of(group[0]) != self._key_of(slot):
                    yield from self._listed(group, match)
                    group = []
                group.append(slot)
            if not reply.get("more") or not kvs:
                break
            start = unb64(kvs[-1]["key"]) + b"\x00"
        yield from self._listed(group, match)

    def _key_of(self, slot: _Slot) -> str:
        return slot.name[len(self._root) : slot.name.rindex(b"{")].decode()

    def _listed(self, group: list[_Slot], match: str | None) -> Iterator[LeaseInfo]:
        if not group:
            return
        key = self._key_of(group[0])
        if match is not None and not fnmatch.fnmatchcase(key, match):
            return
        found = self._describe(group)
        if found:
            yield LeaseInfo(key=key, holders=found)

    def force_release(self, key: str, token: str | None = None) -> int:
        slots, _ = self._read(key)
        removed = 0
        for s in slots:
            if token is not None and s.token != token:
                continue
            if not self._alive(s.lease):
                continue  # expired: etcd is deleting it (a keep-alive waits for that)
            if self._revoke(s.lease):
                removed += 1
        return removed

    # -- done marks and lost counts -----------------------------------------------------------

    def _done_name(self, key: str, task_id: str) -> bytes:
        return f"{self.prefix}/done/{key}{{{task_id}}}".encode()

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        lease = self._grant_lease(ttl)
        name = self._done_name(key, task_id)
        self.gateway.call("kv/put", {"key": b64(name), "value": b64("1"), "lease": str(lease)})

    def is_done(self, key: str, task_id: str) -> bool:
        name = self._done_name(key, task_id)
        reply = self.gateway.call("kv/range", {"key": b64(name), "count_only": True})
        return int(reply.get("count", 0)) > 0

    def _lost_root(self) -> bytes:
        return f"{self.prefix}/stats/lost/".encode()

    def record_lost(self, task: str) -> bool:
        name = self._lost_root() + task.encode()
        for _ in range(8):  # best effort: a few compare-and-set tries
            reply = self.gateway.call("kv/range", {"key": b64(name)})
            kvs = reply.get("kvs", [])
            if kvs:
                count = int(json.loads(unb64(kvs[0]["value"])).get("n", 0))
                cmp = {"target": "MOD", "mod_revision": kvs[0]["mod_revision"]}
            else:
                if self._lost_tasks() >= MAX_LOST_TASKS:
                    return False
                count, cmp = 0, {"target": "CREATE", "create_revision": "0"}
            value = json.dumps({"n": count + 1, "t": time.time()})
            put = {"request_put": {"key": b64(name), "value": b64(value)}}
            if self._txn([{"key": b64(name), "result": "EQUAL", **cmp}], [put]).get("succeeded"):
                return True
        return False

    def _lost_tasks(self) -> int:
        root = self._lost_root()
        body = {"key": b64(root), "range_end": b64(range_end(root)), "count_only": True}
        return int(self.gateway.call("kv/range", body).get("count", 0))

    def lost_counts(self) -> dict[str, LostCount] | None:
        root = self._lost_root()
        reply = self.gateway.call("kv/range", {"key": b64(root), "range_end": b64(range_end(root))})
        counts = {}
        for kv in reply.get("kvs", []):
            value = json.loads(unb64(kv["value"]))
            task = unb64(kv["key"])[len(root) :].decode()
            counts[task] = LostCount(count=int(value["n"]), last_at=float(value["t"]))
        return counts

    # -- optional steps: in place, hand-over ----------------------------------------------------

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        found = self._find(key, token)
        if found is None:
            return False
        value = _value(token, found.lease, found.limit, meta, found.acquired)
        put = {"request_put": {"key": b64(found.name), "value": b64(value), "ignore_lease": True}}
        return bool(self._txn([_same_lease(found)], [put]).get("succeeded"))

    def take(self, key: str, token: str) -> str | None:
        found = self._find(key, token)
        if found is None or not self._alive(found.lease):
            return None
        delete = {"request_delete_range": {"key": b64(found.name), "prev_kv": True}}
        reply = self._txn([_same_lease(found)], [delete])
        if not reply.get("succeeded"):
            return None
        self._forget(key, token)
        self._revoke_moved(found.lease)
        prev = reply["responses"][0]["response_delete_range"].get("prev_kvs", [])
        taken = _slots(prev)
        return taken[0].meta if taken else found.meta

    def hand_over(
        self, key: str, token: str, new_token: str, ttl: float, *, meta: str | None = None
    ) -> bool:
        found = self._find(key, token)
        if found is None or not self._alive(found.lease):
            return False
        lease = self._grant_lease(ttl)
        moved = False
        try:
            kept = found.meta if meta is None else meta
            value = _value(new_token, lease, found.limit, kept, found.acquired)
            put = {
                "request_put": {"key": b64(found.name), "value": b64(value), "lease": str(lease)}
            }
            moved = bool(self._txn([_same_lease(found)], [put]).get("succeeded"))
        finally:
            if not moved:
                self._revoke_quietly(lease)
        if not moved:
            return False
        self._forget(key, token)
        self._remember(key, new_token, found.name, lease)
        self._revoke_moved(found.lease)
        return True

    def close(self) -> None:
        self.gateway.close()

    def describe(self) -> str:
        return self._description


def _slots(kvs: Sequence[dict[str, Any]]) -> list[_Slot]:
    return [s for s in map(_slot, kvs) if s is not None]


def _unchanged_since(whole: dict[str, str], revision: int) -> dict[str, Any]:
    """A compare: no key of the range ``whole`` was created, changed or deleted after
    ``revision`` (every one's ``mod_revision`` is at most that)."""
    return {**whole, "target": "MOD", "mod_revision": str(revision + 1), "result": "LESS"}


def _same_lease(slot: _Slot) -> dict[str, Any]:
    """A compare: ``slot`` still exists, attached to the same etcd lease (so the same grant)."""
    return {"key": b64(slot.name), "target": "LEASE", "lease": str(slot.lease), "result": "EQUAL"}
