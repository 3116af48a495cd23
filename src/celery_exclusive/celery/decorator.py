"""``@exclusive(...)``: the decorator form, for tasks made with ``@app.task`` or ``@shared_task``.

Put it *above* the task decorator::

    @exclusive(key=["customer_id"], on_conflict="skip")
    @shared_task
    def sync_customer(customer_id): ...

It gives the task the behaviour of :class:`ExclusiveTask` (the same as
``@shared_task(base=ExclusiveTask, exclusive={...})``) by deriving a class from the task's own.
Tasks made lazily (a proxy, as ``@shared_task`` and an unfinalized app's ``@app.task`` return)
are converted when first used, and at worker start for every proxy decorated so far.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Task, signals
from celery.local import Proxy

from ..exceptions import ConfigurationError
from ..options import TaskOptions
from .task import ExclusiveTask

__all__ = ["exclusive"]

_pending: list[Any] = []
_pending_lock = threading.Lock()


def exclusive(**options: Any) -> Any:
    """Return a decorator that protects a Celery task with ``options`` (see ExclusiveTask)."""
    TaskOptions.build(options)  # bad names and values fail at decoration

    def decorate(task: Any) -> Any:
        if isinstance(task, Proxy):
            with _pending_lock:
                _pending.append((task, options))
            return Proxy(lambda: convert(task._get_current_object(), options))
        if isinstance(task, Task):
            return convert(task, options)
        raise ConfigurationError(
            "@exclusive goes above @app.task or @shared_task (it got "
            f"{type(task).__name__}); or use base=ExclusiveTask"
        )

    return decorate


def convert(task: Any, options: dict[str, Any]) -> Any:
    """Make ``task`` an ExclusiveTask with ``options`` (idempotent for the same options)."""
    cls = type(task)
    if isinstance(task, ExclusiveTask):
        if getattr(cls, "_converted_from", None) is not None and cls.exclusive_options == options:
            return task
        raise ConfigurationError(
            f"task {task.name!r} is already exclusive; pass options once (exclusive={{...}})"
        )
    task.__class__ = type(
        cls.__name__,
        (ExclusiveTask, cls),
        {
            "exclusive": options,
            "name": task.name,
            "_converted_from": cls,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    return task


def convert_pending(**_: Any) -> None:
    """Convert every proxied task decorated so far (the worker looks tasks up by name)."""
    with _pending_lock:
        pending = list(_pending)
    for proxy, options in pending:
        convert(proxy._get_current_object(), options)


signals.import_modules.connect(convert_pending, weak=False)
signals.worker_init.connect(convert_pending, weak=False)
