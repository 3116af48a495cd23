"""The stores the model test runs on: every store of the contract suite and every Django cache
kind, each built by the fixtures those suites already have (imported here, not copied).

Redis gets a private server of this module's own (``own_redis``), so that the model may
restart it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from celery_exclusive import Store, connect

from ..django.conftest import cache_config, django_db, memcached_location, postgres_cache
from ..django.test_cache_contract import KINDS as DJANGO_KINDS
from ..servers import RedisServer

__all__ = [
    "KINDS",
    "ModelStore",
    "django_db",
    "memcached_location",
    "postgres_cache",
]

#: Every store kind: the contract's stores, then the Django cache kinds (``django:<kind>``).
KINDS = ["memory", "redis", "sqlite", "postgres", *(f"django:{kind}" for kind in DJANGO_KINDS)]


@dataclass
class ModelStore:
    kind: str
    store: Store
    #: The private server behind the store, when the model may restart it.
    redis_server: RedisServer | None = None

    @property
    def can_fork(self) -> bool:
        """Stores whose backends are documented to work in a forked child of a holder."""
        return self.kind in {"memory", "redis", "sqlite", "postgres"}


@pytest.fixture
def model_store(request: pytest.FixtureRequest, prefix: str) -> Iterator[ModelStore]:
    kind: str = request.param
    if kind == "memory":
        yield ModelStore(kind, connect("memory://"))
        return
    if kind == "redis":
        server: RedisServer = request.getfixturevalue("own_redis")
        store = connect(server.url, prefix=prefix)
        try:
            yield ModelStore(kind, store, redis_server=server)
        finally:
            store.close()
        return
    if kind in {"sqlite", "postgres"}:
        store = connect(request.getfixturevalue(f"{kind}_url"), prefix=prefix)
        try:
            yield ModelStore(kind, store)
        finally:
            store.close()
        return
    from django.conf import settings
    from django.test import override_settings

    config = cache_config(kind.removeprefix("django:"), request)
    with override_settings(CACHES={**settings.CACHES, "leases": config}):
        store = connect("django-cache://leases", prefix=prefix)
        try:
            yield ModelStore(kind, store)
        finally:
            store.close()
