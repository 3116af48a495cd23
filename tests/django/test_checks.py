"""System checks: refused caches, a missing store, bad settings; never a connection."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from celery_exclusive import ConfigurationError, connect
from celery_exclusive.backends.django_cache import CacheProblem, DjangoCacheBackend, inspect_cache
from celery_exclusive.contrib.django.checks import CACHE_CHECKS, check_store

# Every server below is unreachable (port 1): the checks must pass or fail without asking.
NOWHERE_REDIS = "redis://127.0.0.1:1/0"

CACHES = {
    "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    "dummy": {"BACKEND": "django.core.cache.backends.dummy.DummyCache"},
    "file": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": "/x"},
    "redis": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": NOWHERE_REDIS},
    "django-redis": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": NOWHERE_REDIS},
    "shards": {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": [NOWHERE_REDIS, "redis://127.0.0.1:2/0"],
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.ShardClient"},
    },
    "memcached": {
        "BACKEND": "django.core.cache.backends.memcached.PyMemcacheCache",
        "LOCATION": "127.0.0.1:1",
    },
    "pylibmc": {
        "BACKEND": "django.core.cache.backends.memcached.PyLibMCCache",
        "LOCATION": "127.0.0.1:1",
    },
}


def ids(**overrides: object) -> list[str]:
    with override_settings(CACHES={**settings.CACHES, **CACHES}, **overrides):
        return [m.id or "" for m in check_store()]


@pytest.mark.parametrize("alias", ["locmem", "dummy", "file"])
def test_a_cache_not_shared_or_not_atomic_is_E001(alias: str) -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=alias) == ["celery_exclusive.E001"]
    assert ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL=f"django-cache://{alias}") == [
        "celery_exclusive.E001"
    ]


@pytest.mark.parametrize("alias", ["redis", "django-redis", "db", "memcached"])
def test_a_shared_atomic_cache_passes_without_being_contacted(alias: str) -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=alias) == []


@pytest.mark.parametrize("alias", ["pylibmc", "shards", "no-such-alias"])
def test_an_unsupported_cache_is_E003(alias: str) -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=alias) == ["celery_exclusive.E003"]


def test_no_store_at_all_is_E002() -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=None) == ["celery_exclusive.E002"]


def test_a_redis_broker_is_a_store_as_for_celery() -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_BROKER_URL=NOWHERE_REDIS) == []
    assert ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_BROKER_URL="amqp://localhost//") == [
        "celery_exclusive.E002"
    ]


def test_an_unreachable_url_is_not_contacted_and_passes() -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL=NOWHERE_REDIS) == []
    assert (
        ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL="redis+cluster://127.0.0.1:1") == []
    )


@pytest.mark.parametrize(
    "overrides",
    [
        {"CELERY_EXCLUSIVE_CACHE": None, "CELERY_EXCLUSIVE_URL": "mongodb://localhost"},
        {"CELERY_EXCLUSIVE_CACHE": None, "CELERY_EXCLUSIVE_URL": "localhost:6379"},
        {"CELERY_EXCLUSIVE_CACHE": "db", "CELERY_EXCLUSIVE_URL": NOWHERE_REDIS},
        {"CELERY_EXCLUSIVE_CACHE": 3},
        {"CELERY_EXCLUSIVE_QUEUE_TTL": -1},
    ],
)
def test_an_invalid_setting_is_E004(overrides: dict[str, object]) -> None:
    assert ids(**overrides) == ["celery_exclusive.E004"]


def test_memory_store_is_a_warning() -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL="memory://") == [
        "celery_exclusive.W001"
    ]


def test_the_default_database_cache_is_a_warning() -> None:
    caches = {**settings.CACHES, "default": settings.CACHES["db"]}
    with override_settings(CACHES=caches, CELERY_EXCLUSIVE_CACHE="default"):
        assert [m.id for m in check_store()] == ["celery_exclusive.W002"]


def test_disabled_needs_no_store() -> None:
    assert ids(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_ENABLED=False) == []


def test_manage_py_check_reports_E001_with_a_hint() -> None:
    caches = {**settings.CACHES, "locmem": CACHES["locmem"]}
    with (
        override_settings(CACHES=caches, CELERY_EXCLUSIVE_CACHE="locmem"),
        pytest.raises(SystemCheckError) as info,
    ):
        call_command("check")
    text = str(info.value)
    assert "celery_exclusive.E001" in text
    assert "one process only" in text
    assert "HINT:" in text and "CELERY_EXCLUSIVE_URL" in text


@pytest.mark.parametrize(
    ("alias", "words"),
    [("locmem", "one process only"), ("dummy", "stores nothing"), ("file", "not atomic")],
)
def test_connect_refuses_the_same_caches(alias: str, words: str) -> None:
    with (
        override_settings(CACHES={**settings.CACHES, **CACHES}),
        pytest.raises(ConfigurationError, match=words),
    ):
        connect(f"django-cache://{alias}")


def test_connect_to_an_unreachable_cache_does_not_connect_yet() -> None:
    with override_settings(CACHES={**settings.CACHES, **CACHES}):
        for alias in ("redis", "django-redis", "memcached"):
            store = connect(f"django-cache://{alias}")
            assert alias in repr(store)
            store.close()


def test_every_problem_the_backend_finds_has_a_check() -> None:
    assert set(CACHE_CHECKS) == set(CacheProblem)


@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        ("locmem", CacheProblem.NOT_SHARED),
        ("dummy", CacheProblem.STORES_NOTHING),
        ("file", CacheProblem.NOT_ATOMIC),
        ("pylibmc", CacheProblem.NO_CAS),
        ("shards", CacheProblem.SHARDED),
        ("no-such-alias", CacheProblem.NO_ALIAS),
    ],
)
def test_the_backend_reports_facts_and_knows_no_setting_of_the_app(
    alias: str, reason: CacheProblem
) -> None:
    with override_settings(CACHES={**settings.CACHES, **CACHES}):
        support = inspect_cache(alias)
        assert (support.supported, support.reason) == (False, reason)
        with pytest.raises(ConfigurationError) as info:
            connect(f"django-cache://{alias}")
    assert support.problem in str(info.value)
    assert "CELERY_EXCLUSIVE" not in str(info.value)


def test_a_keyword_option_wins_over_the_url_query(prefix: str) -> None:
    # Given a URL whose query names one prefix and poll, and keywords naming others
    store = connect(f"django-cache://db?prefix={prefix}-query&poll=5", prefix=prefix, poll=0.05)
    try:
        assert isinstance(store.backend, DjangoCacheBackend)
        assert store.backend.poll == 0.05
        # When a lease is taken
        with store.lease("job"):
            # Then it lives under the keyword's prefix
            plain = connect("django-cache://db", prefix=prefix)
            try:
                assert len(plain.holders("job")) == 1
            finally:
                plain.close()
    finally:
        store.close()


def test_django_cache_url_parameters_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="unknown django-cache"):
        connect("django-cache://db?timeout=3")
    with pytest.raises(ConfigurationError, match="poll"):
        connect("django-cache://db?poll=0")
    with pytest.raises(ConfigurationError, match="name a cache alias"):
        connect("django-cache://")


@pytest.mark.parametrize(
    ("url", "options", "name"),
    [
        ("django-cache://db", {"poll": -1}, "poll"),
        ("django-cache://db?poll=0.5", {"fence_retention": "soon"}, "fence_retention"),
        ("django-cache://db?prefix=a{b}", {}, "prefix"),
        ("django-cache://db", {"prefix": ""}, "prefix"),
        ("django-cache://db", {"timeout": 3}, "timeout"),
    ],
)
def test_a_bad_option_names_itself_and_the_url(
    url: str, options: dict[str, Any], name: str
) -> None:
    with pytest.raises(ConfigurationError, match=name) as info:
        connect(url, **options)
    assert "django-cache://db" in str(info.value)


# -- every bad CELERY_EXCLUSIVE_* value is an error of manage.py check, not of the first task


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"CELERY_EXCLUSIVE_TTL": -1}, "CELERY_EXCLUSIVE_TTL"),
        ({"CELERY_EXCLUSIVE_TTL": "thirty"}, "CELERY_EXCLUSIVE_TTL"),
        ({"CELERY_EXCLUSIVE_ON_CONFLICT": "wiat"}, "CELERY_EXCLUSIVE_ON_CONFLICT"),
        ({"CELERY_EXCLUSIVE_HOLD": "forever"}, "CELERY_EXCLUSIVE_HOLD"),
        ({"CELERY_EXCLUSIVE_ON_DUPLICATE": "ignore"}, "CELERY_EXCLUSIVE_ON_DUPLICATE"),
        ({"CELERY_EXCLUSIVE_LIMIT": 0}, "CELERY_EXCLUSIVE_LIMIT"),
        ({"CELERY_EXCLUSIVE_QUEUE_TTL": 0}, "CELERY_EXCLUSIVE_QUEUE_TTL"),
        ({"CELERY_EXCLUSIVE_DEFAULTS": {"ttl": -5}}, "CELERY_EXCLUSIVE_DEFAULTS"),
        ({"CELERY_EXCLUSIVE_DEFAULTS": {"on_conflit": "skip"}}, "on_conflit"),
        (
            {"CELERY_EXCLUSIVE_CACHE": None, "CELERY_EXCLUSIVE_URL": "reddis://127.0.0.1:1/0"},
            "reddis",
        ),
        (
            {"CELERY_EXCLUSIVE_CACHE": None, "CELERY_EXCLUSIVE_URL": "redis://127.0.0.1:1/abc"},
            "db",
        ),
        (
            {
                "CELERY_EXCLUSIVE_CACHE": None,
                "CELERY_EXCLUSIVE_URL": "redis://:pw@127.0.0.1:1/0?socket_timeout=abc",
            },
            "socket_timeout",
        ),
        (
            {"CELERY_EXCLUSIVE_CACHE": None, "CELERY_EXCLUSIVE_URL": "django-cache://db?poll=x"},
            "poll",
        ),
    ],
)
def test_a_bad_setting_value_is_E004_naming_it(overrides: dict[str, object], setting: str) -> None:
    with override_settings(CACHES={**settings.CACHES, **CACHES}, **overrides):
        messages = check_store()
    assert [m.id for m in messages] == ["celery_exclusive.E004"], messages
    assert setting in messages[0].msg, messages[0].msg
    assert ":pw@" not in messages[0].msg


def test_each_bad_setting_is_its_own_error() -> None:
    found = ids(CELERY_EXCLUSIVE_TTL=-1, CELERY_EXCLUSIVE_ON_CONFLICT="wiat")
    assert found == ["celery_exclusive.E004", "celery_exclusive.E004"]


def test_numbers_given_as_text_pass() -> None:
    assert ids(CELERY_EXCLUSIVE_TTL="30", CELERY_EXCLUSIVE_LIMIT="2") == []


def test_manage_py_check_fails_on_a_bad_ttl() -> None:
    with (
        override_settings(CELERY_EXCLUSIVE_TTL=-1),
        pytest.raises(SystemCheckError, match="CELERY_EXCLUSIVE_TTL"),
    ):
        call_command("check")
