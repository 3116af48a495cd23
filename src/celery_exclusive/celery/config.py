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
from typing import Any, NamedTuple

from ..config import Settings, celery_fallback_url
from ..exceptions import ConfigurationError
from ..store import Store, connect

__all__ = ["NO_STORE", "find_url", "settings_for", "store_for"]

#: What is wrong when an app names no store and has no Redis backend or broker to fall back on.
NO_STORE = (
    "no store: set exclusive_url (CELERY_EXCLUSIVE_URL in Django) to redis://... or "
    "postgresql://..., or use a Redis result backend or broker"
)


class _Entry(NamedTuple):
    """An app's settings and store, as read by one process."""

    pid: int
    app: Any
    settings: Settings
    store: Store | None


_lock = threading.Lock()
_cache: dict[int, _Entry] = {}


def settings_for(app: Any) -> Settings:
    """Return the settings of ``app`` (read once per process)."""
    return _entry(app).settings


def store_for(app: Any) -> Store:
    """Return the store of ``app`` (built once per process, connected lazily)."""
    entry = _entry(app)
    if entry.store is not None:
        return entry.store
    settings = entry.settings
    url = settings.url or find_url(app)
    if url is None:
        raise ConfigurationError(
            f"celery-exclusive has {NO_STORE}. A process-local lock would protect one process "
            "only, so there is no default."
        )
    store = connect(url, **settings.store_options(url))
    with _lock:
        _cache[id(app)] = entry._replace(store=store)
    return store


def reset(app: Any | None = None) -> None:
    """Forget cached settings and stores (of one app, or all): after a config change."""
    with _lock:
        for key in [id(app)] if app is not None else list(_cache):
            entry = _cache.pop(key, None)
            if entry and entry.store is not None and entry.pid == os.getpid():
                entry.store.close()


def _entry(app: Any) -> _Entry:
    pid = os.getpid()
    with _lock:
        entry = _cache.get(id(app))
        if entry is not None and entry.pid == pid and entry.app is app:
            return entry
        # A forked child must not use its parent's sockets; redis-py also checks the pid,
        # but a fresh store per process keeps that obvious.
        entry = _Entry(pid, app, Settings.from_lookup(app.conf.get), None)
        _cache[id(app)] = entry
        return entry


def find_url(app: Any) -> str | None:
    """Return the store URL ``app`` falls back on: its Redis result backend, else broker."""
    return celery_fallback_url(app.conf.get("result_backend"), app.conf.get("broker_url"))
