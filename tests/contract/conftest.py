"""The contract suite runs every test against every backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_exclusive import Store, connect

from ..conftest import unavailable
from ..pg import shared_postgres_url


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite file for the session; tests keep apart by key prefix, as on Redis."""
    path: Path = tmp_path_factory.mktemp("sqlite") / "leases.db"
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    try:
        return shared_postgres_url()
    except RuntimeError as exc:
        unavailable(
            f"no PostgreSQL ({exc}): install PostgreSQL or pgserver, or set "
            "CELERY_EXCLUSIVE_TEST_POSTGRES_DSN"
        )
        raise  # unreachable: unavailable() fails or skips


@pytest.fixture(params=["memory", "redis", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, prefix: str) -> Iterator[Store]:
    if request.param == "memory":
        yield connect("memory://")
        return
    url = request.getfixturevalue(f"{request.param}_url")
    s = connect(url, prefix=prefix)
    try:
        yield s
    finally:
        s.close()
