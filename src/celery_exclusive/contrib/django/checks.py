"""System checks (``manage.py check``): a store every process shares, configured sanely.

They read settings only and never connect: an unreachable server is not a configuration
error, and a check must not hang a deploy on the network.

=========================  ======================================================================
``celery_exclusive.E001``  the store's cache is not shared between processes or not atomic
                           (``LocMemCache``, ``DummyCache``, ``FileBasedCache``)
``celery_exclusive.E002``  no store at all
``celery_exclusive.E003``  a cache that is not supported (unknown alias or class, ``PyLibMCCache``,
                           django-redis ``ShardClient``)
``celery_exclusive.E004``  an invalid setting, one error per setting: a bad value of
                           ``CELERY_EXCLUSIVE_TTL``, ``_ON_CONFLICT``, ``_HOLD``, ``_QUEUE_TTL``,
                           ``_DEFAULTS``, ... (the Celery worker would refuse to start), a store
                           URL with an unknown scheme, a bad db, number or query option, two
                           stores
``celery_exclusive.E005``  ``CELERY_EXCLUSIVE_DATABASE`` names a database that cannot hold the
                           leases (not PostgreSQL or SQLite, unknown alias, in-memory SQLite, no
                           psycopg 3)
``celery_exclusive.W001``  ``memory://``: one process only, for tests
``celery_exclusive.W002``  leases in the ``default`` database cache, which Django culls
=========================  ======================================================================
"""

from __future__ import annotations

import importlib.util
from typing import Any

from django.core import checks

from ...backends.django_cache import CacheProblem, inspect_cache
from ...backends.django_cache import parse_url as parse_cache_url
from ...backends.registry import SCHEMES
from ...config import check_lookup
from ...exceptions import ConfigurationError
from ...store import validate_url
from .conf import (
    UnsupportedDatabase,
    cache_alias,
    database_alias,
    django_settings,
    setting,
    store_url,
)

__all__ = ["check_store"]

_STORE_HINT = (
    "Set CELERY_EXCLUSIVE_URL to a store every web and worker process can reach "
    "(redis://host:6379/0, postgresql://...), CELERY_EXCLUSIVE_CACHE to a Redis, database "
    "or Memcached cache alias, or CELERY_EXCLUSIVE_DATABASE to a PostgreSQL or SQLite "
    "DATABASES alias."
)

_CACHE_HINT = (
    "Point CELERY_EXCLUSIVE_CACHE at a Redis, database or Memcached (PyMemcacheCache) cache "
    "that every web and worker process shares, or set CELERY_EXCLUSIVE_URL to a store URL "
    "(redis://..., postgresql://...)."
)

#: The check (id and hint) of each reason the backend finds a cache unable to hold leases.
CACHE_CHECKS: dict[CacheProblem, tuple[str, str]] = {
    CacheProblem.NOT_SHARED: ("E001", _CACHE_HINT),
    CacheProblem.STORES_NOTHING: ("E001", _CACHE_HINT),
    CacheProblem.NOT_ATOMIC: ("E001", _CACHE_HINT),
    CacheProblem.NO_CAS: ("E003", _CACHE_HINT),
    CacheProblem.UNKNOWN_CLASS: ("E003", _CACHE_HINT),
    CacheProblem.NO_ALIAS: ("E003", "Name an alias of settings.CACHES in CELERY_EXCLUSIVE_CACHE."),
    CacheProblem.NOT_IMPORTABLE: ("E003", "Install the cache's package, or fix settings.CACHES."),
    CacheProblem.SHARDED: (
        "E003",
        "Set CELERY_EXCLUSIVE_URL to one Redis (redis://...) or a Redis Cluster "
        "(redis+cluster://...) instead.",
    ),
}

_VALUE_HINT = (
    "See the task options in docs/celery.md; numbers may be given as numbers or as text "
    '("30"). A Celery worker refuses to start with this setting.'
)

_DATABASE_HINT = (
    "CELERY_EXCLUSIVE_DATABASE must name a PostgreSQL (psycopg 3) or SQLite (a file) database "
    "of DATABASES; for another database, set CELERY_EXCLUSIVE_URL to a store of its own "
    "(redis://..., postgresql://...). See docs/django.md."
)


@checks.register("celery_exclusive")
def check_store(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """Check the celery-exclusive settings, statically."""
    problems = check_lookup(setting, prefix="CELERY_EXCLUSIVE_")
    if problems:
        return [
            _error("E004", f"Invalid celery-exclusive setting {p}.", _VALUE_HINT) for p in problems
        ]
    try:
        settings = django_settings()
        alias = cache_alias()
        database = database_alias()
        url = store_url(settings)
    except UnsupportedDatabase as exc:
        if not settings.enabled:
            return []
        return [_error("E005", f"CELERY_EXCLUSIVE_DATABASE: {exc}.", _DATABASE_HINT)]
    except ConfigurationError as exc:
        return [_error("E004", f"Invalid celery-exclusive setting: {exc}", _STORE_HINT)]
    if not settings.enabled:
        return []
    return _check_database(database, url) or _check_url(url, alias)


def _check_database(database: str | None, url: Any) -> list[checks.CheckMessage]:
    """E005 when the store on ``CELERY_EXCLUSIVE_DATABASE`` is PostgreSQL without psycopg 3."""
    if (
        database is not None
        and isinstance(url, str)
        and url.startswith("postgresql://")
        and importlib.util.find_spec("psycopg") is None
    ):
        return [
            _error(
                "E005",
                f"CELERY_EXCLUSIVE_DATABASE: the store on {database!r} (PostgreSQL) needs "
                "psycopg 3, which is not installed (Django may be using psycopg2).",
                "pip install 'celery-exclusive[postgres]'",
            )
        ]
    return []


def _check_url(url: Any, alias: str | None) -> list[checks.CheckMessage]:
    """Check the store URL the settings name (``alias``: ``CELERY_EXCLUSIVE_CACHE``, if set)."""
    if url is None:
        return [
            _error(
                "E002",
                "celery-exclusive has no store: none of CELERY_EXCLUSIVE_URL, "
                "CELERY_EXCLUSIVE_CACHE, CELERY_EXCLUSIVE_DATABASE, or a Redis "
                "CELERY_RESULT_BACKEND / CELERY_BROKER_URL is set.",
                _STORE_HINT,
            )
        ]
    if not isinstance(url, str):
        return []  # a client object: nothing to look at without connecting
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        shown = f"{scheme}://" if sep else repr(url[:40])
        return [
            _error(
                "E004",
                f"CELERY_EXCLUSIVE_URL has an unknown store scheme {shown}.",
                "Known schemes: " + ", ".join(sorted(SCHEMES)) + ".",
            )
        ]
    if scheme == "memory":
        return [
            checks.Warning(
                "CELERY_EXCLUSIVE_URL is memory://: leases live in one process only and "
                "protect nothing across web and worker processes.",
                hint="Use it in test settings only; " + _STORE_HINT,
                id="celery_exclusive.W001",
            )
        ]
    try:
        validate_url(url)  # parses only: nothing is connected
    except ConfigurationError as exc:
        return [_error("E004", f"CELERY_EXCLUSIVE_URL: {exc}", _STORE_HINT)]
    if scheme == "django-cache":
        return _check_cache(alias, url)
    return []


def _check_cache(alias: str | None, url: str) -> list[checks.CheckMessage]:
    """Turn what the backend finds about the store's cache into a check, or none."""
    setting = "CELERY_EXCLUSIVE_CACHE" if alias else "CELERY_EXCLUSIVE_URL"
    cache = alias or parse_cache_url(url)[0]
    support = inspect_cache(cache)
    if support.reason is not None:
        check_id, hint = CACHE_CHECKS[support.reason]
        return [_error(check_id, f"{setting}: {support.problem}", hint)]
    if support.kind == "database" and cache == "default":
        return [
            checks.Warning(
                "Leases are in the 'default' database cache. When the site's own cache "
                "entries push its table past MAX_ENTRIES, Django culls rows by key order, "
                "and a culled live lease can be granted twice.",
                hint="Give the leases a cache alias of their own (its own LOCATION table), "
                "which nothing else writes to; see docs/django.md.",
                id="celery_exclusive.W002",
            )
        ]
    return []


def _error(code: str, msg: str, hint: str) -> checks.Error:
    return checks.Error(msg, hint=hint, id=f"celery_exclusive.{code}")
