"""Check the configuration when a worker starts, so a bad value stops the worker, not every task.

Celery reads ``app.conf`` lazily (a typo'd ``exclusive_url`` or ``exclusive_ttl = -1`` would
otherwise surface at the first task, after the worker said "ready"), so a worker checks, before
it consumes anything:

* the settings (``exclusive_url``, ``exclusive_prefix``, ``exclusive_queue_ttl``, every
  ``exclusive_<option>`` and ``exclusive_defaults``);
* the options of every registered :class:`ExclusiveTask`, merged with those defaults, and its
  key against its signature;
* the store URL (scheme, db, numbers, query options), parsed without connecting; and that
  there is a store at all when a task needs one;
* that no task asks for ``on_lock_lost="abort"`` on the eventlet pool, where a task cannot be
  interrupted (its greenlets are not threads, and only gevent's are handled);
* what other parts of the package register with :func:`register_check` (the metrics port;
  the migrated settings of the celery-once and celery-singleton bases).

Why a bootstep, and not a plain ``worker_init`` handler: Celery catches and logs an exception
raised by a signal handler and starts the worker anyway. An exception raised by a bootstep's
``start()`` is an "Unrecoverable error": the worker logs it at CRITICAL and exits with status 1.
So the ``worker_init`` handler only adds the :class:`CheckConfiguration` step to the worker's
blueprint (it is built right after ``worker_init``), and the step checks when the worker
starts, once every task module is imported and the app is finalized.

The same check is available as :func:`check_app` (a list of problems) and :func:`validate_app`
(raises), e.g. for a deploy script or a test that the app is well configured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals

from ..config import Settings, check_lookup
from ..exceptions import ConfigurationError
from ..options import TaskOptions
from ..store import validate_url
from .config import NO_STORE, find_url
from .keying import key_builder
from .task import ExclusiveTask

__all__ = ["CheckConfiguration", "check_app", "register_check", "validate_app"]

logger = logging.getLogger(__name__)

#: More checks of an app, each returning one message per problem (see register_check).
_checks: list[Callable[[Any], list[str]]] = []


def register_check(check: Callable[[Any], list[str]]) -> None:
    """Run ``check(app)`` too (one message per problem) wherever the app is checked."""
    if check not in _checks:
        _checks.append(check)


def check_app(app: Any, pool: str | None = None) -> list[str]:
    """Return one message per configuration problem of ``app`` (empty when all is well).

    Reads settings and task options only; nothing is connected. ``pool`` is the worker pool's
    name when known (``prefork``, ``threads``, ``gevent``, ``eventlet``, ``solo``).
    """
    problems = check_lookup(app.conf.get)  # one message per bad setting
    protected = [task for _, task in sorted(app.tasks.items()) if isinstance(task, ExclusiveTask)]
    settings = None if problems else Settings.from_lookup(app.conf.get)
    if settings is not None:  # task options are judged against good defaults only
        for task in protected:
            try:
                options = TaskOptions.build(settings.task_defaults, task.exclusive_options)
                key_builder(type(task), options.key, task.name)
            except ConfigurationError as exc:
                problems.append(f"task {task.name!r}: {exc}")
                continue
            if pool == "eventlet" and options.on_lock_lost == "abort":
                problems.append(
                    f"task {task.name!r}: on_lock_lost='abort' cannot interrupt a task on the "
                    "eventlet pool; use prefork, threads, solo or gevent, or on_lock_lost='warn'"
                )
    for check in _checks:
        problems += check(app)
    given = app.conf.get("exclusive_url")
    url = given or find_url(app)
    enabled = settings.enabled if settings is not None else True
    if isinstance(url, str):
        try:
            validate_url(url)
        except ConfigurationError as exc:
            setting = "exclusive_url" if given else "the result backend / broker URL"
            problems.append(f"{setting}: {exc}")
    elif url is None and protected and enabled:
        problems.append(NO_STORE)
    return problems


def validate_app(app: Any, pool: str | None = None) -> None:
    """Raise :class:`ConfigurationError` listing every configuration problem of ``app``."""
    problems = check_app(app, pool)
    if problems:
        raise ConfigurationError(
            "celery-exclusive is misconfigured: " + "; ".join(problems) + " (see docs/celery.md)"
        )


class CheckConfiguration(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """A worker bootstep that refuses to start the worker with a bad configuration."""

    label = "celery-exclusive configuration check"

    def start(self, parent: Any) -> None:
        """Check the app's configuration; a ConfigurationError stops the worker (status 1)."""
        try:
            validate_app(parent.app, _pool_name(getattr(parent, "pool_cls", None)))
        except ConfigurationError as exc:
            logger.critical("%s; the worker does not start", exc)
            raise


def _pool_name(pool_cls: Any) -> str | None:
    """``celery.concurrency.eventlet.TaskPool`` -> ``eventlet`` (None when unknown)."""
    module = getattr(pool_cls, "__module__", None) or (
        pool_cls if isinstance(pool_cls, str) else ""
    )
    name = str(module).rsplit(".", 1)[-1]
    return name or None


def add_check_step(sender: Any = None, **_: Any) -> None:
    """``worker_init`` handler: add :class:`CheckConfiguration` to the worker's bootsteps."""
    app = getattr(sender, "app", None)
    if app is not None:
        app.steps["worker"].add(CheckConfiguration)


signals.worker_init.connect(add_check_step, weak=False)
