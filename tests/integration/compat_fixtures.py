"""The fixtures of the compat modules (test_compat_*.py), for the app each one tests.

``env, worker, store, broker = compat_fixtures("once_app")`` at a module's top level gives it:
``env``, the module's private servers with the app (tests/compat_apps.py) pointed at them;
``worker``, a worker of that app for the module, its log shown if a test failed; ``store``, the
lease store the migrated settings name; ``broker``, a client of the broker's Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_exclusive import Store

from .. import compat_apps as ca
from ..workers import Worker


def compat_fixtures(app_name: str) -> tuple[Any, Any, Any, Any]:
    """The ``env``, ``worker``, ``store`` and ``broker`` fixtures for ``compat_apps.<app_name>``."""
    app = getattr(ca, app_name)

    @pytest.fixture(scope="module")
    def env() -> Iterator[dict[str, str]]:
        with ca.private_servers(app) as env:
            yield env

    @pytest.fixture(scope="module")
    def worker(request: pytest.FixtureRequest, env: dict[str, str]) -> Iterator[Worker]:
        with ca.running_worker(request, env, f"tests.compat_apps:{app_name}") as w:
            yield w

    @pytest.fixture
    def store(env: dict[str, str]) -> Iterator[Store]:
        with ca.lease_store(env) as s:
            yield s

    @pytest.fixture
    def broker(env: dict[str, str]) -> Iterator[redis.Redis]:
        with ca.broker_client(env) as client:
            yield client

    return env, worker, store, broker
