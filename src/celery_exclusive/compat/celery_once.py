"""celery-once's ``QueueOnce`` and ``AlreadyQueued``, on leases.

::

    from celery_exclusive.compat.celery_once import QueueOnce, AlreadyQueued

    @app.task(base=QueueOnce, once={"keys": ["customer_id"], "graceful": True})
    def sync_customer(customer_id): ...

**The same as celery-once:**

* A call takes the lock at ``apply_async``/``delay``; a second call while the first is queued
  or running raises :class:`AlreadyQueued` (with ``.countdown``), or with ``graceful`` returns
  ``EagerResult(None, None, states.REJECTED)``.
* ``once={"graceful", "keys", "timeout", "unlock_before_run"}`` on the task, and
  ``apply_async(..., once={"graceful": ..., "timeout": ...})`` per call. ``keys`` picks the
  arguments of the key (``[]``: one lock for the task; absent: all arguments).
* The lock is held until the task ends (success or failure: hold ``until_done``), or with
  ``unlock_before_run`` only until it starts (hold ``queued``, so runs are not exclusive).
  A ``retry()`` is never refused as a duplicate.
* ``app.conf.ONCE = {"backend": "celery_once.backends.Redis", "settings": {"url": ...,
  "default_timeout": ...}}``: the URL becomes the app's lease store (``exclusive_url``, which
  wins when you set it), ``redis+socket://`` read as ``unix://``; ``default_timeout`` is every
  task's default ``timeout``.

**What changes, and why:**

* Release is owner-safe. celery-once deletes the key in ``after_return``: a task whose lock
  had expired (``timeout`` shorter than the run) deletes the lock of the copy queued after it,
  and a third copy gets in. Here a release only ever removes its own grant.
* ``timeout`` bounds how long a *queued* call holds the key (from its due time), as a fallback
  for a message that never runs. While the task runs, its lease is renewed every ``ttl / 3``
  (``exclusive={"ttl": ...}``, 30 s by default), so a long run is never joined by a second
  copy, and a worker killed mid-run (SIGKILL, OOM, a hard time limit) frees the key within
  ``ttl``, not after ``timeout`` (an hour by default).
* The lock is released where Celery always passes, not in ``after_return`` (which Celery skips
  for ``Ignore``, ``Reject`` and retries), and an eager ``.apply()`` never frees the lock of a
  queued copy. With ``unlock_before_run`` a retry keeps the key while it waits (celery-once
  let a duplicate in).
* Keys are ours: :meth:`QueueOnce.get_key` returns ``myapp.task:a=1``, not
  ``qo_myapp.task_a-1``, with the arguments bound through the signature (``f(1)`` and
  ``f(a=1)`` are one key). Locks taken by celery-once itself are not seen.
* ``AlreadyQueued`` is also :class:`celery_exclusive.AlreadyQueued` (``.key``, ``.holder``);
  its ``countdown`` is the seconds left on the holder's current grant, which a running task
  keeps renewing: a hint for when to try again, not a promise.
* Not honoured, and refused with :class:`~celery_exclusive.ConfigurationError`: another
  backend class, the Redis backend's ``blocking`` (a call never waits for the key), and
  ``unlock_before_run`` per call (celery-once ignored it there too). The File backend is
  ignored with a warning (with its ``location``): leases live in the app's store
  (``exclusive_url``, else a Redis result backend or broker; ``sqlite:///path`` is the one-host
  store). ``once_backend``, ``once_config`` and ``default_timeout`` are not offered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from celery import states
from celery.result import EagerResult

from ..exceptions import AlreadyQueued as _AlreadyQueued
from ..exceptions import ConfigurationError
from ..validate import seconds as check_seconds
from . import MigratedTask, adopt_settings

__all__ = ["AlreadyQueued", "QueueOnce"]

logger = logging.getLogger(__name__)

_REDIS_BACKENDS = ("celery_once.backends.Redis", "celery_once.backends.redis.Redis")
_FILE_BACKENDS = ("celery_once.backends.File", "celery_once.backends.file.File")
_ONCE_OPTIONS = ("graceful", "keys", "timeout", "unlock_before_run")
_warned: set[int] = set()
_warned_lock = threading.Lock()


class AlreadyQueued(_AlreadyQueued):
    """A copy of the task with the same key is already queued or running.

    celery-once's error (``countdown``, ``message``), and ours (``key``, ``holder``).
    ``countdown`` is the seconds left on the holder's current grant: a running task keeps
    renewing it, so read it as "try again no sooner than this".
    """

    def __init__(
        self,
        countdown: float = 0.0,
        message: str = "",
        *,
        key: str = "",
        holder: Mapping[str, Any] | None = None,
    ) -> None:
        message = message or f"Expires in {countdown:g} seconds"
        super().__init__(message, key=key, holder=holder)
        self.countdown = countdown
        self.message = message
        self.args = (countdown, message)  # rebuilt from these when unpickled

    def __str__(self) -> str:
        return self.message


class QueueOnce(MigratedTask):
    """celery-once's task base: at most one queued or running copy per key.

    ``once={"graceful": bool, "keys": [...], "timeout": seconds, "unlock_before_run": bool}``
    as a task option, and ``apply_async(..., once={"graceful": ..., "timeout": ...})`` per
    call. Our own options can be added with ``exclusive={...}`` (e.g. ``{"ttl": 60}``) and
    win over the translated ones::

        @app.task(base=QueueOnce, once={"keys": ["customer_id"]})
        def sync_customer(customer_id): ...

        try:
            sync_customer.delay(42)
        except AlreadyQueued as exc:
            print("try again in", exc.countdown)
    """

    abstract = True
    migrated_options = ("once",)
    #: celery-once's defaults; a task's own ``once`` replaces them, as in celery-once.
    once: Mapping[str, Any] = {"graceful": False, "unlock_before_run": False}
    exclusive_options: Mapping[str, Any] = {"hold": "until_done", "on_duplicate": "raise"}

    @classmethod
    def _migrated(cls) -> dict[str, Any]:
        if "once" in cls.__dict__:
            _check_once(cls.once, per_call=False)
        return _translate(cls.once)

    @classmethod
    def _read_settings(cls, app: Any) -> None:
        _once_settings(app)

    def get_key(self, args: Any = None, kwargs: Any = None) -> str:
        """Return the lease key of a call (ours: ``myapp.task:a=1``, not ``qo_myapp.task_a-1``)."""
        return self.exclusive_key(args, kwargs)

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

        A duplicate raises :class:`AlreadyQueued`, or with ``graceful`` returns
        ``EagerResult(None, None, states.REJECTED)``. ``once={...}`` overrides ``graceful``,
        ``timeout`` and ``keys`` for this call.
        """
        call = _check_once(options.pop("once", None), per_call=True)
        default_timeout = _once_settings(self.app)
        merged = {**self.once, **call}
        graceful = bool(merged.get("graceful", False))
        timeout = merged.get("timeout") or default_timeout
        overrides = dict(options.get("exclusive") or {})
        if "keys" in call:
            overrides["key"] = None if call["keys"] is None else list(call["keys"])
        if timeout is not None:
            overrides.setdefault("queue_ttl", float(timeout))
        if overrides:
            options["exclusive"] = overrides
        try:
            result = super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        except _AlreadyQueued as exc:
            if graceful:
                return EagerResult(None, None, states.REJECTED)
            countdown = round(float(exc.holder.get("expires_in") or 0.0), 3)
            raise AlreadyQueued(
                countdown,
                f"{exc}; expires in {countdown:g} seconds unless renewed",
                key=exc.key,
                holder=exc.holder,
            ) from exc
        return result


def _translate(once: Mapping[str, Any]) -> dict[str, Any]:
    """celery-once's task options as ours (``graceful`` and ``timeout`` act per call)."""
    options: dict[str, Any] = {
        "hold": "queued" if once.get("unlock_before_run") else "until_done",
        "on_duplicate": "raise",
    }
    if once.get("keys") is not None:
        options["key"] = list(once["keys"])
    return options


def _check_once(value: object, *, per_call: bool) -> dict[str, Any]:
    """Validate a ``once`` option; return it as a dict."""
    where = "apply_async(once=...)" if per_call else "the task's once option"
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigurationError(f"{where} must be a dict, not {type(value).__name__}")
    unknown = sorted(set(value) - set(_ONCE_OPTIONS))
    if unknown:
        raise ConfigurationError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
            f"known: {', '.join(_ONCE_OPTIONS)}"
        )
    if per_call and "unlock_before_run" in value:
        raise ConfigurationError(
            "once={'unlock_before_run': ...} cannot be given per call (celery-once ignored it "
            "there); set it on the task"
        )
    for name in ("graceful", "unlock_before_run"):
        if name in value and not isinstance(value[name], bool):
            raise ConfigurationError(f"once {name!r} must be True or False, not {value[name]!r}")
    keys = value.get("keys")
    if keys is not None and (
        isinstance(keys, str)
        or not isinstance(keys, (list, tuple))
        or not all(isinstance(k, str) for k in keys)
    ):
        raise ConfigurationError(f"once 'keys' must be a list of argument names, not {keys!r}")
    if value.get("timeout") is not None:
        check_seconds("once 'timeout'", value["timeout"])
    return dict(value)


def _once_settings(app: Any) -> float | None:
    """Read ``app.conf.ONCE``: adopt its store URL; return its ``default_timeout``.

    Raises :class:`ConfigurationError` for what cannot be honoured.
    """
    conf = app.conf.get("ONCE")
    if conf is None:
        return None
    if not isinstance(conf, Mapping):
        raise ConfigurationError(f"ONCE must be a dict, not {type(conf).__name__}")
    backend = conf.get("backend")
    settings = conf.get("settings") or {}
    if not isinstance(settings, Mapping):
        raise ConfigurationError(f"ONCE['settings'] must be a dict, not {type(settings).__name__}")
    if backend in _REDIS_BACKENDS:
        url = settings.get("url")
        if url is not None and not isinstance(url, str):
            raise ConfigurationError(f"ONCE['settings']['url'] must be a str, not {url!r}")
        if url and url.startswith("redis+socket://"):
            url = "unix://" + url[len("redis+socket://") :]
        if url:  # first, so that a worker's store check does not report a missing store
            adopt_settings(app, {"url": url}, "ONCE['settings']['url']")
        if settings.get("blocking"):
            raise ConfigurationError(
                "ONCE['settings']['blocking'] is not supported: a call never waits for the key "
                "(it raises AlreadyQueued or returns the graceful result); remove it"
            )
    elif backend in _FILE_BACKENDS:
        _warn_once(
            app,
            "ONCE's File backend is ignored (and its location): leases live in the app's "
            "store (exclusive_url, else a Redis result backend or broker)",
        )
    elif backend is not None:
        raise ConfigurationError(
            f"ONCE['backend'] {backend!r} cannot be stood in for: celery-exclusive keeps its "
            "leases in its own store; remove ONCE['backend'] and set exclusive_url"
        )
    timeout = settings.get("default_timeout")
    return None if timeout is None else check_seconds("ONCE default_timeout", timeout)


def _warn_once(app: Any, message: str) -> None:
    with _warned_lock:
        if id(app) in _warned:
            return
        _warned.add(id(app))
    logger.warning(message)
