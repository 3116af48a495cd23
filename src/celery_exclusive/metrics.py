"""Prometheus metrics: what the leases of each task did, for dashboards and alerts.

Needs ``prometheus-client`` (``pip install 'celery-exclusive[prometheus]'``), imported only when
a metric is first recorded or exposed. The Celery integration feeds the metrics from its
signals (:mod:`celery_exclusive.celery.metrics`) in every process that has the package; they
are exposed by a Celery worker's own port (``exclusive_metrics_port``), a Django view
(:mod:`celery_exclusive.contrib.django.views`), or your registry (:func:`register`).

Labels are bounded: the task name and the enums below, never the lease key::

    celery_exclusive_acquisitions_total{task}            counter: runs granted their lease
    celery_exclusive_conflicts_total{task,action}        counter: runs that found the key held
    celery_exclusive_duplicates_total{task,action}       counter: apply_async found a copy queued
    celery_exclusive_lost_total{task,reason}             counter: leases lost while running
    celery_exclusive_releases_total{task,released}       counter: runs that gave the lease back
    celery_exclusive_store_errors_total{task,action}     counter: the store failed as a run started
    celery_exclusive_wait_seconds{task}                  histogram: asking -> granted, for waits
    celery_exclusive_hold_seconds{task}                  histogram: granted -> released
    celery_exclusive_held_leases{task}                   gauge: run leases held now

**Several processes** (Celery's prefork pool, gunicorn): each process counts in its own memory,
so a scrape of one process would miss the others. prometheus_client's multiprocess mode solves
it: with ``PROMETHEUS_MULTIPROC_DIR`` set (to an empty directory) before prometheus_client is
imported, every process writes its values to files there, and a scrape reads them all
(counters and histograms summed; the gauge summed over live processes only, files of dead
processes being dropped at each scrape). See ``docs/metrics.md`` for the setup.
"""

from __future__ import annotations

import glob
import os
import re
import threading
from collections.abc import Iterator
from typing import Any

from .exceptions import ConfigurationError

__all__ = [
    "LOST_REASONS",
    "PREFIX",
    "Metrics",
    "get_metrics",
    "lost_reason",
    "make_registry",
    "multiprocess_dir",
    "register",
    "start_http_server",
]

#: The first part of every metric name.
PREFIX = "celery_exclusive_"

#: The values of the ``reason`` label of ``celery_exclusive_lost_total``.
LOST_REASONS = ("refused", "overdue", "max_hold", "forked", "other")

#: Wait and hold times, in seconds: from a round trip to an hour.
BUCKETS = (0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)

#: The gauge of another process is counted while that process lives ("livesum").
_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def import_prometheus() -> Any:
    """Import prometheus_client, or say which extra to install."""
    try:
        import prometheus_client
    except ImportError as exc:
        raise ConfigurationError(
            "celery-exclusive's metrics need prometheus-client: "
            "pip install 'celery-exclusive[prometheus]'"
        ) from exc
    return prometheus_client


def lost_reason(reason: str) -> str:
    """The label (one of :data:`LOST_REASONS`) of a lost lease's reason text.

    ``refused``: the store no longer had the lease (expired while the holder was paused, or
    released by force). ``overdue``: renewal was not confirmed before the deadline (the store
    did not answer). ``max_hold``: the holder reached ``max_hold``. ``forked``: the lease was
    the parent process's.
    """
    if "no longer had it" in reason:
        return "refused"
    if reason.startswith("could not renew it before its deadline"):
        return "overdue"
    if reason.startswith("it reached max_hold"):
        return "max_hold"
    if "forked from" in reason:
        return "forked"
    return "other"


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, when it is on in this process."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        return None
    import_prometheus()
    from prometheus_client import values

    return path if getattr(values.ValueClass, "_multiprocess", False) else None


class Metrics:
    """The metric objects of one process (get them with :func:`get_metrics`)."""

    def __init__(self) -> None:
        prom = import_prometheus()
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.acquisitions = prom.Counter(
            PREFIX + "acquisitions", "Runs granted their lease.", ["task"], registry=r
        )
        self.conflicts = prom.Counter(
            PREFIX + "conflicts",
            "Runs that found their key held, by what they did (on_conflict, requeue, redelivered).",
            ["task", "action"],
            registry=r,
        )
        self.duplicates = prom.Counter(
            PREFIX + "duplicates",
            "Calls of apply_async that found a copy queued or running, by on_duplicate.",
            ["task", "action"],
            registry=r,
        )
        self.lost = prom.Counter(
            PREFIX + "lost",
            "Leases lost while their run went on, by reason.",
            ["task", "reason"],
            registry=r,
        )
        self.releases = prom.Counter(
            PREFIX + "releases",
            "Runs that gave their lease back (released=false: the store no longer had it).",
            ["task", "released"],
            registry=r,
        )
        self.store_errors = prom.Counter(
            PREFIX + "store_errors",
            "Runs that could not reach the store as they started, by on_store_error.",
            ["task", "action"],
            registry=r,
        )
        self.wait = prom.Histogram(
            PREFIX + "wait_seconds",
            "Seconds from asking for the lease to being granted it, for runs that waited.",
            ["task"],
            buckets=BUCKETS,
            registry=r,
        )
        self.hold = prom.Histogram(
            PREFIX + "hold_seconds",
            "Seconds from the grant of a run's lease to its release.",
            ["task"],
            buckets=BUCKETS,
            registry=r,
        )
        self.held = prom.Gauge(
            PREFIX + "held_leases",
            "Run leases held now.",
            ["task"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def labels(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, kept: prometheus-client checks and locks on every call,
        and a worker counts four to six times per run. (A child is the one
        prometheus-client itself keeps per label values; it follows a fork by itself.)"""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child


_metrics: Metrics | None = None
_lock = threading.Lock()


def get_metrics() -> Metrics:
    """This process's metrics, created at first use (raises if prometheus-client is missing)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


class _FromFiles:
    """Our metrics as the files of every process hold them (multiprocess mode)."""

    def __init__(self, path: str) -> None:
        import_prometheus()
        from prometheus_client import multiprocess

        untyped: Any = multiprocess  # its functions carry no annotations
        self.path = path
        self._collector: Any = untyped.MultiProcessCollector(None, path=path)
        self._mark_dead: Any = untyped.mark_process_dead

    def collect(self) -> Iterator[Any]:
        self._drop_dead_processes()
        for family in self._collector.collect():
            if family.name.startswith(PREFIX):
                yield family

    def _drop_dead_processes(self) -> None:
        # A pool child that was killed (a hard time limit, the OOM killer) could not say it
        # ended: its gauge file would count its held leases forever.
        for path in glob.glob(os.path.join(self.path, "gauge_live*.db")):
            found = _GAUGE_FILE.match(os.path.basename(path))
            if found and not _alive(int(found.group(1))):
                self._mark_dead(int(found.group(1)), self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def register(registry: Any = None) -> None:
    """Add celery-exclusive's metrics to ``registry`` (default: prometheus_client's REGISTRY).

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``), what is added reads our metrics from
    the files of every process. If you already expose a ``MultiProcessCollector`` on that
    directory, our metrics are in it: don't call this too, or they appear twice.
    """
    prom = import_prometheus()
    target = prom.REGISTRY if registry is None else registry
    path = multiprocess_dir()
    target.register(_FromFiles(path) if path else get_metrics().registry)


def make_registry() -> Any:
    """A new registry holding only celery-exclusive's metrics (what our endpoints serve)."""
    prom = import_prometheus()
    registry = prom.CollectorRegistry()
    register(registry)
    return registry


def start_http_server(port: int, addr: str = "0.0.0.0") -> Any:
    """Serve :func:`make_registry` on ``addr:port`` from a daemon thread; return the server.

    Call ``server.shutdown()`` to stop it. ``port=0`` picks a free port
    (``server.server_port``).
    """
    prom = import_prometheus()
    get_metrics()  # created here, before a pool forks: a missing package fails now
    server, _thread = prom.start_http_server(port, addr=addr, registry=make_registry())
    return server
