"""Django cache backend: leases in a cache of your Django project (``django-cache://ALIAS``).

Which caches, and how each one keeps the lease contract (see ``docs/django.md``)::

    django.core.cache.backends.redis.RedisCache   the Redis backend, on the cache's own
    django_redis.cache.RedisCache                 redis-py client: every operation is one Lua
                                                  script, expiry on the Redis clock
    django.core.cache.backends.db.DatabaseCache   compare-and-swap on the cache table, on a
                                                  connection of its own (autocommit)
    django.core.cache.backends.memcached
        .PyMemcacheCache                          compare-and-swap with memcached gets/cas

Refused with :class:`ConfigurationError` (and reported by ``manage.py check``): ``LocMemCache``
(each process has its own: a lease would protect one process only), ``DummyCache`` (stores
nothing: everyone would get the lease) and ``FileBasedCache`` (``add`` checks for the file,
then writes it: two processes can both win). ``PyLibMCCache``, django-redis's ``ShardClient``
and unknown cache classes are refused too: no atomic compare-and-swap is known for them, and
this project offers no non-atomic fallback.

One module per part::

    support.py      which caches can hold leases, from the settings alone (inspect_cache)
    build.py        django-cache:// URL and options -> the backend of the cache's family
    common.py       the lease operations once, over compare-and-swap records (DjangoCacheBackend)
    redis.py        Redis caches: the Redis backend on the cache's client
    database.py     the database cache: records as rows of its table
    memcached.py    Memcached: records as items, with an index for listings
    connections.py  a connection (or client) per thread and process, for the two above
"""

from __future__ import annotations

from .build import URL_OPTIONS, backend_for_cache, from_url, parse_url
from .common import DEFAULT_POLL, DjangoCacheBackend
from .support import CacheProblem, CacheSupport, inspect_cache

__all__ = [
    "DEFAULT_POLL",
    "URL_OPTIONS",
    "CacheProblem",
    "CacheSupport",
    "DjangoCacheBackend",
    "backend_for_cache",
    "from_url",
    "inspect_cache",
    "parse_url",
]
