"""celery-singleton's ``Singleton``, ``DuplicateTaskError`` and ``clear_locks``, on leases.

::

    from celery_exclusive.compat.celery_singleton import Singleton, DuplicateTaskError

    @app.task(base=Singleton, unique_on=["user_id"])
    def do_something(user_id, other=None): ...

**The same as celery-singleton:**

* A call takes the lock at ``apply_async``/``delay``; the lock is released when the task
  finishes, with success or failure (hold ``until_done``). A call made meanwhile returns the
  ``AsyncResult`` of the copy queued or running, or with ``raise_on_duplicate`` raises
  :class:`DuplicateTaskError` whose ``task_id`` names it.
* Task attributes ``unique_on`` (argument names; a str is one name; empty or None: all
  arguments), ``raise_on_duplicate`` and ``lock_expiry``, over the app settings
  ``singleton_raise_on_duplicate`` and ``singleton_lock_expiry``.
* ``singleton_backend_url`` becomes the app's lease store (``exclusive_url``), and
  ``singleton_key_prefix`` the first part of its keys (``exclusive_prefix``); your own
  ``exclusive_url``/``exclusive_prefix`` win. Without them, the store is the Redis result
  backend, else the Redis broker, as in celery-singleton.
* :func:`clear_locks` frees the locks of the app's ``Singleton`` tasks.

**What changes, and why:**

* A worker that dies mid-run (SIGKILL, OOM, a hard time limit) no longer blocks the key
  forever (celery-singleton's default, no expiry) or for ``lock_expiry``: a running task's
  lease is renewed every ``ttl / 3`` (``exclusive={"ttl": ...}``, 30 s by default) and
  expires within ``ttl`` once nobody renews it. Calling ``clear_locks`` at ``worker_ready``
  is no longer needed, and is harmful with more than one worker (it frees the locks of tasks
  other workers are running).
* Release is owner-safe. celery-singleton deletes the key: a task whose lock had expired
  (``lock_expiry`` shorter than the run) deletes the lock of the copy queued after it. Here a
  release only ever removes its own grant.
* ``lock_expiry`` bounds how long a *queued* call holds the key (from its due time); it no
  longer lets a second copy in beside a run that takes longer. For "at most one run per
  period", use ``exclusive={"hold": "period", "ttl": seconds}``.
* ``retry()`` works: the retry is published and keeps the lock until the last attempt ends
  (celery-singleton took the retry for a duplicate of itself and dropped it, leaving the lock
  held). Eager ``.apply()`` never frees the lock of a queued copy.
* Keys are ours (``myapp.task:user_id=1``, not ``SINGLETONLOCK_<md5>``), with arguments bound
  through the signature: ``f(1)`` and ``f(user_id=1)`` are one key, where celery-singleton
  made two. Locks taken by celery-singleton itself are not seen.
* ``DuplicateTaskError`` is also :class:`celery_exclusive.AlreadyQueued` (``.key``,
  ``.holder``). Refused with :class:`~celery_exclusive.ConfigurationError`: a
  ``singleton_backend_class`` other than the Redis one, and ``singleton_backend_kwargs`` (put
  connection options in the URL's query, or set ``exclusive_url`` to a redis-py client).
  ``generate_lock``, ``release_lock``, ``unlock`` and ``singleton_backend`` are not offered
  (a release by key would free another owner's lease); ``challenge_lock_on_startup`` is
  ignored (a dead holder's lease expires by itself).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ..celery.config import store_for
from ..exceptions import AlreadyQueued, ConfigurationError, ExclusiveError
from ..keys import glob_escape
from ..validate import seconds as check_seconds
from . import MigratedTask, adopt_settings

__all__ = ["CelerySingletonException", "DuplicateTaskError", "Singleton", "clear_locks"]

logger = logging.getLogger(__name__)

_REDIS_BACKEND_CLASSES = (
    "celery_singleton.backends.redis.RedisBackend",
    "celery_singleton.backends.RedisBackend",
)


class CelerySingletonException(ExclusiveError):
    """Root of celery-singleton's errors (and one of ours)."""


class DuplicateTaskError(CelerySingletonException, AlreadyQueued):
    """A call met a copy already queued or running; ``task_id`` is that copy's id."""

    def __init__(
        self,
        message: str = "",
        task_id: str | None = None,
        *,
        key: str = "",
        holder: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, key=key, holder=holder)
        self.task_id = task_id
        self.args = (message, task_id)  # rebuilt from these when unpickled

    def __str__(self) -> str:
        return str(self.args[0])


class Singleton(MigratedTask):
    """celery-singleton's task base: one queued or running copy per name and arguments.

    ::

        @app.task(base=Singleton, unique_on="user_id", raise_on_duplicate=True)
        def do_something(user_id, other=None): ...

        first = do_something.delay(1)
        try:
            do_something.delay(1, other=2)
        except DuplicateTaskError as exc:
            assert exc.task_id == first.id

    Our own options can be added with ``exclusive={...}`` (e.g. ``{"ttl": 60}``) and win over
    the translated ones.
    """

    abstract = True
    #: Argument names that make two calls the same (None or empty: all arguments).
    unique_on: str | list[str] | tuple[str, ...] | None = None
    #: Raise DuplicateTaskError instead of returning the existing AsyncResult (None: the
    #: app's ``singleton_raise_on_duplicate``, else False).
    raise_on_duplicate: bool | None = None
    #: Seconds a queued call holds the key (None: the app's ``singleton_lock_expiry``, else
    #: ``exclusive_queue_ttl``).
    lock_expiry: float | None = None
    exclusive_options: Mapping[str, Any] = {"hold": "until_done", "on_duplicate": "raise"}
    migrated_options = ("unique_on",)

    @classmethod
    def _migrated(cls) -> dict[str, Any]:
        _check_unique_on(cls.unique_on)
        if cls.lock_expiry is not None:
            check_seconds("lock_expiry", cls.lock_expiry)
        if cls.raise_on_duplicate is not None and not isinstance(cls.raise_on_duplicate, bool):
            raise ConfigurationError(
                f"raise_on_duplicate must be True, False or None, not {cls.raise_on_duplicate!r}"
            )
        return _translate(cls.unique_on)

    @classmethod
    def _read_settings(cls, app: Any) -> None:
        _singleton_settings(app)

    @property
    def _raise_on_duplicate(self) -> bool:
        if self.raise_on_duplicate is not None:
            return self.raise_on_duplicate
        value = self.app.conf.get("singleton_raise_on_duplicate")
        if value is not None and not isinstance(value, bool):
            raise ConfigurationError(
                f"singleton_raise_on_duplicate must be True or False, not {value!r}"
            )
        return bool(value)

    @property
    def _lock_expiry(self) -> float | None:
        if self.lock_expiry is not None:
            return float(self.lock_expiry)
        value = self.app.conf.get("singleton_lock_expiry")
        return None if value is None else check_seconds("singleton_lock_expiry", value)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Publish the task unless a copy with the same key is queued or running.

        A duplicate returns that copy's AsyncResult (:meth:`on_duplicate`), or raises
        :class:`DuplicateTaskError` with ``raise_on_duplicate``.
        """
        _singleton_settings(self.app)
        expiry = self._lock_expiry
        if expiry is not None:
            options["exclusive"] = {"queue_ttl": expiry, **(options.get("exclusive") or {})}
        try:
            result = super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except AlreadyQueued as exc:
            existing = str(exc.holder.get("task_id") or "") or None
            try:
                return self.on_duplicate(existing)
            except DuplicateTaskError as dup:
                if not dup.key:
                    dup.key, dup.holder = exc.key, dict(exc.holder)
                raise dup from exc
        return result

    def on_duplicate(self, existing_task_id: str | None) -> Any:
        """A call met a copy queued or running: return its AsyncResult, or raise.

        Override it as in celery-singleton; raises :class:`DuplicateTaskError` with
        ``raise_on_duplicate`` (or when the copy's id is unknown).
        """
        if self._raise_on_duplicate or not existing_task_id:
            raise DuplicateTaskError(
                f"Attempted to queue a duplicate of task ID {existing_task_id}",
                task_id=existing_task_id,
            )
        return self.AsyncResult(existing_task_id)


def clear_locks(app: Any) -> int:
    """Free every lease held for the app's :class:`Singleton` tasks; return how many.

    Only holders that name one of those tasks (by task name, on a key of that task) are
    removed, each by its own token: other tasks' and other apps' leases stay. A task still
    running finds its lease lost at its next renewal (logged at WARNING), and a copy may then
    start beside it: with leases that expire by themselves this is for operators, not for
    ``worker_ready``.
    """
    _singleton_settings(app)
    store = store_for(app)
    names = sorted({task.name for task in app.tasks.values() if isinstance(task, Singleton)})
    freed = 0
    for name in names:
        for info in list(store.leases(glob_escape(name) + "*")):
            if not (info.key == name or info.key.startswith((name + ":", name + "@"))):
                continue
            for holder in info.holders:
                if holder.meta.get("task_name") == name:
                    freed += store.force_release(info.key, holder.token)
    if freed:
        logger.info("clear_locks: freed %d lease(s) of Singleton tasks", freed)
    return freed


def _translate(unique_on: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"hold": "until_done", "on_duplicate": "raise"}
    if unique_on:  # celery-singleton: empty means all arguments
        options["key"] = [unique_on] if isinstance(unique_on, str) else list(unique_on)
    return options


def _check_unique_on(value: object) -> None:
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigurationError(f"unique_on must be argument names, not {value!r}")


def _singleton_settings(app: Any) -> None:
    """Adopt ``singleton_backend_url`` / ``singleton_key_prefix``; refuse what can't be honoured."""
    conf = app.conf
    values: dict[str, Any] = {}
    url = conf.get("singleton_backend_url")
    if url:
        values["url"] = url
    prefix = conf.get("singleton_key_prefix")
    if prefix:
        values["prefix"] = prefix
    if values:  # first, so that a worker's store check does not report a missing store
        adopt_settings(app, values, "singleton_backend_url/singleton_key_prefix")
    backend_class = conf.get("singleton_backend_class")
    if backend_class is not None:
        path = (
            backend_class
            if isinstance(backend_class, str)
            else f"{backend_class.__module__}.{backend_class.__qualname__}"
        )
        if path not in _REDIS_BACKEND_CLASSES:
            raise ConfigurationError(
                f"singleton_backend_class {path!r} cannot be stood in for: celery-exclusive "
                "keeps its leases in its own store; remove it and set exclusive_url"
            )
    if conf.get("singleton_backend_kwargs"):
        raise ConfigurationError(
            "singleton_backend_kwargs is not supported: put connection options in the URL's "
            "query (?socket_timeout=5), or set exclusive_url to a redis-py client"
        )
