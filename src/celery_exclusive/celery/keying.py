"""A protected task's options and key builder, resolved once per task class and settings.

Read by :class:`~celery_exclusive.celery.ExclusiveTask` for every call and run, by the signal
handlers (a revoked task's leases) and by the worker's start-up check.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..exceptions import ConfigurationError
from ..keys import KeyBuilder
from ..options import TaskOptions
from .config import settings_for

__all__ = ["Resolved", "build_key", "call_options", "key_builder", "resolve"]


class Resolved(NamedTuple):
    """A task class's options and key builder, for the settings object they were built from."""

    settings_id: int
    options: TaskOptions
    builder: KeyBuilder | None


_resolved: dict[type, Resolved] = {}
_builders: dict[tuple[type, str, Any], KeyBuilder] = {}
_builders_lock = threading.Lock()


def resolve(task: Any) -> Resolved:
    """The options (the app's defaults under the task's own) and key builder of ``task``."""
    cls = type(task)
    settings = settings_for(task.app)
    cached = _resolved.get(cls)
    if cached is None or cached.settings_id != id(settings):
        options = TaskOptions.build(settings.task_defaults, task.exclusive_options)
        cached = Resolved(id(settings), options, key_builder(cls, options.key, task.name))
        _resolved[cls] = cached
    return cached


def call_options(task: Any, overrides: Mapping[str, Any] | None = None) -> TaskOptions:
    """The options of one call of ``task``: its resolved options with ``overrides`` applied."""
    return resolve(task).options.with_overrides(overrides)


def build_key(
    task: Any, args: Any = None, kwargs: Any = None, overrides: Mapping[str, Any] | None = None
) -> str:
    """The lease key of a call of ``task`` with ``args`` and ``kwargs``."""
    _, options, builder = resolve(task)
    if overrides and "key" in overrides:
        builder = key_builder(type(task), options.with_overrides(overrides).key, task.name)
    if builder is None:
        raise ConfigurationError(f"task {task.name!r} has no run() to build keys from")
    return builder.build(tuple(args or ()), dict(kwargs or {}))


def key_builder(cls: type, spec: Any, name: str | None) -> KeyBuilder | None:
    """Return the (cached) key builder of task class ``cls``; None before it has a name."""
    run = inspect.getattr_static(cls, "run", None)
    if run is None or not name:
        return None
    hashable = spec if isinstance(spec, (str, type(None))) or callable(spec) else tuple(spec)
    cache_key = (cls, name, hashable)
    with _builders_lock:
        builder = _builders.get(cache_key)
        if builder is None:
            if isinstance(run, staticmethod):
                func, bound = run.__func__, False
            else:
                func, bound = run, True
            builder = KeyBuilder(name, func, spec, skip_first=bound)
            _builders[cache_key] = builder
        return builder
