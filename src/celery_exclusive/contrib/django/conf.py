"""Settings and store of a Django project: the Django adapter of :class:`Settings`.

Read from ``django.conf.settings``, all optional but the store::

    CELERY_EXCLUSIVE_URL      a store URL (redis://..., postgresql://..., django-cache://alias)
    CELERY_EXCLUSIVE_CACHE    or a Django cache alias: short for django-cache://<alias>
    CELERY_EXCLUSIVE_PREFIX, _ENABLED, _QUEUE_TTL, _DEFAULTS, and one default per task option
    (CELERY_EXCLUSIVE_TTL, CELERY_EXCLUSIVE_ON_CONFLICT, ...): what the Celery app reads as
    exclusive_* through config_from_object("django.conf:settings", namespace="CELERY").

With neither URL nor cache, the store is the Redis ``CELERY_RESULT_BACKEND`` or
``CELERY_BROKER_URL``, as the Celery app finds it; else there is none (``celery_exclusive.E002``).
The admin page and ``manage.py exclusive`` use the store built here, once per process.
"""

from __future__ import annotations

import os
import threading
from dataclasses import replace
from typing import Any

from ...config import Settings
from ...exceptions import ConfigurationError
from ...store import Store, connect

__all__ = ["cache_alias", "django_settings", "get_store", "reset", "store_url"]

#: Celery finds its store in a Redis result backend or broker when none is named.
REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://", "sentinel://", "unix://")

_lock = threading.Lock()
_store: tuple[int, Store] | None = None
#: The CELERY_EXCLUSIVE_URL that bridge_cache_setting() set (not the user), if any.
_bridged: str | None = None


def _lookup(name: str) -> Any:
    from django.conf import settings

    return getattr(settings, name.upper(), None)


def django_settings() -> Settings:
    """Return the library's settings from ``CELERY_EXCLUSIVE_*`` Django settings."""
    return Settings.from_lookup(_lookup, prefix="CELERY_EXCLUSIVE_")


def cache_alias() -> str | None:
    """Return ``CELERY_EXCLUSIVE_CACHE`` (a cache alias), or None."""
    alias = _lookup("CELERY_EXCLUSIVE_CACHE")
    if alias is None:
        return None
    if not isinstance(alias, str) or not alias:
        raise ConfigurationError(
            f"CELERY_EXCLUSIVE_CACHE must name a cache alias (a str), not {alias!r}"
        )
    return alias


def store_url(settings: Settings | None = None) -> Any:
    """Return the store URL (or client) the settings name, or None when they name none.

    ``CELERY_EXCLUSIVE_URL``, else ``django-cache://<CELERY_EXCLUSIVE_CACHE>``, else a Redis
    ``CELERY_RESULT_BACKEND`` or ``CELERY_BROKER_URL``.
    """
    settings = settings or django_settings()
    alias = cache_alias()
    if _bridged is not None and settings.url == _bridged:
        # We set that URL from CELERY_EXCLUSIVE_CACHE at startup: it is not a second store.
        settings = replace(settings, url=None)
    if alias is not None:
        from_cache = f"django-cache://{alias}"
        if settings.url is not None and settings.url != from_cache:
            raise ConfigurationError(
                f"CELERY_EXCLUSIVE_URL ({_redact(settings.url)}) and CELERY_EXCLUSIVE_CACHE "
                f"({alias!r}) name two stores; set only one"
            )
        return from_cache
    if settings.url is not None:
        return settings.url
    for name in ("CELERY_RESULT_BACKEND", "CELERY_BROKER_URL"):
        value = _lookup(name)
        if isinstance(value, str) and value.startswith(REDIS_SCHEMES):
            return value.split(";")[0]
    return None


def get_store() -> Store:
    """Return this process's store (built at first use; no connection before an operation)."""
    global _store
    pid = os.getpid()
    with _lock:
        if _store is not None and _store[0] == pid:
            return _store[1]
    settings = django_settings()
    url = store_url(settings)
    if url is None:
        raise ConfigurationError(
            "celery-exclusive has no store: set CELERY_EXCLUSIVE_URL (redis://...) or "
            "CELERY_EXCLUSIVE_CACHE (a Redis, database or Memcached cache alias) in your "
            "Django settings"
        )
    store = connect(url, prefix=settings.prefix)
    with _lock:
        if _store is not None and _store[0] == pid:  # another thread was faster
            store.close()
            return _store[1]
        _store = (pid, store)
    return store


def reset(**_: Any) -> None:
    """Forget the store (after a settings change, e.g. ``override_settings`` in tests)."""
    global _store
    with _lock:
        old, _store = _store, None
    if old is not None and old[0] == os.getpid():
        old[1].close()


def bridge_cache_setting() -> None:
    """Set ``CELERY_EXCLUSIVE_URL`` from ``CELERY_EXCLUSIVE_CACHE`` when only the latter is set.

    The Celery app reads ``CELERY_EXCLUSIVE_URL`` (as ``exclusive_url``) and knows nothing of
    Django caches; this makes it use the same store as the admin and the management command.
    Called from ``AppConfig.ready()``, before any task runs.
    """
    global _bridged
    from django.conf import settings

    alias = _lookup("CELERY_EXCLUSIVE_CACHE")
    if isinstance(alias, str) and alias and _lookup("CELERY_EXCLUSIVE_URL") is None:
        _bridged = settings.CELERY_EXCLUSIVE_URL = f"django-cache://{alias}"


def _redact(url: Any) -> str:
    if not isinstance(url, str):
        return type(url).__name__
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url
