"""The contract every store implements: a few atomic operations, nothing else.

Policy (blocking, deadlines, renewal timing, tokens, hooks) lives in :mod:`celery_exclusive.lease`
and :mod:`celery_exclusive.renewal`. A backend does one atomic thing per method, in one round
trip where the store allows, and never offers a check-then-set fallback: a store that cannot do
an operation atomically does not get a backend.

Times cross this boundary as seconds (``float``); a backend converts to its wire unit. Expiry is
judged by the store's own clock wherever the store has one, never by the caller's.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ..exceptions import BackendError, ConfigurationError

__all__ = [
    "Backend",
    "Conflict",
    "Grant",
    "Holder",
    "LeaseInfo",
    "LostCount",
    "RenewRequest",
    "encode_meta",
    "parse_meta",
    "redact_url",
]

#: How long a key's fence counter outlives its last grant. Fences are seeded from the store's
#: clock in microseconds when a counter is created, so a counter that expired and is created
#: again still starts above every fence it ever handed out (see ``docs/guarantees.md``).
DEFAULT_FENCE_RETENTION = 7 * 24 * 3600.0

#: The first part of every key when none is named: the Redis and Django-cache stores' default,
#: and what the Celery and Django integrations and the CLI pass when neither their settings nor
#: the store URL name one (SQL stores default to no prefix of their own).
DEFAULT_PREFIX = "exclusive"

#: Suffix of the name under which stores that keep marks beside leases (SQL, Django caches)
#: record :meth:`Backend.mark_done`: ``"<key>{done}"``. Lease keys may not contain braces, so
#: it can never be a lease's key, and listings leave it out.
DONE = "{done}"


_META_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)


def encode_meta(meta: Mapping[str, Any]) -> str:
    """Turn a holder's metadata into the compact JSON text stores keep (see ``parse_meta``).

    One encoder for the process: ``json.dumps`` with options builds a new one per call, about
    a third of the cost of making a lease (7.9 vs 5.4 us for a Celery run's metadata).
    """
    return _META_ENCODER.encode(meta)


def parse_meta(text: str | None) -> dict[str, Any]:
    """Turn a holder's stored metadata (JSON text) into a dict, whatever the text holds."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {"raw": text}
    return value if isinstance(value, dict) else {"meta": value}


@dataclass(frozen=True)
class Holder:
    """One current holder of a key, as the store reports it."""

    token: str
    fence: int
    #: Seconds until this holder's lease expires (store clock).
    expires_in: float
    #: Unix time (store clock) of the grant and of the last renewal.
    acquired_at: float
    renewed_at: float
    #: What the holder said about itself: task id and name, worker node, host, pid, ...
    meta: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (for the CLI, logs and exceptions)."""
        return {
            "token": self.token,
            "fence": self.fence,
            "expires_in": round(self.expires_in, 3),
            "acquired_at": self.acquired_at,
            "renewed_at": self.renewed_at,
            **{k: v for k, v in self.meta.items() if k not in {"token", "fence"}},
        }

    @classmethod
    def stored(
        cls,
        token: str | bytes,
        fence: int | str,
        expires: float | str,
        acquired: float | str,
        renewed: float | str,
        meta: str | None,
        *,
        now: float | str = 0,
        per_second: float = 1.0,
    ) -> Holder:
        """Build a holder from a store's record: times in units of ``1 / per_second`` s.

        ``expires`` and ``now`` are read on the store's clock; ``expires_in`` is their
        difference, never negative.
        """
        return cls(
            token=token.decode() if isinstance(token, bytes) else str(token),
            fence=int(fence),
            expires_in=max((float(expires) - float(now)) / per_second, 0.0),
            acquired_at=float(acquired) / per_second,
            renewed_at=float(renewed) / per_second,
            meta=parse_meta(meta),
        )


@dataclass(frozen=True)
class Grant:
    """A successful acquire: the fence number of this grant."""

    fence: int
    #: True when the same token already held the key (the same owner asked again).
    reentered: bool = False


@dataclass(frozen=True)
class Conflict:
    """A refused acquire: who holds the key and when the earliest holder expires."""

    holders: Sequence[Holder]
    #: Seconds until the earliest current holder's lease expires (store clock).
    retry_in: float


class RenewRequest(NamedTuple):
    """One lease to renew in a :meth:`Backend.renew` batch (a tuple: a renewer builds one per
    lease held, every interval)."""

    key: str
    token: str
    ttl: float


@dataclass(frozen=True)
class LeaseInfo:
    """A key with at least one live holder, for listings."""

    key: str
    holders: Sequence[Holder]


@dataclass(frozen=True)
class LostCount:
    """How many leases of one task were lost, as recorded by :meth:`Backend.record_lost`."""

    count: int
    #: Unix time (store clock) of the last recorded loss.
    last_at: float


#: The most task names :meth:`Backend.record_lost` keeps counts for: the record stays small
#: whatever a misbehaving caller sends (a new name beyond this is not counted).
MAX_LOST_TASKS = 1000


class Backend(abc.ABC):
    """Atomic lease operations on one store.

    Implementations must be safe to call from several threads of one process and must
    reconnect by themselves in a forked child (each process gets its own connections).
    """

    #: The URL scheme(s) this backend answers to, for messages.
    scheme: str = ""

    @abc.abstractmethod
    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        """Grant ``key`` to ``token`` if fewer than ``limit`` live holders hold it.

        ``meta`` is the holder's metadata as compact JSON text. ``wait``: how long the caller
        will wait for a release if refused (a backend may use it to signal releases only while
        someone waits). A token that already holds the
        key gets its expiry extended and its existing fence back (``reentered=True``). Expired
        holders are dropped in the same step.
        """

    @abc.abstractmethod
    def release(self, key: str, token: str) -> bool:
        """Remove ``token``'s hold on ``key`` and wake one waiter.

        Return True only if ``token`` held a live lease; never touch another token's lease.
        """

    def send_release(
        self, key: str, token: str, done: Callable[[bool | BackendError], object]
    ) -> Callable[[], None] | None:
        """Send :meth:`release` without waiting for its answer, which ``done`` gets later
        (True or False as from release(), or the BackendError if it could not be read), from
        whichever thread reads it. Return ``collect``: read the answer now if nobody has yet
        (call it within a few seconds). None when this store cannot: nothing was sent."""
        return None

    @abc.abstractmethod
    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        """Extend every lease in ``requests`` that its token still holds, in one round trip.

        Return one bool per request: False means the lease is gone (expired, released, or
        force-released) and must be treated as lost.
        """

    @abc.abstractmethod
    def wait(self, key: str, timeout: float) -> bool:
        """Block until a release of ``key`` is signalled or ``timeout`` seconds pass.

        Return True when woken by a signal. Spurious wake-ups are allowed (the caller
        re-checks); missing a release is not, beyond ``timeout``.
        """

    @abc.abstractmethod
    def holders(self, key: str) -> list[Holder]:
        """Return the live holders of ``key`` (empty when free)."""

    @abc.abstractmethod
    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        """Yield every key with live holders, optionally filtered by a glob ``match``.

        Must not block the store (no ``KEYS``-style full scans in one call).
        """

    @abc.abstractmethod
    def force_release(self, key: str, token: str | None = None) -> int:
        """Remove ``token``'s hold (or every hold when None) on ``key``; return how many."""

    @abc.abstractmethod
    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        """Record for ``ttl`` seconds that task ``task_id`` ran to its end under ``key``.

        Celery redelivers an ``acks_late`` message whose worker died or whose ack came late;
        the copy asks :meth:`is_done` before running the body again. Not a lease: nobody
        holds it, it is not listed, and it lives in a place of its own (see :data:`DONE`).
        """

    @abc.abstractmethod
    def is_done(self, key: str, task_id: str) -> bool:
        """Whether :meth:`mark_done` recorded ``task_id`` under ``key`` less than its ttl ago."""

    def update_meta(self, key: str, token: str, meta: str) -> bool:
        """Replace ``token``'s metadata if it still holds a live lease; return whether it did.

        Optional (used by ``keep_last``); a backend that cannot do it atomically leaves it out.
        """
        raise ConfigurationError(f"the {self.describe()} store cannot update a holder in place")

    def take(self, key: str, token: str) -> str | None:
        """Release ``token``'s lease and return its metadata (None if it held none), atomically.

        Optional (used by ``keep_last``); a backend that cannot do it atomically leaves it out.
        """
        raise ConfigurationError(f"the {self.describe()} store cannot hand a lease over")

    def hand_over(
        self, key: str, token: str, new_token: str, ttl: float, *, meta: str | None = None
    ) -> bool:
        """Move ``token``'s live grant to ``new_token`` (same fence), atomically.

        ``meta`` (compact JSON text), when given, replaces the holder's metadata in the same
        step: the new owner's facts (a queued message's grant handed to the worker running
        it). Returns False if ``token`` held no live lease. Optional (used by ``until_done``, which
        falls back to one owner per task id without it).
        """
        raise ConfigurationError(f"the {self.describe()} store cannot hand a lease over")

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
        """:meth:`hand_over` from ``old_token`` to ``token`` (with ``meta``), then
        :meth:`acquire` for ``token``: the grant moved over (same fence), else a new one.

        Raises ConfigurationError on a store that cannot hand over. A backend may send both
        steps in one round trip; the second sees the first's result either way.
        """
        self.hand_over(key, old_token, token, ttl, meta=meta)
        return self.acquire(key, token, ttl=ttl, limit=limit, meta=meta, wait=wait)

    def waiting(self, keys: Sequence[str]) -> list[bool] | None:
        """Whether a refused caller waits for a release of each of ``keys``, in one round trip.

        Optional, for ``stats``: None when the store cannot tell (the default).
        """
        return None

    def record_lost(self, task: str) -> bool:
        """Count one lost lease of ``task`` in the store (best effort, for ``stats``).

        Optional: return False when the store keeps no such counts (the default). At most
        :data:`MAX_LOST_TASKS` task names are kept.
        """
        return False

    def lost_counts(self) -> dict[str, LostCount] | None:
        """The counts :meth:`record_lost` kept, by task name; None when it keeps none."""
        return None

    def close(self) -> None:  # noqa: B027 (optional hook, most backends have nothing to do)
        """Release connections held by this backend."""

    def describe(self) -> str:
        """Return a short, password-free description of the store for messages."""
        return self.scheme or type(self).__name__


def redact_url(url: str) -> str:
    """``url`` for messages and listings: the password hidden, query and fragment dropped.

    The query goes because it may carry secrets too (libpq's ``password=``, redis-py's
    ``password=``, ``sentinel_password=``). A URL that :func:`urllib.parse.urlsplit` refuses
    (an unclosed IPv6 bracket) is cut by hand, so that a message about it can still be written.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        scheme, sep, rest = url.partition("://")
        rest = rest.split("?", 1)[0].split("#", 1)[0]
        user, at, host = rest.rpartition("@")
        if at and ":" in user:
            rest = f"{user.partition(':')[0]}:***@{host}"
        return f"{scheme}{sep}{rest}"
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc, query="", fragment="").geturl()
