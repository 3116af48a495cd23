"""The stores :func:`celery_exclusive.connect` knows: one :class:`StoreType` per store.

Every fact about a kind of store that code outside its backend needs lives here, once:

- the URL schemes that name it (``redis://``, ``postgresql://`` ...), and the spellings read as
  another (``valkey://`` is ``redis://``);
- the function that builds its backend from a URL, ``from_url(url, **options)``, and the one
  that checks a URL without connecting, both imported only when used;
- the driver it needs and the extra that installs it, so that a missing driver is a
  :class:`ConfigurationError` that says ``pip install 'celery-exclusive[postgres]'``;
- how its URL is shown in messages (:func:`redact`);
- whether a Celery app's result backend or broker of that kind may serve as its lock store
  when none is named (Redis only: see :func:`celery_exclusive.config.celery_fallback_url`).

:func:`celery_exclusive.store.connect`, :func:`celery_exclusive.store.validate_url`, the
Celery app, the Django app and the CLI all read this table. To add a store: write its backend
with a ``from_url(url, **options)`` (options: :mod:`celery_exclusive.backends.url_options`),
add a :class:`StoreType` to :data:`STORE_TYPES`, and run the contract suite on it.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .. import forking
from ..exceptions import ConfigurationError
from .base import Backend, redact_url

__all__ = [
    "SCHEMES",
    "STORE_TYPES",
    "StoreType",
    "backend_for",
    "backend_for_client",
    "memory_backend",
    "redact",
    "store_type",
    "validate",
]


@dataclass(frozen=True)
class StoreType:
    """One kind of store: its schemes, how its backend is built and checked, what it needs.

    ``build`` and ``check`` are ``"module:attribute"`` paths (``attribute`` may be dotted),
    imported at first use so that no driver is imported before a store of its kind is asked
    for. ``check`` parses a URL as ``build`` would, without connecting; None when there is
    nothing to check. ``driver`` is the module the backend imports (None: the standard
    library's), ``package`` its name for people, ``extra`` the extra that installs it.
    ``aliases`` maps a scheme to the one the backend reads (``valkey`` -> ``redis``).
    ``client_modules``: the top-level modules of client objects the backend wraps (a redis-py
    ``Redis``), built with ``wrap(client, **options)``. ``celery_fallback``: a Celery result
    backend or broker URL of this kind may serve as the lock store when none is named.
    """

    name: str
    schemes: tuple[str, ...]
    build: str
    check: str | None = None
    driver: str | None = None
    package: str = ""
    extra: str | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    client_modules: tuple[str, ...] = ()
    wrap: str | None = None
    celery_fallback: bool = False
    redact: Callable[[str], str] = redact_url

    def require(self) -> None:
        """Import this store's driver, or raise a :class:`ConfigurationError` naming the extra."""
        if self.driver is None:
            return
        try:
            importlib.import_module(self.driver)
        except ImportError as exc:
            raise ConfigurationError(
                f"the {self.name} store needs {self.package or self.driver}, which could not be "
                f"imported ({exc}): pip install 'celery-exclusive[{self.extra}]'"
            ) from exc

    def backend(self, url: str, **options: Any) -> Backend:
        """Build this store's backend for ``url`` (its driver checked first; nothing connects)."""
        self.require()
        built: Backend = _resolve(self.build)(self._unaliased(url), **options)
        return built

    def validate(self, url: str) -> None:
        """Check ``url`` as :meth:`backend` would, without connecting or building a client."""
        if self.check is not None:
            _resolve(self.check)(self._unaliased(url))

    def _unaliased(self, url: str) -> str:
        scheme, sep, rest = url.partition("://")
        read_as = self.aliases.get(scheme.lower())
        return f"{read_as}{sep}{rest}" if read_as else url


_REDIS_SCHEMES = (
    "redis", "rediss", "unix", "valkey", "valkeys",
    "redis+sentinel", "rediss+sentinel", "sentinel",
    "redis+cluster", "rediss+cluster",
)  # fmt: skip

#: Every store, in the order :data:`SCHEMES` and error messages list them.
STORE_TYPES: tuple[StoreType, ...] = (
    StoreType(
        name="Redis",
        schemes=_REDIS_SCHEMES,
        build="celery_exclusive.backends.redis:RedisBackend.from_url",
        check="celery_exclusive.backends.redis:parse_url",
        driver="redis",
        package="redis-py",
        extra="redis",
        aliases={"valkey": "redis", "valkeys": "rediss"},
        client_modules=("redis", "valkey"),
        wrap="celery_exclusive.backends.redis:RedisBackend",
        celery_fallback=True,
    ),
    StoreType(
        name="PostgreSQL",
        schemes=("postgresql", "postgres"),
        build="celery_exclusive.backends.sql:PostgresBackend.from_url",
        # libpq's own parser checks the URL (psycopg needed); nothing connects.
        check="celery_exclusive.backends.sql:PostgresBackend.from_url",
        driver="psycopg",
        package="psycopg 3",
        extra="postgres",
    ),
    StoreType(
        name="SQLite",
        schemes=("sqlite",),
        build="celery_exclusive.backends.sql:SQLiteBackend.from_url",
        check="celery_exclusive.backends.sql:SQLiteBackend.from_url",  # opens the file lazily
    ),
    StoreType(
        name="Django cache",
        schemes=("django-cache",),
        build="celery_exclusive.backends.django_cache:from_url",
        check="celery_exclusive.backends.django_cache:parse_url",  # the alias: manage.py check
        driver="django",
        package="Django",
        extra="django",
    ),
    StoreType(
        name="etcd",
        schemes=("etcd", "etcd+https"),
        build="celery_exclusive.backends.etcd:EtcdBackend.from_url",
        check="celery_exclusive.backends.etcd:parse_url",
        # No driver: the standard library's http.client talks to etcd's JSON gateway.
        extra="etcd",
    ),
    StoreType(
        name="memory",
        schemes=("memory",),
        build="celery_exclusive.backends.registry:memory_backend",
    ),
)

_BY_SCHEME: dict[str, StoreType] = {s: kind for kind in STORE_TYPES for s in kind.schemes}

#: Every URL scheme :func:`celery_exclusive.connect` accepts.
SCHEMES: tuple[str, ...] = tuple(_BY_SCHEME)


def store_type(url: str) -> StoreType:
    """Return the kind of store ``url`` names; refuse a URL that is not a known store's."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        raise ConfigurationError(
            f"not a store URL: {redact_url(url)!r}; expected e.g. redis://localhost:6379/0 "
            "or memory://"
        )
    kind = _BY_SCHEME.get(scheme.lower())
    if kind is None:
        raise ConfigurationError(
            f"unknown store scheme {scheme.lower()!r} in {redact_url(url)!r}; "
            f"supported: {', '.join(SCHEMES)}"
        )
    try:
        urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket, a bad character in the host
        raise ConfigurationError(f"invalid store URL {redact(url)!r}: {exc}") from None
    return kind


def backend_for(url: str, **options: Any) -> Backend:
    """Build the backend of the store ``url`` names, with its ``options`` (nothing connects)."""
    return store_type(url).backend(url, **options)


def validate(url: str) -> None:
    """Check ``url`` as :func:`backend_for` would, without connecting; raise ConfigurationError."""
    store_type(url).validate(url)


def backend_for_client(client: Any, **options: Any) -> Backend:
    """Wrap a store's client object (a redis-py ``Redis`` or ``RedisCluster``) in its backend."""
    module = type(client).__module__.partition(".")[0]
    for kind in STORE_TYPES:
        if kind.wrap is not None and module in kind.client_modules:
            wrapped: Backend = _resolve(kind.wrap)(client, **options)
            return wrapped
    raise ConfigurationError(
        f"connect() takes a URL or a redis-py client, not {type(client).__name__}"
    )


def redact(url: object) -> str:
    """Show a store URL in a message: its password hidden, its query (options) left out.

    A value that is not a URL (a client object) is shown by its type's name.
    """
    if not isinstance(url, str):
        return type(url).__name__
    kind = _BY_SCHEME.get(url.partition("://")[0].lower())
    return (kind.redact if kind is not None else redact_url)(url)


# -- memory:// -----------------------------------------------------------------------------

_memory_stores: dict[str, Backend] = {}
_memory_lock = threading.Lock()
forking.replace_after_fork(sys.modules[__name__], "_memory_lock", threading.Lock)


def memory_backend(url: str, **options: Any) -> Backend:
    """The backend of ``memory://[name]``: a named store is shared by every ``connect`` of
    that name in this process; an unnamed one is new each time. ``options`` are ignored."""
    from .memory import MemoryBackend

    name = url.partition("://")[2].strip("/")
    with _memory_lock:
        backend = _memory_stores.get(name) if name else None
        if backend is None:
            backend = MemoryBackend(name=name)
            if name:
                _memory_stores[name] = backend
    return backend


def _resolve(path: str) -> Any:
    """Import ``"module:attribute.attribute"`` and return the attribute."""
    module, _, attributes = path.partition(":")
    value: Any = importlib.import_module(module)
    for attribute in attributes.split("."):
        value = getattr(value, attribute)
    return value
