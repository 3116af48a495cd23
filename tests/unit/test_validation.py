"""Bad input fails at the call with a clear error, and nothing reaches the store."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

from celery_exclusive import ConfigurationError, Store, connect
from celery_exclusive.backends.base import Backend, Holder, LeaseInfo


class UntouchableBackend(Backend):
    """Fails the test if any operation reaches it."""

    def _touched(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the store was contacted")

    acquire = release = renew = wait = holders = force_release = _touched
    mark_done = is_done = _touched

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        raise AssertionError("the store was contacted")

    def describe(self) -> str:
        return "untouchable"


@pytest.fixture
def store() -> Store:
    return Store(UntouchableBackend())


@pytest.mark.parametrize("ttl", [0, -1, math.nan, math.inf, "30", True])
def test_bad_ttl(store: Store, ttl: Any) -> None:
    with pytest.raises(ConfigurationError, match="ttl"):
        store.lease("k", ttl=ttl)


@pytest.mark.parametrize("limit", [0, -2, 1.5, "2", True])
def test_bad_limit(store: Store, limit: Any) -> None:
    with pytest.raises(ConfigurationError, match="limit"):
        store.lease("k", limit=limit)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        (42, "must be a str"),
        (None, "must be a str"),
        (b"k", "must be a str"),
        ("", "empty"),
        ("x" * 513, "at most 512"),
        ("has space", "whitespace"),
        ("tab\tbed", "whitespace"),
        ("brace{tag}", "braces"),
    ],
)
def test_bad_key(store: Store, key: Any, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        store.lease(key)


def test_bad_meta_token_timeout_max_hold(store: Store) -> None:
    with pytest.raises(ConfigurationError, match="meta"):
        store.lease("k", meta=["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="token"):
        store.lease("k", token="a|b")
    with pytest.raises(ConfigurationError, match="timeout"):
        store.lease("k", timeout=-1)
    with pytest.raises(ConfigurationError, match="max_hold"):
        store.lease("k", max_hold=0)
    with pytest.raises(ConfigurationError, match="timeout"):
        store.lease("k").acquire(timeout=-0.5)


def test_configuration_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        Store(UntouchableBackend(), default_ttl=0)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("localhost:6379", "not a store URL"),
        ("ftp://host/", "unknown store scheme"),
        ("redis+sentinel://127.0.0.1:26379/", "must name the service"),
        ("redis+cluster://:7000", "at least one host|invalid host"),
        ("redis+cluster://h:notaport", "invalid host"),
        ("sqlite:///x.db?table=bad;drop", "invalid table name"),
        ("sqlite:///x.db?bogus=1", "unknown SQLite option"),
        ("sqlite://relative", "invalid SQLite URL"),
        ("postgresql://h/db?table=1bad", "invalid table name"),
    ],
)
def test_bad_urls(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        connect(url)


def test_url_password_is_not_repeated_in_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        connect("nope://user:secret@host/")
    assert "secret" not in str(info.value)


def test_connect_rejects_foreign_objects() -> None:
    with pytest.raises(ConfigurationError, match="redis-py client"):
        connect(object())


def test_tls_and_valkey_urls_build_without_touching_the_network() -> None:
    import redis

    store = connect("rediss://:pw@127.0.0.1:1/0?ssl_cert_reqs=none")
    pool = store.backend.client.connection_pool  # type: ignore[attr-defined]
    assert pool.connection_class is redis.SSLConnection
    assert "pw" not in repr(store)
    assert connect("valkey://127.0.0.1:1/0").backend.describe().startswith("redis://")


def test_memory_urls_with_a_name_share_one_store() -> None:
    a, b = connect("memory://shared-test"), connect("memory://shared-test")
    assert a.backend is b.backend
    assert connect("memory://").backend is not connect("memory://").backend


def test_holder_as_dict_is_json_ready() -> None:
    holder = Holder("t", 7, 1.23456, 10.0, 11.0, {"task_id": "x"})
    assert holder.as_dict() == {
        "token": "t",
        "fence": 7,
        "expires_in": 1.235,
        "acquired_at": 10.0,
        "renewed_at": 11.0,
        "task_id": "x",
    }


# -- store URLs: every bad part is a ConfigurationError that names the option and the URL
# (password redacted), raised before anything connects (port 1: nothing listens there).


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://:pw@127.0.0.1:1/abc", "db"),
        ("redis://:pw@127.0.0.1:1/1/2", "db"),
        ("redis://:pw@127.0.0.1:1/-1", "db"),
        ("redis://:pw@127.0.0.1:1/0?db=x", "db"),
        ("redis://:pw@127.0.0.1:1/0?socket_timeout=abc", "socket_timeout"),
        ("redis://:pw@127.0.0.1:1/0?socket_timeout=-1", "socket_timeout"),
        ("redis://:pw@127.0.0.1:1/0?fence_retention=abc", "fence_retention"),
        ("redis://:pw@127.0.0.1:1/0?fence_retention=0", "fence_retention"),
        ("redis://:pw@127.0.0.1:1/0?bogus=1", "bogus"),
        ("redis://:pw@127.0.0.1:1/0?max_connections=many", "max_connections"),
        ("redis://:pw@127.0.0.1:notaport/0", "port"),
        ("valkey://:pw@127.0.0.1:1/abc", "db"),
        ("unix://:pw@/tmp/redis.sock?db=abc", "db"),
        ("redis+sentinel://:pw@127.0.0.1:1/mymaster/abc", "db"),
        ("redis+sentinel://:pw@127.0.0.1:1/mymaster/0?bogus=1", "bogus"),
        ("redis+sentinel://:pw@127.0.0.1:1/mymaster/0?db=1", "db"),
        ("redis://:pw@127.0.0.1:1/0?db=1", "db"),
        ("redis+cluster://:pw@127.0.0.1:1?bogus=1", "bogus"),
        ("redis+cluster://:pw@127.0.0.1:1?socket_timeout=x", "socket_timeout"),
    ],
)
def test_bad_redis_url_parts_are_configuration_errors(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        connect(url)
    message = str(info.value)
    assert "127.0.0.1" in message or "/tmp/redis.sock" in message, message  # names the URL
    assert "pw" not in message.replace("pwd", ""), message


def test_a_keyword_option_wins_over_the_redis_url_query() -> None:
    store = connect("redis://127.0.0.1:1/0?prefix=a&fence_retention=60", prefix="b")
    backend: Any = store.backend
    assert backend.prefix == "b"
    assert backend.fence_retention_ms == 60_000  # the query's, where no keyword is given


def test_redis_own_options_are_taken_as_keywords_too() -> None:
    store = connect("redis://127.0.0.1:1/0?socket_timeout=9", socket_timeout=2, fence_retention=60)
    backend: Any = store.backend
    assert backend.fence_retention_ms == 60_000
    assert backend.client.connection_pool.connection_kwargs["socket_timeout"] == 2


def test_a_keyword_of_none_leaves_the_redis_url_option() -> None:
    backend: Any = connect("redis://127.0.0.1:1/0?prefix=a", prefix=None).backend
    assert backend.prefix == "a"


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?prefix=a&socket_timeout=9",
        "unix:///tmp/redis.sock?prefix=a&socket_timeout=9",
        "redis+sentinel://127.0.0.1:1/mymaster/0?prefix=a&socket_timeout=9",
        "redis+cluster://127.0.0.1:1?prefix=a&socket_timeout=9",
    ],
)
def test_every_redis_topology_lets_a_keyword_win_over_the_query(url: str) -> None:
    from celery_exclusive.backends.redis import parse_url

    parsed = parse_url(url, prefix="b")
    assert (parsed.prefix, parsed.socket_timeout) == ("b", 9.0)
    assert "prefix" not in parsed.query and "prefix" not in parsed.url


def test_a_parsed_redis_url_does_not_show_its_passwords() -> None:
    from celery_exclusive.backends.redis import parse_url

    plain = parse_url("redis://:secret@127.0.0.1:1/0")
    sentinel = parse_url("redis+sentinel://:secret@127.0.0.1:1/m/0?sentinel_password=secret2")
    assert "secret" not in repr(plain) and "secret" not in repr(sentinel)
    assert (sentinel.password, sentinel.sentinel_password) == ("secret", "secret2")


def test_redis_py_keyword_options_still_reach_redis_py() -> None:
    backend: Any = connect("redis://127.0.0.1:1/0?prefix=a", max_connections=7).backend
    assert backend.client.connection_pool.max_connections == 7
    assert backend.prefix == "a"


@pytest.mark.parametrize(
    ("keywords", "words"),
    [
        ({"prefix": "a{b}"}, "prefix"),
        ({"prefix": ""}, "prefix"),
        ({"socket_timeout": -1}, "socket_timeout"),
        ({"fence_retention": "soon"}, "fence_retention"),
    ],
)
def test_bad_redis_keyword_options_name_the_option_and_the_url(
    keywords: dict[str, Any], words: str
) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        connect("redis://:pw@127.0.0.1:1/0", **keywords)
    assert "127.0.0.1" in str(info.value)
    assert ":pw@" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("sqlite:///x.db?fence_retention=abc", "fence_retention"),
        ("sqlite:///x.db?busy_timeout=-1", "busy_timeout"),
        ("sqlite:///x.db?cleanup_interval=inf", "cleanup_interval"),
        ("postgresql://u:pw@127.0.0.1:1/db?fence_retention=abc", "fence_retention"),
        ("postgresql://u:pw@127.0.0.1:1/db?create_tables=maybe", "create_tables"),
    ],
)
def test_bad_sql_url_options_name_the_option_and_the_url(url: str, words: str) -> None:
    with pytest.raises(ConfigurationError, match=words) as info:
        connect(url)
    message = str(info.value)
    assert "x.db" in message or "127.0.0.1" in message, message
    assert ":pw@" not in message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("django-cache://db?poll=abc", "poll"),
        ("django-cache://db?fence_retention=abc", "fence_retention"),
        ("django-cache://db?poll=", "poll"),
    ],
)
def test_bad_django_cache_url_options_name_the_option(url: str, words: str) -> None:
    # Parsing fails before Django's settings are needed.
    with pytest.raises(ConfigurationError, match=words) as info:
        connect(url)
    assert "django-cache://db" in str(info.value)


def test_unknown_scheme_lists_every_scheme_connect_accepts() -> None:
    from celery_exclusive.store import SCHEMES

    with pytest.raises(ConfigurationError) as info:
        connect("reddis://localhost:6379/0")
    message = str(info.value)
    for scheme in SCHEMES:
        assert scheme in message
    assert {"valkey", "valkeys", "sentinel", "redis+sentinel", "redis+cluster"} <= set(SCHEMES)
    for scheme in SCHEMES:  # and every listed scheme is accepted (if not this empty URL)
        try:
            connect(f"{scheme}://")
        except ConfigurationError as other:
            assert "unknown store scheme" not in str(other)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:pw@127.0.0.1:1/3?socket_timeout=2&fence_retention=60&prefix=p",
        "redis://127.0.0.1:1",
        "redis://127.0.0.1:1/",
        "rediss://127.0.0.1:1/0?ssl_cert_reqs=none",
        "unix:///tmp/redis.sock?db=2",
        "valkey://127.0.0.1:1/0?max_connections=5",
        "redis+sentinel://127.0.0.1:1/mymaster/1",
        "redis+cluster://127.0.0.1:1,127.0.0.1:2",
        "postgresql://u:pw@127.0.0.1:1/db?sslmode=disable&table=t",
        "sqlite:///x.db?busy_timeout=3",
        "django-cache://db?poll=0.5",
        "memory://",
    ],
)
def test_validate_url_accepts_good_urls_without_connecting(url: str) -> None:
    from celery_exclusive.store import validate_url

    validate_url(url)  # port 1: a connection attempt would fail


@pytest.mark.parametrize(
    "url",
    [
        "reddis://localhost:6379/0",
        "redis://127.0.0.1:1/abc",
        "redis://127.0.0.1:1/0?socket_timeout=abc",
        "redis+cluster://127.0.0.1:1?bogus=1",
        "sqlite:///x.db?bogus=1",
        "postgresql://127.0.0.1:1/db?fence_retention=-1",
        "django-cache://db?poll=0",
        "localhost:6379",
    ],
)
def test_validate_url_refuses_what_connect_refuses(url: str) -> None:
    from celery_exclusive.store import validate_url

    with pytest.raises(ConfigurationError):
        validate_url(url)


@pytest.mark.parametrize(
    "url", ["reddis://:pw@[::1", "postgresql://u:pw@[::1/db", "sqlite://u:pw@[::1/x.db"]
)
def test_a_url_that_cannot_be_split_is_a_configuration_error_without_its_password(
    url: str,
) -> None:
    from celery_exclusive.store import validate_url

    for check in (connect, validate_url):
        with pytest.raises(ConfigurationError) as info:
            check(url)
        assert "pw" not in str(info.value) and "[::1" in str(info.value)


@pytest.mark.parametrize(
    ("url", "driver", "extra"),
    [
        ("redis://127.0.0.1:1/0", "redis", "redis"),
        ("postgresql://127.0.0.1:1/db", "psycopg", "postgres"),
        ("django-cache://default", "django", "django"),
    ],
)
def test_a_missing_driver_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, url: str, driver: str, extra: str
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, driver, None)  # what `import driver` meets when it is absent
    with pytest.raises(ConfigurationError, match=rf"pip install 'celery-exclusive\[{extra}\]'"):
        connect(url)


def test_every_scheme_names_one_store_and_its_url_is_shown_without_secrets() -> None:
    from celery_exclusive.backends.registry import STORE_TYPES, redact, store_type
    from celery_exclusive.store import SCHEMES

    assert tuple(s for kind in STORE_TYPES for s in kind.schemes) == SCHEMES
    assert len(set(SCHEMES)) == len(SCHEMES)
    for scheme in SCHEMES:
        assert scheme in store_type(f"{scheme}://h/0").schemes
    assert redact("postgresql://u:pw@h:5432/db?password=pw2&sslmode=require") == (
        "postgresql://u:***@h:5432/db"
    )
    assert redact(object()) == "object"  # a client, not a URL
