"""``@exclusive(...)``: the decorator form, for tasks made with ``@app.task`` or ``@shared_task``.

Put it *above* the task decorator::

    @exclusive(key=["customer_id"], on_conflict="skip")
    @shared_task
    def sync_customer(customer_id): ...

It gives the task the behaviour of :class:`ExclusiveTask` (the same as
``@shared_task(base=ExclusiveTask, exclusive={...})``) by deriving a class from the task's own.
A task made lazily (a proxy, as ``@shared_task`` and an unfinalized app's ``@app.task`` return)
is converted in each app as that app finalizes (or at once in apps already finalized), so that
a process which only ever finds it by name (``app.tasks[name]``, a signature, a chain, the
worker) gets the exclusive task too; and when the proxy is first used.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from celery import Task, _state
from celery.local import PromiseProxy, Proxy

from ..exceptions import ConfigurationError
from ..options import TaskOptions
from .task import ExclusiveTask

__all__ = ["exclusive"]


def exclusive(**options: Any) -> Any:
    """Return a decorator that protects a Celery task with ``options`` (see ExclusiveTask)."""
    TaskOptions.build(options)  # bad names and values fail at decoration

    def decorate(task: Any) -> Any:
        if isinstance(task, Proxy):
            _state.connect_on_app_finalize(partial(_when_finalized, task, options))
            for app in list(_state._get_active_apps()):
                if app.finalized:  # it took the task already (@shared_task does that)
                    _convert_in(app, task, options)
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


def _when_finalized(proxy: Proxy, options: dict[str, Any], app: Any) -> None:
    # Called as ``app`` starts finalizing, before it has made its tasks: convert at the end.
    def finalized(**_: Any) -> None:
        _convert_in(app, proxy, options)

    app.on_after_finalize.connect(finalized, weak=False)


def _convert_in(app: Any, proxy: Proxy, options: dict[str, Any]) -> None:
    """Convert the task ``proxy`` stands for in ``app``, if ``app`` has one."""
    if isinstance(proxy, PromiseProxy) and not proxy.__evaluated__():
        return  # an @app.task of another app, not made yet: converted when that app finalizes
    # A @shared_task proxy resolves in the current app: make it ``app`` for this lookup.
    previous = _state._tls.current_app
    _state._set_current_app(app)
    try:
        task = proxy._get_current_object()
    finally:
        _state._set_current_app(previous)
    if task.app is app:
        convert(task, options)
