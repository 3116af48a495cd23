"""The contract suite runs every test against every backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_exclusive import Store, connect


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, prefix: str) -> Iterator[Store]:
    if request.param == "memory":
        yield connect("memory://")
        return
    url = request.getfixturevalue("redis_url")
    s = connect(url, prefix=prefix)
    try:
        yield s
    finally:
        s.close()
