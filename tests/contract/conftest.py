"""The contract suite runs every test against every backend (the URLs: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from celery_exclusive import Store, connect

from ..conftest import url_for_kind


@pytest.fixture(params=["memory", "redis", "sqlite", "postgres", "etcd"])
def store(request: pytest.FixtureRequest, prefix: str) -> Iterator[Store]:
    if request.param == "memory":
        yield connect("memory://")  # one store per call: nothing to keep apart
        return
    s = connect(url_for_kind(request, request.param), prefix=prefix)
    try:
        yield s
    finally:
        s.close()
