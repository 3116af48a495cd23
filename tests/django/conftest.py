"""Django for the tests in this folder: configured in-process, never through the environment.

``DJANGO_SETTINGS_MODULE`` is left unset on purpose: Celery enables its Django fix-up in any
process that has it, and the other tests start Celery workers that inherit the environment.
The database is a SQLite file in the session's temp dir, migrated once.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import django
import pytest
from django.conf import settings

from ..conftest import unavailable
from ..pg import django_database
from .servers import MemcachedServer, memcached_binary

_DIR = tempfile.mkdtemp(prefix="cex-django-")
atexit.register(shutil.rmtree, _DIR, ignore_errors=True)


def _configure() -> None:
    if settings.configured:
        return
    from . import settings as test_settings

    values = {name: getattr(test_settings, name) for name in dir(test_settings) if name.isupper()}
    values["DATABASES"] = {
        "default": {**values["DATABASES"]["default"], "NAME": os.path.join(_DIR, "db.sqlite3")}
    }
    settings.configure(**values)
    django.setup()


_configure()


@pytest.fixture(scope="session", autouse=True)
def django_db() -> None:
    """Create the tables (auth, admin, sessions...) and the cache table, once."""
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    call_command("createcachetable", verbosity=0)


@pytest.fixture(scope="session")
def memcached_location() -> Iterator[str]:
    if memcached_binary() is None:
        unavailable(
            "no memcached: apt-get install memcached, or set CELERY_EXCLUSIVE_TEST_MEMCACHED"
        )
    server = MemcachedServer().start()
    try:
        yield server.location
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def postgres_cache(postgres_url: str) -> dict[str, Any]:
    """A database cache in this session's PostgreSQL (the ``pg`` database alias)."""
    from django.core.management import call_command
    from django.db import connections

    from . import routers

    database = django_database(postgres_url)
    # Django reads DATABASES once: add the alias to its connection handler as well.
    settings.DATABASES["pg"] = database
    connections.settings["pg"] = connections.configure_settings(
        {"default": dict(settings.DATABASES["default"]), "pg": dict(database)}
    )["pg"]
    routers.PG_CACHE_TABLE = f"cex_django_cache_{uuid.uuid4().hex[:12]}"
    atexit.register(_drop_pg_table, routers.PG_CACHE_TABLE)
    config = {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": routers.PG_CACHE_TABLE,
    }
    call_command("createcachetable", routers.PG_CACHE_TABLE, database="pg", verbosity=0)
    return config


def _drop_pg_table(table: str) -> None:
    import contextlib

    from django.db import connections

    with contextlib.suppress(Exception), connections["pg"].cursor() as cursor:
        cursor.execute(f'DROP TABLE IF EXISTS "{table}"')
    with contextlib.suppress(Exception):
        connections["pg"].close()


def cache_config(kind: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """A ``CACHES`` entry of one kind, on this session's private servers."""
    if kind == "redis-cache":
        url = request.getfixturevalue("redis_url")
        return {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": url}
    if kind == "django-redis":
        url = request.getfixturevalue("redis_url")
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": url,
            "OPTIONS": {"CLIENT_CLASS": "django_redis.client.DefaultClient"},
        }
    if kind == "memcached":
        location = request.getfixturevalue("memcached_location")
        return {
            "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
            "LOCATION": location,
        }
    if kind == "database":
        return dict(settings.CACHES["db"])
    if kind == "database-postgres":
        return dict(request.getfixturevalue("postgres_cache"))
    raise ValueError(kind)


@pytest.fixture
def leases(prefix: str) -> Iterator[Any]:
    """The store of the Django settings (the database cache), under this test's own prefix."""
    from django.test import override_settings

    from celery_exclusive.contrib.django.conf import get_store

    with override_settings(CELERY_EXCLUSIVE_PREFIX=prefix):
        store = get_store()
        yield store
        for info in list(store.leases()):
            store.force_release(info.key)


@pytest.fixture(params=["database", "redis"])
def configured_store(request: pytest.FixtureRequest, leases: Any, prefix: str) -> Iterator[Any]:
    """The configured store: the database cache, or CELERY_EXCLUSIVE_URL on Redis (both under
    this test's own prefix), for the commands that read the store of the settings."""
    if request.param == "database":
        yield leases
        return
    from django.test import override_settings

    from celery_exclusive.contrib.django.conf import get_store

    redis_url = request.getfixturevalue("redis_url")
    with override_settings(
        CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL=redis_url, CELERY_EXCLUSIVE_PREFIX=prefix
    ):
        store = get_store()
        yield store
        for info in list(store.leases()):
            store.force_release(info.key)


@pytest.fixture
def superuser() -> Any:
    from django.contrib.auth.models import User

    name = f"admin-{uuid.uuid4().hex[:8]}"
    return User.objects.create_superuser(name, f"{name}@example.com", "pw-admin")


@pytest.fixture
def viewer() -> Any:
    """A staff user who may see the held leases, not release them."""
    from django.contrib.auth.models import Permission, User

    name = f"viewer-{uuid.uuid4().hex[:8]}"
    user = User.objects.create_user(name, password="pw-viewer", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(
            content_type__app_label="celery_exclusive", codename="view_heldlease"
        )
    )
    return user
