"""Feed the Prometheus metrics from the Celery signals, and serve them from a worker.

Connected when :mod:`celery_exclusive.celery` is imported. Each receiver records into this
process's metrics (:func:`celery_exclusive.metrics.get_metrics`); without prometheus-client
installed they do nothing (the first one finds out once).

A worker serves the metrics itself when ``exclusive_metrics_port`` is set (a port > 0;
``exclusive_metrics_addr``, default ``0.0.0.0``, is the address): the
:class:`MetricsServer` bootstep starts an HTTP server in the worker's main process once the
pool has started, and a bad setting or a port in use stops the worker (status 1), like any
other celery-exclusive setting. With the prefork pool the counts are made in the pool
children: unless ``PROMETHEUS_MULTIPROC_DIR`` is set, the worker makes a private directory for
prometheus_client's multiprocess mode (before the pool forks) and removes it at shutdown.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from celery import bootsteps
from celery import signals as celery_signals

from .. import events
from .. import metrics as core
from ..exceptions import ConfigurationError
from ..lease import Lease
from . import signals
from .startup import _pool_name, register_check

__all__ = ["MetricsServer", "check_settings", "metrics_port"]

logger = logging.getLogger(__name__)

_UNSET: Any = object()
_state: dict[str, Any] = {"metrics": _UNSET}


def _metrics() -> core.Metrics | None:
    """This process's metrics, or None without prometheus-client (looked up once)."""
    found = _state["metrics"]
    if found is _UNSET:
        try:
            found = core.get_metrics()
        except ConfigurationError:
            found = None
        _state["metrics"] = found
    return found  # type: ignore[no-any-return]


def _task(sender: Any) -> str:
    return str(getattr(sender, "name", None) or "")


# -- runs: grant, wait, hold, release ----------------------------------------------------------


@dataclass
class _Grant:
    lease: Lease
    task: str
    task_id: str
    at: float  # monotonic
    counted: bool = True  # in the held gauge


_lock = threading.Lock()
_grants: dict[int, _Grant] = {}
#: Leases refused at least once by the store: their grant ended a wait.
_refused: weakref.WeakSet[Lease] = weakref.WeakSet()


def _note_refusal(lease: Lease, **_: Any) -> None:
    with _lock:
        _refused.add(lease)


def on_acquired(
    sender: Any = None,
    task_id: Any = None,
    lease: Lease | None = None,
    waited: float | None = None,
    **_: Any,
) -> None:
    """``exclusive_acquired``: count the grant, its wait, and the lease as held."""
    m = _metrics()
    if m is None or lease is None:
        return
    task = _task(sender)
    m.labels(m.acquisitions, task).inc()
    with _lock:
        was_refused = lease in _refused
        _refused.discard(lease)
        _grants[id(lease)] = _Grant(lease, task, str(task_id), time.monotonic())
    if was_refused and waited is not None:
        m.labels(m.wait, task).observe(waited)
    m.labels(m.held, task).inc()


def _end(grant: _Grant, m: core.Metrics) -> None:
    m.labels(m.hold, grant.task).observe(time.monotonic() - grant.at)
    if grant.counted:
        m.labels(m.held, grant.task).dec()


def on_released(
    sender: Any = None, released: Any = None, lease: Lease | None = None, **_: Any
) -> None:
    """``exclusive_released``: count the release and the time the lease was held."""
    m = _metrics()
    if m is None:
        return
    m.labels(m.releases, _task(sender), "true" if released else "false").inc()
    with _lock:
        grant = _grants.pop(id(lease), None) if lease is not None else None
    if grant is not None:
        _end(grant, m)


def on_lost(sender: Any = None, task_id: Any = None, reason: Any = "", **_: Any) -> None:
    """``exclusive_lost``: count the loss by reason; the lease no longer counts as held."""
    m = _metrics()
    if m is None:
        return
    task = _task(sender)
    m.labels(m.lost, task, core.lost_reason(str(reason))).inc()
    with _lock:
        lost = [g for g in _grants.values() if g.task_id == str(task_id) and g.counted]
        for grant in lost:
            if not grant.lease.held:
                grant.counted = False
                m.labels(m.held, grant.task).dec()


def after_run(sender: Any = None, task_id: Any = None, **_: Any) -> None:
    """``task_postrun``: end the grants of this run that ended without a release.

    An ``until_done`` run that retries hands its grant back to the retry message (no release
    is sent); the grant must stop counting as held by this process.
    """
    m = _metrics()
    if m is None or not _grants:
        return
    with _lock:
        ended = [
            key for key, g in _grants.items() if g.task_id == str(task_id) and not g.lease.held
        ]
        grants = [_grants.pop(key) for key in ended]
    for grant in grants:
        _end(grant, m)


# -- the other signals ------------------------------------------------------------------------


def on_conflict(sender: Any = None, action: Any = "", **_: Any) -> None:
    """``exclusive_conflict``: count it by action."""
    m = _metrics()
    if m is not None:
        m.labels(m.conflicts, _task(sender), str(action)).inc()


def on_duplicate(sender: Any = None, action: Any = "", **_: Any) -> None:
    """``exclusive_duplicate``: count it by action."""
    m = _metrics()
    if m is not None:
        m.labels(m.duplicates, _task(sender), str(action)).inc()


def on_store_error(sender: Any = None, action: Any = "", **_: Any) -> None:
    """``exclusive_store_error``: count it by action."""
    m = _metrics()
    if m is not None:
        m.labels(m.store_errors, _task(sender), str(action)).inc()


# -- serving from a worker ------------------------------------------------------------------


def metrics_port(app: Any) -> int:
    """The port ``exclusive_metrics_port`` asks for (0: metrics are not served)."""
    value = app.conf.get("exclusive_metrics_port")
    if value in (None, "", 0, "0"):
        return 0
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if isinstance(value, (bool, float)) or not 0 < port < 65536:
        raise ConfigurationError(
            f"exclusive_metrics_port must be a port number (1-65535, or 0 for none), not {value!r}"
        )
    return port


def check_settings(app: Any) -> list[str]:
    """One message per problem of the metrics settings (empty when all is well)."""
    try:
        if metrics_port(app):
            core.import_prometheus()
    except ConfigurationError as exc:
        return [str(exc)]
    return []


class MetricsServer(bootsteps.StartStopStep):  # type: ignore[misc]  # Celery is untyped
    """A worker bootstep: serve the metrics on ``exclusive_metrics_port``, after the pool."""

    label = "celery-exclusive metrics"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.server: Any = None

    def start(self, parent: Any) -> None:
        """Start the HTTP server; a bad setting, or a port in use, stops the worker."""
        try:
            problem = _prepared.get("error")
            if problem:
                raise ConfigurationError(problem)
            port = metrics_port(parent.app)
            addr = str(parent.app.conf.get("exclusive_metrics_addr") or "0.0.0.0")
            self.server = core.start_http_server(port, addr)
        except (ConfigurationError, OSError) as exc:
            logger.critical("celery-exclusive metrics: %s; the worker does not start", exc)
            raise
        logger.info(
            "celery-exclusive metrics on http://%s:%s/metrics%s",
            addr,
            self.server.server_port,
            f" (multiprocess: {_prepared['dir']})" if _prepared.get("dir") else "",
        )

    def stop(self, parent: Any) -> None:
        """Stop the HTTP server and remove a private multiprocess directory."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        _remove_private_dir()


_prepared: dict[str, Any] = {}


def prepare_worker(sender: Any = None, **_: Any) -> None:
    """``worker_init``: when a port is set, ready multiprocess mode and add the bootstep.

    Runs before the pool forks. A problem found here is raised by the bootstep at start (an
    exception in a ``worker_init`` handler would only be logged).
    """
    app = getattr(sender, "app", None)
    if app is None:
        return
    try:
        if not metrics_port(app):
            return
    except ConfigurationError:
        pass  # reported by the configuration check
    else:
        _prepared["error"] = _multiprocess_for(getattr(sender, "pool_cls", None))
    app.steps["worker"].add(MetricsServer)


def _multiprocess_for(pool_cls: Any) -> str | None:
    """Turn on multiprocess mode for a prefork pool; return a problem, or None."""
    if _pool_name(pool_cls) not in ("prefork", None):
        return None  # one process: the in-process registry sees every count
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
        return None if os.path.isdir(path) else f"PROMETHEUS_MULTIPROC_DIR={path} is no directory"
    if "prometheus_client" in sys.modules:
        return (
            "prometheus_client was imported before the worker could turn on its multiprocess "
            "mode, so the counts of the prefork pool's children would be lost: set "
            "PROMETHEUS_MULTIPROC_DIR to an empty directory in the worker's environment"
        )
    path = tempfile.mkdtemp(prefix="celery-exclusive-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    _prepared["dir"] = path
    return None


def _remove_private_dir() -> None:
    path = _prepared.pop("dir", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


events.lease_conflict.connect(_note_refusal)
signals.exclusive_acquired.connect(on_acquired, weak=False)
signals.exclusive_released.connect(on_released, weak=False)
signals.exclusive_lost.connect(on_lost, weak=False)
signals.exclusive_conflict.connect(on_conflict, weak=False)
signals.exclusive_duplicate.connect(on_duplicate, weak=False)
signals.exclusive_store_error.connect(on_store_error, weak=False)
celery_signals.task_postrun.connect(after_run, weak=False)
celery_signals.worker_init.connect(prepare_worker, weak=False)
register_check(check_settings)
