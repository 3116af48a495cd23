"""Fixtures for tests on real Celery workers and on the other Redis topologies."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..conftest import started
from ..servers import RedisCluster, RedisSentinel, RedisServer
from ..workers import CeleryEnv, celery_env_on

__all__ = ["CeleryEnv"]  # imported from here by the modules of this folder


@pytest.fixture(scope="module")
def celery_env(own_redis: RedisServer) -> Iterator[CeleryEnv]:
    """This module's private redis-server (``own_redis``) as broker, results and store, with
    the test process's app pointed at it. Freezing or killing ``own_redis`` stops the broker."""
    with celery_env_on(own_redis) as env:
        yield env


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A private Redis Cluster for one module."""
    with started(RedisCluster) as topology:
        yield topology


@pytest.fixture(scope="module")
def sentinel() -> Iterator[RedisSentinel]:
    """A private master and sentinel for one module."""
    with started(RedisSentinel) as topology:
        yield topology
