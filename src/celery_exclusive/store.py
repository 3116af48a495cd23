"""Stores: :func:`connect` turns a URL (or a client) into a :class:`Store` that hands out leases.

Schemes::

    redis://[:password@]host:6379/0          Redis or Valkey (rediss:// for TLS, unix:// socket)
    redis+sentinel://host:26379,host2:26379/mymaster/0
    redis+cluster://host:7000,host2:7001     Redis Cluster (rediss+cluster:// for TLS)
    postgresql://user:pass@host:5432/db      PostgreSQL (also postgres://; needs the postgres extra)
    sqlite:///relative/path.db               SQLite, one host only (sqlite:////absolute/path.db)
    django-cache://default                   a Django cache alias (needs the django extra)
    memory://[name]                          this process only: for your unit tests

A redis-py ``Redis`` or ``RedisCluster`` object may be passed instead of a URL.
Nothing touches the network until the first operation.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .backends import registry
from .backends.base import Backend, Holder, LeaseInfo
from .exceptions import ConfigurationError
from .lease import Lease, LeaseSpec
from .renewal import Renewer, get_renewer
from .validate import optional_seconds, seconds

__all__ = ["DEFAULT_TTL", "MAX_KEY_LENGTH", "SCHEMES", "Store", "connect", "validate_url"]

DEFAULT_TTL = 30.0
MAX_KEY_LENGTH = 512
_BAD_KEY = re.compile(r"[\s{}\x00-\x1f\x7f]")

#: Every URL scheme :func:`connect` accepts (the registry of stores lists them).
SCHEMES: tuple[str, ...] = registry.SCHEMES


def validate_key(key: object) -> str:
    """Return ``key`` if it is usable as a lease key, else raise a clear error."""
    if not isinstance(key, str):
        raise ConfigurationError(f"a lease key must be a str, not {type(key).__name__}")
    if not key:
        raise ConfigurationError("a lease key must not be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise ConfigurationError(
            f"a lease key must be at most {MAX_KEY_LENGTH} characters, not {len(key)}; "
            "hash long values (celery_exclusive.keys does this for task arguments)"
        )
    bad = _BAD_KEY.search(key)
    if bad:
        raise ConfigurationError(
            f"a lease key must not contain whitespace, control characters or braces "
            f"(found {bad.group()!r} in {key!r})"
        )
    return key


#: Every holder's metadata names its host (and pid).
_HOST = socket.gethostname()


class Store:
    """A lease store: one backend plus the defaults for the leases it hands out.

    ::

        store = connect("redis://localhost:6379/0")
        with store.lease("nightly-sync"):
            ...
        for info in store.leases():
            print(info.key, info.holders[0].meta)
    """

    def __init__(
        self,
        backend: Backend,
        *,
        default_ttl: float = DEFAULT_TTL,
        renewer: Renewer | None = None,
    ) -> None:
        self.backend = backend
        self.default_ttl = seconds("default_ttl", default_ttl)
        self._renewer = renewer

    @property
    def renewer(self) -> Renewer:
        """The renewer this store's leases use (this process's shared one by default)."""
        return self._renewer if self._renewer is not None else get_renewer()

    def lease(
        self,
        key: str,
        *,
        ttl: float | None = None,
        limit: int = 1,
        meta: Mapping[str, Any] | None = None,
        token: str | None = None,
        max_hold: float | None = None,
        blocking: bool | None = None,
        timeout: float | None = None,
        auto_renew: bool = True,
        on_lost: Callable[[Lease, str], object] | None = None,
    ) -> Lease:
        """Return a :class:`Lease` on ``key`` (not yet acquired).

        ``ttl``: seconds a grant lasts without renewal (default 30). ``limit``: how many
        holders at once (1: a lock; N: a semaphore). ``meta``: JSON-able facts about the
        holder, shown by listings (host, pid and limit are added). ``token``: the owner token
        (random by default; the same token asking again is the same owner). ``max_hold``:
        stop renewing after this many seconds. ``blocking``/``timeout``: how ``with`` acquires
        (a ``timeout`` alone means blocking; ``blocking=True`` alone waits without limit).
        ``auto_renew``: renew in the background while held. ``on_lost``: called with
        ``(lease, reason)`` when renewal finds the lease gone.

        Every argument is checked here, once, into the lease's :class:`LeaseSpec`.
        """
        validate_key(key)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(f"limit must be an int >= 1, not {limit!r}")
        if meta is not None and not isinstance(meta, Mapping):
            raise ConfigurationError(f"meta must be a mapping, not {type(meta).__name__}")
        if token is not None:
            _validate_token(token)
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout < 0):
            raise ConfigurationError(f"timeout must be a number >= 0 or None, not {timeout!r}")
        spec = LeaseSpec(
            key=key,
            ttl=self.default_ttl if ttl is None else seconds("ttl", ttl),
            limit=limit,
            # The store keeps each holder's limit with it, to refuse a caller with another one.
            meta={"host": _HOST, "pid": os.getpid(), **(meta or {}), "limit": limit},
            token=token or secrets.token_hex(16),
            max_hold=optional_seconds("max_hold", max_hold),
            blocking=blocking,
            timeout=timeout,
            auto_renew=auto_renew,
            on_lost=on_lost,
        )
        return Lease(self.backend, spec, self.renewer)

    def holders(self, key: str) -> list[Holder]:
        """Return the live holders of ``key`` (empty when free)."""
        return self.backend.holders(validate_key(key))

    def leases(self, match: str | None = None) -> Iterator[LeaseInfo]:
        """Yield every held key (optionally filtered by a glob) with its holders."""
        return self.backend.scan(match)

    def force_release(self, key: str, token: str | None = None) -> int:
        """Remove one holder (by token) or all holders of ``key``; return how many.

        For operators: the holder is not told, and its next renewal reports the lease lost.
        Only live holders are counted; expired ones are dropped on the way.
        """
        if token is not None:
            _validate_token(token)
        return self.backend.force_release(validate_key(key), token)

    def close(self) -> None:
        """Close the store's connections."""
        self.backend.close()

    def __repr__(self) -> str:
        return f"<Store {self.backend.describe()}>"


def _validate_token(token: object) -> None:
    """Refuse a token a store could confuse with its own bookkeeping ('#' fields, '|')."""
    if not isinstance(token, str) or not token or "|" in token or token.startswith("#"):
        raise ConfigurationError(
            f"token must be a non-empty str without '|', not starting with '#'; not {token!r}"
        )


def connect(url: str | Any, *, default_ttl: float = DEFAULT_TTL, **options: Any) -> Store:
    """Return a :class:`Store` for ``url`` (see the module docs for the schemes).

    ``url`` may also be a redis-py client. Extra ``options`` go to the backend (for Redis:
    the ``prefix`` of every key, and redis-py connection options); a keyword option wins over
    the same option in the URL's query. A store whose driver is not installed raises
    :class:`ConfigurationError` naming the extra to install.
    """
    if isinstance(url, Backend):
        return Store(url, default_ttl=default_ttl)
    if not isinstance(url, str):
        return Store(registry.backend_for_client(url, **options), default_ttl=default_ttl)
    return Store(registry.backend_for(url, **options), default_ttl=default_ttl)


def validate_url(url: str) -> None:
    """Check a store URL as :func:`connect` would, without connecting or building a client.

    Raises :class:`ConfigurationError` for an unknown scheme, a bad db, number or path, or an
    unknown query option, naming the option and the URL (password hidden). Whether the
    server is reachable is not checked. For ``django-cache://`` only the URL is checked (the
    cache alias is checked by ``manage.py check``).
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a store URL must be a str, not {type(url).__name__}")
    registry.validate(url)
