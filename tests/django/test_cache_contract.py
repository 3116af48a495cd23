"""The lease contract (tests/contract/test_lease_contract.py) on Django caches.

Every contract test runs here on each cache kind the Django backend supports: Django's
RedisCache and django-redis (both delegate to the Redis backend through the cache's own
client), the database cache (compare-and-swap on its table; on SQLite and on a private
PostgreSQL) and Memcached (gets/cas, a private memcached).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.conf import settings
from django.test import override_settings

from celery_exclusive import Store, connect

from ..contract import test_lease_contract as contract
from .conftest import cache_config

# The contract's tests, collected again here with this module's ``store`` fixture.
globals().update({name: f for name, f in vars(contract).items() if name.startswith("test_")})

KINDS = ["redis-cache", "django-redis", "database", "database-postgres", "memcached"]


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, prefix: str) -> Iterator[Store]:
    config = cache_config(request.param, request)
    with override_settings(CACHES={**settings.CACHES, "leases": config}):
        s = connect("django-cache://leases", prefix=prefix)
        try:
            yield s
        finally:
            s.close()
