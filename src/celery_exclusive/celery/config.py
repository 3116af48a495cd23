"""Settings and store for a Celery app, one of each per app and process.

The store URL is ``app.conf.exclusive_url``; else the result backend, else the broker, when
either is Redis (:func:`celery_exclusive.config.celery_fallback_url`); else a
:class:`ConfigurationError` that says how to configure it. There is no silent process-local
fallback: a lock only one process can see protects nothing. ``exclusive_prefix`` is passed to
the store only when set, so that a ``?prefix=`` in the URL applies otherwise.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from ..config import Settings, celery_fallback_url
from ..exceptions import ConfigurationError
from ..store import Store, connect

__all__ = ["find_url", "settings_for", "store_for"]

_lock = threading.Lock()
_cache: dict[int, tuple[int, Any, Settings, Store | None]] = {}


def settings_for(app: Any) -> Settings:
    """Return the settings of ``app`` (read once per process)."""
    return _entry(app)[2]


def store_for(app: Any) -> Store:
    """Return the store of ``app`` (built once per process, connected lazily)."""
    pid, _, settings, store = _entry(app)
    if store is not None:
        return store
    url = settings.url or find_url(app)
    if url is None:
        raise ConfigurationError(
            "celery-exclusive needs a shared store: set exclusive_url (CELERY_EXCLUSIVE_URL in "
            "Django) to redis://... or postgresql://..., or use a Redis result backend or "
            "broker. A process-local "
            "lock would protect one process only, so there is no default."
        )
    store = connect(url, **settings.store_options(url))
    with _lock:
        _cache[id(app)] = (pid, app, settings, store)
    return store


def reset(app: Any | None = None) -> None:
    """Forget cached settings and stores (of one app, or all): after a config change."""
    with _lock:
        for key in [id(app)] if app is not None else list(_cache):
            entry = _cache.pop(key, None)
            if entry and entry[3] is not None and entry[0] == os.getpid():
                entry[3].close()


def _entry(app: Any) -> tuple[int, Any, Settings, Store | None]:
    pid = os.getpid()
    with _lock:
        entry = _cache.get(id(app))
        if entry is not None and entry[0] == pid and entry[1] is app:
            return entry
        # A forked child must not use its parent's sockets; redis-py also checks the pid,
        # but a fresh store per process keeps that obvious.
        entry = (pid, app, Settings.from_lookup(app.conf.get), None)
        _cache[id(app)] = entry
        return entry


def find_url(app: Any) -> str | None:
    """Return the store URL ``app`` falls back on: its Redis result backend, else broker."""
    return celery_fallback_url(app.conf.get("result_backend"), app.conf.get("broker_url"))
