"""Real Celery worker processes for the integration tests, and where they meet the test process.

A worker runs ``celery -A tests.celery_app worker`` in its own process group (so a kill reaches
its pool children too), logs to a file shown when a test fails, and is ready when its log says
so. Every wait has a deadline. :func:`celery_env_on` points the test process's app and the workers'
environment at one private Redis (broker, results and store), for the length of a block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from .servers import GaveUp, RedisServer, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """One ``celery worker`` process (with its pool)."""

    def __init__(
        self,
        env: dict[str, str],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        extra: tuple[str, ...] = (),
        app: str = "tests.celery_app",
    ) -> None:
        self.name = f"w{uuid.uuid4().hex[:6]}@%h"
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.pool = pool
        self.concurrency = concurrency
        self.extra = extra
        self.app = app
        self.log = Path(tempfile.mkdtemp(prefix="cex-worker-")) / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> Worker:
        self.launch()
        wait_until(self._ready, timeout, f"worker {self.name} to be ready", step=0.05)
        return self

    def launch(self) -> Worker:
        """Start the process without waiting for it to be ready."""
        args = [
            sys.executable, "-m", "celery", "-A", self.app, "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-n", self.name,
            "-Q", self.env["CEX_QUEUE"], "-l", "INFO",
            "--without-mingle", "--without-gossip", "--without-heartbeat",
            *self.extra,
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=self.env, stdout=out, stderr=out, start_new_session=True
            )
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise GaveUp(f"worker exited with {self.proc.returncode}:\n{self.output()}")
        return " ready." in self.output()

    def exit_code(self, timeout: float = 60) -> int:
        """Wait for the worker to exit by itself; return its exit status."""
        assert self.proc is not None
        proc = self.proc
        wait_until(lambda: proc.poll() is not None, timeout, f"worker {self.name} to exit")
        return proc.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        try:
            children: list[psutil.Process] = psutil.Process(self.pid).children(recursive=True)
            return children
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 30) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the group if it does not end in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL the worker and its pool children: no Python code runs in any of them."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def shown_if_failed(request: Any, worker: Worker, tail: int = 10000) -> Iterator[Worker]:
    """Print the end of ``worker``'s log when a test failed while it ran (pytest shows it)."""
    failed_before = request.session.testsfailed
    try:
        yield worker
    finally:
        if request.session.testsfailed > failed_before:
            print(worker.output()[-tail:])


def redis_transport_options(visibility: float | None) -> dict[str, Any]:
    """Redis broker options that redeliver an unacked message ``visibility`` s after delivery.

    kombu restores unacked messages on a throttled sweep; both set to 1 s let a test see a
    redelivery within seconds.
    """
    if not visibility:
        return {}
    return {
        "visibility_timeout": visibility,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }


def worker_env(
    redis_url: str, prefix: str, queue: str, visibility: float | None = None
) -> dict[str, str]:
    """The environment that points a worker (and tests.celery_app) at its servers."""
    base = redis_url.rsplit("/", 1)[0]
    return {
        "CEX_BROKER_URL": f"{base}/0",
        "CEX_RESULT_URL": f"{base}/1",
        "CEX_STORE_URL": f"{base}/2",
        "CEX_PREFIX": prefix,
        "CEX_QUEUE": queue,
        "CEX_VISIBILITY": str(visibility or ""),
    }


def wait_for(results: list[Any], timeout: float = 60) -> list[Any]:
    """Wait for every AsyncResult to be ready; return their results (exceptions included)."""
    deadline = time.monotonic() + timeout
    values = []
    for result in results:
        remaining = max(deadline - time.monotonic(), 0.1)
        values.append(result.get(timeout=remaining, propagate=False))
    return values


@dataclass
class CeleryEnv:
    """Where a module's workers and its test process meet."""

    server: RedisServer
    env: dict[str, str]

    def worker(self, **kwargs: Any) -> Worker:
        return Worker(self.env, **kwargs)

    def tag(self) -> str:
        return uuid.uuid4().hex[:10]


def forget_connections() -> None:
    """Drop the test app's cached broker pool, queues and result backend, closing them.

    An app that has published before keeps its connection pool, its queue table and its result
    backend: without this, a module that runs after another one would still publish to (and
    read results from) the old servers.
    """
    from . import celery_app

    app = celery_app.app
    pool, app._pool = app._pool, None
    if pool is not None:
        with contextlib.suppress(Exception):
            pool.force_close_all()
    amqp = app.__dict__.pop("amqp", None)
    producers = getattr(amqp, "_producer_pool", None)
    if producers is not None:
        with contextlib.suppress(Exception):
            producers.force_close_all()
    app._backend_cache = None
    app._local = threading.local()


def point_app_at(env: dict[str, str]) -> None:
    """Point the test process's app (tests.celery_app) at the servers ``env`` names."""
    from . import celery_app

    forget_connections()
    celery_app.configure_from(env)


@contextlib.contextmanager
def celery_env_on(
    server: RedisServer, *, visibility: float | None = None, broker: str | None = None
) -> Iterator[CeleryEnv]:
    """The test app and its workers on ``server`` (and on ``broker``, when given), for the block.

    ``visibility``: the Redis broker's visibility timeout (redelivery tests).
    """
    env = worker_env(
        server.url, f"cex-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}", visibility
    )
    if broker is not None:
        env["CEX_BROKER_URL"] = broker
    point_app_at(env)
    try:
        yield CeleryEnv(server, env)
    finally:
        forget_connections()
