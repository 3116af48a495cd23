"""Drop-in task bases for projects moving from celery-once or celery-singleton.

Change one import and keep your task options::

    from celery_exclusive.compat.celery_once import QueueOnce, AlreadyQueued
    from celery_exclusive.compat.celery_singleton import Singleton, DuplicateTaskError, clear_locks

Each base is an :class:`~celery_exclusive.celery.ExclusiveTask` whose options are translated
from the original library's (``once={...}``; ``unique_on``, ``raise_on_duplicate``,
``lock_expiry``), and whose app settings (``ONCE``; ``singleton_*``) are read where they map
onto ours. What stays the same and what changes is in each module's docstring and in
``docs/migrating.md``.

This module holds what both bases share: translating the original's task options
(:class:`MigratedTask`), adopting its store settings as the app's ``exclusive_*`` settings, and
the check, run with the worker's start-up check, that refuses a migrated setting that cannot be
honoured.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from ..celery.config import reset
from ..celery.startup import register_check
from ..celery.task import ExclusiveTask
from ..exceptions import ConfigurationError

__all__: list[str] = []

logger = logging.getLogger(__name__)

_adopted: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, str]]] = weakref.WeakKeyDictionary()
_adopted_lock = threading.Lock()


def adopt_settings(app: Any, values: Mapping[str, Any], source: str) -> None:
    """Make ``values`` (``{"url": ..., "prefix": ...}``) the app's ``exclusive_*`` settings.

    The store is one per app (the worker's revoke and release handlers use it for every
    protected task), so a migrated library's store URL becomes ``exclusive_url``. A setting the
    user gave (``exclusive_url``...) wins and the migrated one is ignored. A value adopted
    earlier is replaced when its source changes it (a test suite pointing the app elsewhere);
    two sources naming different values for one setting (``ONCE`` and
    ``singleton_backend_url`` on one app) are refused: set ``exclusive_url`` instead.
    """
    changed = False
    with _adopted_lock:
        ours = _adopted.setdefault(app, {})
        for name, value in values.items():
            setting = f"exclusive_{name}"
            current = app.conf.get(setting)
            previous = ours.get(name)
            if current is not None and (previous is None or current != previous[0]):
                continue  # the user's own setting wins
            if previous is not None and previous[1] != source and previous[0] != value:
                raise ConfigurationError(
                    f"{source} and {previous[1]} name different values for {setting} "
                    f"({value!r} and {previous[0]!r}); one app has one lease store: set "
                    f"{setting} to the one you want"
                )
            if current != value:
                app.conf[setting] = value
                changed = True
            ours[name] = (value, source)
    if changed:
        reset(app)  # settings and store are cached per app and process


class MigratedTask(ExclusiveTask):
    """What both bases share: the original library's task options, translated into ours.

    A subclass says which of its class attributes are the original's options
    (:attr:`migrated_options`), how to check and translate them (:meth:`_migrated`), and how
    to read the app's settings (:meth:`_read_settings`). An ``exclusive={...}`` given beside
    them wins over the translation.
    """

    abstract = True
    #: The original library's task options, as class attributes of a task.
    migrated_options: tuple[str, ...] = ()
    #: The ``exclusive={...}`` given beside them (kept for subclasses).
    _explicit_exclusive: Mapping[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        if "migrated_options" in cls.__dict__:  # QueueOnce, Singleton: their own defaults
            super().__init_subclass__(**kwargs)
            return
        translated = cls._migrated()  # checks them too: a bad one fails at decoration
        explicit = cls.__dict__.get("exclusive")
        if explicit is not None and not isinstance(explicit, property):
            if not isinstance(explicit, Mapping):
                raise ConfigurationError(
                    f"exclusive options must be a dict, not {type(explicit).__name__}"
                )
            cls._explicit_exclusive = explicit
        if explicit is not None or any(n in cls.__dict__ for n in cls.migrated_options):
            # Given as Celery gives task options (a class attribute): ExclusiveTask's own
            # __init_subclass__ validates it, key names included, and takes it out.
            options = {**translated, **cls._explicit_exclusive}
            cls.exclusive = options  # type: ignore[method-assign,assignment]  # see above
        super().__init_subclass__(**kwargs)

    @classmethod
    def _migrated(cls) -> dict[str, Any]:
        """Check the original's options of ``cls``; return them as our ``exclusive`` options."""
        raise NotImplementedError

    @classmethod
    def _read_settings(cls, app: Any) -> None:
        """Read (and adopt) the original's app settings; raise ConfigurationError if bad."""
        raise NotImplementedError

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Read the original library's app settings when the task is bound to ``app``."""
        super().on_bound(app)
        try:
            cls._read_settings(app)
        except ConfigurationError as exc:
            # Not raised here: it would leave the app half finalized. Every call raises it,
            # and a worker refuses to start (check_migrated).
            logger.error("celery-exclusive: %s", exc)


def check_migrated(app: Any) -> list[str]:
    """One message per migrated setting of ``app`` that cannot be honoured (for the worker's
    start-up check, which then refuses to start)."""
    problems = []
    readers = {
        # one reader per library, however many task classes use it
        type(task)._read_settings.__func__: type(task)  # type: ignore[attr-defined]  # a bound classmethod
        for task in app.tasks.values()
        if isinstance(task, MigratedTask)
    }
    for cls in readers.values():
        try:
            cls._read_settings(app)
        except ConfigurationError as exc:
            problems.append(str(exc))
    return problems


register_check(check_migrated)
