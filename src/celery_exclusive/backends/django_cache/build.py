"""From ``django-cache://ALIAS?options`` (or a cache alias) to the backend of its cache family.

The options, in the URL's query or as keyword arguments (a keyword wins over the query, as for
every store: ``backends/url_options.py``)::

    prefix           first part of every store key, after the cache's own KEY_PREFIX
                     (default "exclusive")
    poll             seconds a waiter sleeps before re-checking, on caches without release
                     notifications (database, Memcached; default 0.1)
    fence_retention  seconds a free key's fence counter is kept (default 7 days)
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from ...exceptions import ConfigurationError
from ..base import DEFAULT_FENCE_RETENTION, DEFAULT_PREFIX, Backend, redact_url
from ..url_options import Converter, key_prefix, parse_options, query_items, seconds
from .common import DEFAULT_POLL, Cells, DjangoCacheBackend, import_django
from .database import DatabaseCells
from .memcached import MemcachedCells
from .redis import redis_backend
from .support import inspect_cache

__all__ = ["URL_OPTIONS", "backend_for_cache", "from_url", "parse_url"]


#: The options of a django-cache:// store, by the converter that checks each one.
OPTIONS: dict[str, Converter] = {
    "prefix": key_prefix,
    "poll": seconds,
    "fence_retention": seconds,
}
_DEFAULTS = {
    "prefix": DEFAULT_PREFIX,
    "poll": DEFAULT_POLL,
    "fence_retention": DEFAULT_FENCE_RETENTION,
}

#: The query parameters (and keyword options) of a django-cache:// URL.
URL_OPTIONS = tuple(OPTIONS)


def from_url(url: str, **options: Any) -> Backend:
    """Build the backend of ``django-cache://ALIAS[?poll=0.1&fence_retention=604800]``.

    ``prefix`` (an option, or a query parameter) starts every store key, after the cache's
    own ``KEY_PREFIX``. A keyword option wins over the same option in the query.
    """
    alias, values = parse_url(url, **options)
    return backend_for_cache(alias, **values)


def parse_url(url: str, **options: Any) -> tuple[str, dict[str, Any]]:
    """Parse and check a ``django-cache://`` URL (Django is not needed for this).

    Returns the cache alias and the keyword arguments of :func:`backend_for_cache`, a keyword
    option winning over the query; raises :class:`ConfigurationError` naming the bad option
    and the URL.
    """
    parts = urlsplit(url)
    alias = unquote(parts.netloc or parts.path.strip("/"))
    if not alias:
        raise ConfigurationError(f"name a cache alias: django-cache://default, not {url!r}")
    return alias, _options(redact_url(url), query_items(url), options)


def _options(
    shown_url: str, query: list[tuple[str, str]], keywords: dict[str, Any]
) -> dict[str, Any]:
    values, _ = parse_options(
        store="django-cache",
        shown_url=shown_url,
        options=OPTIONS,
        defaults=_DEFAULTS,
        query=query,
        keywords=keywords,
    )
    return values


def backend_for_cache(
    alias: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    poll: float = DEFAULT_POLL,
    fence_retention: float = DEFAULT_FENCE_RETENTION,
) -> Backend:
    """Return the backend for the Django cache ``alias`` (refusing caches that can't lock).

    Redis caches get a :class:`~celery_exclusive.backends.redis.RedisBackend` on the cache's
    own redis-py client: the same keys and scripts as ``connect("redis://...")`` on that
    server (with the cache's ``KEY_PREFIX`` in front of ``prefix``). Database and Memcached
    caches get a :class:`DjangoCacheBackend`.
    """
    import_django()
    from django.conf import settings

    if not settings.configured:
        raise ConfigurationError(
            "django-cache:// needs Django's settings: set DJANGO_SETTINGS_MODULE (and call "
            "django.setup()) before the first lease is taken"
        )
    keywords = {"prefix": prefix, "poll": poll, "fence_retention": fence_retention}
    values = _options(f"django-cache://{alias}", [], keywords)
    support = inspect_cache(alias)
    if not support.supported:
        raise support.error()
    new_cache = _cache_factory(alias)
    cache = new_cache()
    key_prefix = getattr(cache, "key_prefix", "") or ""
    full_prefix = f"{key_prefix}:{values['prefix']}" if key_prefix else values["prefix"]
    description = f"django-cache://{alias} ({support.backend})"
    if support.kind in ("redis", "django-redis"):
        return redis_backend(
            cache,
            support.kind,
            prefix=full_prefix,
            fence_retention=values["fence_retention"],
            description=description,
        )
    cells: Cells
    if support.kind == "database":
        cells = DatabaseCells(cache, description)
    else:
        cells = MemcachedCells(new_cache, description)
    return DjangoCacheBackend(
        cells,
        prefix=full_prefix,
        poll=values["poll"],
        fence_retention=values["fence_retention"],
        description=description,
    )


def _cache_factory(alias: str) -> Any:
    """Return a function building new instances of cache ``alias``, as configured now.

    Ours, not Django's ``caches[alias]``: those are per thread and closed at the end of each
    request, and a later ``override_settings`` must not move a store that already exists.
    """
    from django.core.cache import caches
    from django.utils.module_loading import import_string

    params = dict(caches.settings[alias])
    backend_cls = import_string(params.pop("BACKEND"))
    location = params.pop("LOCATION", "")

    def new_cache() -> Any:
        return backend_cls(location, dict(params))

    return new_cache
