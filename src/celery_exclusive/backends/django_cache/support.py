"""Which Django caches can hold leases: a static look at ``settings.CACHES``, no connection.

:func:`inspect_cache` reads the settings and imports the cache class, and returns a
:class:`CacheSupport`: the cache family that serves the alias, or the :class:`CacheProblem`
that rules it out with a sentence saying why. It knows nothing of the Django app's settings
or system checks: ``celery_exclusive.contrib.django.checks`` turns a problem into a check.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...exceptions import ConfigurationError
from .common import import_django

__all__ = ["CacheProblem", "CacheSupport", "inspect_cache"]


class CacheProblem(str, enum.Enum):
    """Why a cache alias cannot hold leases."""

    #: ``settings.CACHES`` has no such alias.
    NO_ALIAS = "no-alias"
    #: Its ``BACKEND`` cannot be imported.
    NOT_IMPORTABLE = "not-importable"
    #: Each process has its own (``LocMemCache``): a lease would protect one process only.
    NOT_SHARED = "not-shared"
    #: It keeps nothing (``DummyCache``): everyone would get the lease.
    STORES_NOTHING = "stores-nothing"
    #: Its ``add`` is check-then-write (``FileBasedCache``): two processes can both win.
    NOT_ATOMIC = "not-atomic"
    #: ``PyLibMCCache``: the lease drives Memcached's gets/cas through pymemcache only.
    NO_CAS = "no-cas"
    #: django-redis's ``ShardClient``: keys spread over servers by its own hashing.
    SHARDED = "sharded"
    #: A cache class no atomic compare-and-swap is known for.
    UNKNOWN_CLASS = "unknown-class"


#: Cache classes (by the path of a class in their MRO) that can never hold a lease.
_REFUSED = {
    "django.core.cache.backends.locmem.LocMemCache": (
        CacheProblem.NOT_SHARED,
        "keeps its entries in the memory of each process: a lease in it would protect one "
        "process only, while every other web or worker process takes the same key.",
    ),
    "django.core.cache.backends.dummy.DummyCache": (
        CacheProblem.STORES_NOTHING,
        "stores nothing: its add() always succeeds, so every caller would get the lease.",
    ),
    "django.core.cache.backends.filebased.FileBasedCache": (
        CacheProblem.NOT_ATOMIC,
        "is not atomic: its add() checks whether the file exists and then writes it, so two "
        "processes can both get the lease.",
    ),
    "django.core.cache.backends.memcached.PyLibMCCache": (
        CacheProblem.NO_CAS,
        "is not supported: the lease needs Memcached's gets/cas, which this project drives "
        "through pymemcache. Use django.core.cache.backends.memcached.PyMemcacheCache with "
        "the same servers.",
    ),
}

#: Cache classes that can, and their family (``redis.py`` serves the first two).
_SUPPORTED = {
    "django.core.cache.backends.redis.RedisCache": "redis",
    "django_redis.cache.RedisCache": "django-redis",
    "django.core.cache.backends.db.DatabaseCache": "database",
    "django.core.cache.backends.memcached.PyMemcacheCache": "memcached",
}

#: What to do instead, said in terms of caches and store URLs (by problem; else the default).
_ADVICE = {
    CacheProblem.NO_ALIAS: "Name an alias of settings.CACHES.",
    CacheProblem.NOT_IMPORTABLE: "Install the cache's package, or fix settings.CACHES.",
    CacheProblem.SHARDED: "Use a store URL of one Redis (redis://...) or of a Redis Cluster "
    "(redis+cluster://...) instead.",
}
_DEFAULT_ADVICE = (
    "Use a Redis, database or Memcached (PyMemcacheCache) cache that every web and worker "
    "process shares, or a store URL (redis://..., postgresql://...)."
)


@dataclass(frozen=True)
class CacheSupport:
    """Whether a cache alias can hold leases, found from the settings alone (no network).

    ``kind`` is the cache family (``redis``, ``django-redis``, ``database`` or ``memcached``)
    when it can; otherwise ``reason`` says which :class:`CacheProblem` rules it out and
    ``problem`` says it in a sentence that names the alias and its class. ``backend`` is the
    path of the cache class.
    """

    alias: str
    backend: str = ""
    kind: str = ""
    reason: CacheProblem | None = None
    problem: str = ""

    @property
    def supported(self) -> bool:
        """True when the cache can hold leases."""
        return self.reason is None

    def error(self) -> ConfigurationError:
        """The error to raise for an unsupported cache: the problem and what to do instead."""
        advice = _ADVICE.get(self.reason, _DEFAULT_ADVICE) if self.reason else ""
        return ConfigurationError(f"{self.problem} {advice}".strip())


def inspect_cache(alias: str) -> CacheSupport:
    """Tell whether the cache ``alias`` of ``settings.CACHES`` can hold leases.

    Reads the settings and imports the cache class; never connects to anything, so system
    checks can call it.
    """
    import_django()
    from django.conf import settings
    from django.utils.module_loading import import_string

    caches_setting = getattr(settings, "CACHES", None) or {}
    config = caches_setting.get(alias)
    if not isinstance(config, Mapping):
        known = ", ".join(repr(a) for a in caches_setting) or "none"
        return CacheSupport(
            alias,
            reason=CacheProblem.NO_ALIAS,
            problem=f"There is no cache {alias!r} in settings.CACHES (aliases: {known}).",
        )
    path = str(config.get("BACKEND", ""))
    try:
        cls = import_string(path)
    except ImportError as exc:
        return CacheSupport(
            alias,
            backend=path,
            reason=CacheProblem.NOT_IMPORTABLE,
            problem=f"The cache {alias!r} has a BACKEND that cannot be imported ({exc}).",
        )
    return _classify(alias, path, cls, config)


def _classify(alias: str, path: str, cls: Any, config: Mapping[str, Any]) -> CacheSupport:
    """Find the cache's family, or its problem, from the classes it derives from."""
    label = f"The cache {alias!r} ({path})"
    for klass in getattr(cls, "__mro__", ()):
        name = f"{klass.__module__}.{klass.__qualname__}"
        if name in _REFUSED:
            reason, why = _REFUSED[name]
            return CacheSupport(alias, backend=path, reason=reason, problem=f"{label} {why}")
        kind = _SUPPORTED.get(name)
        if kind is None:
            continue
        if kind == "django-redis" and _sharded(config):
            return CacheSupport(
                alias,
                backend=path,
                reason=CacheProblem.SHARDED,
                problem=(
                    f"{label} uses django-redis's ShardClient, which spreads keys over "
                    "servers by its own hashing; a lease needs one server per key that "
                    "runs its scripts."
                ),
            )
        return CacheSupport(alias, backend=path, kind=kind)
    return CacheSupport(
        alias,
        backend=path,
        reason=CacheProblem.UNKNOWN_CLASS,
        problem=(
            f"{label} is not a cache celery-exclusive knows how to lock atomically (supported: "
            "Django's RedisCache, django-redis, DatabaseCache, PyMemcacheCache)."
        ),
    )


def _sharded(config: Mapping[str, Any]) -> bool:
    """True when a django-redis cache uses its ``ShardClient``."""
    options = config.get("OPTIONS") or {}
    client_class = options.get("CLIENT_CLASS", "django_redis.client.DefaultClient")
    client_name = client_class if isinstance(client_class, str) else client_class.__name__
    return bool(client_name.rsplit(".", 1)[-1] == "ShardClient")
