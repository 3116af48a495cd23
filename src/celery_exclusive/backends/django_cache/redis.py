"""Redis caches (Django's ``RedisCache`` and django-redis): the Redis backend, on their client.

A lease in a Redis cache is a lease of :class:`~celery_exclusive.backends.redis.RedisBackend`
on the cache's own redis-py client: every operation is one Lua script, expiry is on the Redis
clock, and the keys and scripts are those of ``connect("redis://...")`` on that server (with
the cache's ``KEY_PREFIX`` in front of the store's ``prefix``).
"""

from __future__ import annotations

from typing import Any

from ..base import Backend

__all__ = ["redis_backend"]


def redis_backend(
    cache: Any, kind: str, *, prefix: str, fence_retention: float, description: str
) -> Backend:
    """Return the Redis backend on the client of ``cache`` (``redis`` or ``django-redis``)."""
    from ..redis import RedisBackend

    if kind == "redis":
        client = cache._cache.get_client(None, write=True)
    else:
        client = cache.client.get_client(write=True)
    return RedisBackend(
        client,
        prefix=prefix,
        fence_retention=fence_retention,
        description=description,
    )
