"""Settings from a Celery app, Django or the environment: bad values fail when read, naming the
setting, and numbers given as text (the environment has nothing else) are read as numbers."""

from __future__ import annotations

from typing import Any

import pytest

from celery_exclusive import ConfigurationError
from celery_exclusive.config import Settings, check_lookup


def lookup(**values: Any) -> Any:
    return lambda name: values.get(name)


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"exclusive_ttl": -1}, "exclusive_ttl"),
        ({"exclusive_on_conflict": "wiat"}, "exclusive_on_conflict"),
        ({"exclusive_hold": "forever"}, "exclusive_hold"),
        ({"exclusive_limit": 0}, "exclusive_limit"),
        ({"exclusive_ttl": "abc"}, "exclusive_ttl"),
        ({"exclusive_queue_ttl": "soon"}, "exclusive_queue_ttl"),
        ({"exclusive_defaults": {"ttl": 0}}, "exclusive_defaults"),
        ({"exclusive_defaults": {"tll": 5}}, "exclusive_defaults"),
        ({"exclusive_defaults": "ttl=5"}, "exclusive_defaults"),
        ({"exclusive_prefix": ""}, "exclusive_prefix"),
        ({"exclusive_enabled": 5}, "exclusive_enabled"),
        ({"exclusive_enabled": "maybe"}, "exclusive_enabled"),
    ],
)
def test_a_bad_app_setting_fails_when_read_and_names_the_setting(
    values: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigurationError, match=setting):
        Settings.from_lookup(lookup(**values))
    assert [p for p in check_lookup(lookup(**values)) if setting in p]


def test_enabled_reads_its_spellings() -> None:
    for value, enabled in [("off", False), ("", False), ("Yes", True), (0, False), (True, True)]:
        assert Settings.from_lookup(lookup(exclusive_enabled=value)).enabled is enabled


def test_every_bad_setting_is_reported_at_once() -> None:
    problems = check_lookup(
        lookup(exclusive_ttl=-1, exclusive_on_conflict="wiat", exclusive_queue_ttl=0)
    )
    assert len(problems) == 3, problems


def test_a_pair_that_only_a_task_can_judge_is_not_refused_here() -> None:
    # on_duplicate="replace" needs hold="queued": a task may well set it itself.
    settings = Settings.from_lookup(lookup(exclusive_on_duplicate="replace"))
    assert settings.task_defaults == {"on_duplicate": "replace"}


def test_numbers_from_the_environment_are_numbers() -> None:
    env = {
        "CELERY_EXCLUSIVE_TTL": "30",
        "CELERY_EXCLUSIVE_LIMIT": "2",
        "CELERY_EXCLUSIVE_MAX_HOLD": "none",
        "CELERY_EXCLUSIVE_RETRY_BACKOFF": "1.5",
        "CELERY_EXCLUSIVE_QUEUE_TTL": "60",
    }
    settings = Settings.from_env(env)
    assert settings.task_defaults == {
        "ttl": 30.0,
        "limit": 2,
        "max_hold": None,
        "retry_backoff": 1.5,
    }
    assert settings.queue_ttl == 60.0


@pytest.mark.parametrize(
    ("name", "text"),
    [("TTL", "thirty"), ("LIMIT", "1.5"), ("TTL", "-1"), ("MAX_RETRIES", "many"), ("TTL", "nan")],
)
def test_bad_numbers_from_the_environment_name_the_variable(name: str, text: str) -> None:
    with pytest.raises(ConfigurationError, match=f"CELERY_EXCLUSIVE_{name}"):
        Settings.from_env({f"CELERY_EXCLUSIVE_{name}": text})


def test_abort_on_the_eventlet_pool_is_refused_at_worker_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import celery._state
    from celery import Celery

    from celery_exclusive.celery import ExclusiveTask
    from celery_exclusive.celery.startup import _pool_name, check_app

    # This app alone: not the shared tasks other tests define (some on purpose with bad options)
    monkeypatch.setattr(celery._state, "_on_app_finalizers", set())
    app = Celery("abort-pools", broker="memory://", backend="cache+memory://")
    app.conf.exclusive_url = "memory://"

    @app.task(
        base=ExclusiveTask, exclusive={"key": [], "on_lock_lost": "abort"}, lazy=False, shared=False
    )
    def guarded() -> None: ...

    # eventlet greenlets cannot be interrupted by this library: say so before any task runs
    problems = check_app(app, "eventlet")
    assert len(problems) == 1 and "eventlet" in problems[0] and "guarded" in problems[0]
    for pool in ("prefork", "threads", "solo", "gevent", None):
        assert check_app(app, pool) == []
    assert _pool_name(type("TaskPool", (), {"__module__": "celery.concurrency.eventlet"})) == (
        "eventlet"
    )


def celery_app(**conf: Any) -> Any:
    from celery import Celery

    app = Celery("store-for", broker="memory://", backend="cache+memory://", set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.mark.parametrize(
    ("query", "setting", "prefix"),
    [
        ("?prefix=from-url", None, "from-url"),  # no exclusive_prefix: the URL's applies
        ("?prefix=from-url", "mine", "mine"),  # a setting is a keyword: it wins over the URL
        ("", "mine", "mine"),
        # neither: "exclusive", as the app has always used, whatever the store's own default
        # (SQL stores default to no prefix: a new default would change every key of a
        # running project, and old and new workers of a rolling upgrade would both run)
        ("", None, "exclusive"),
    ],
)
def test_the_apps_store_gets_the_prefix_of_its_setting_else_of_the_url_else_exclusive(
    tmp_path: Any, query: str, setting: str | None, prefix: str | None
) -> None:
    from celery_exclusive.celery.config import reset, store_for

    url = f"sqlite:///{tmp_path}/leases.db{query}"
    app = celery_app(exclusive_url=url, exclusive_prefix=setting)
    try:
        store = store_for(app)
        assert store.backend.prefix == prefix  # type: ignore[attr-defined]
    finally:
        reset(app)


@pytest.mark.parametrize(
    ("result_backend", "broker", "url"),
    [
        ("redis://r:6379/1", "redis://b:6379/0", "redis://r:6379/1"),  # the result backend first
        ("rpc://", "redis://b:6379/0", "redis://b:6379/0"),
        (
            None,
            "sentinel://s:26379/mymaster;sentinel://t:26379/mymaster",
            "sentinel://s:26379/mymaster",
        ),
        ("rpc://", "amqp://guest@rabbit//", None),
        (None, "memory://", None),  # kombu's in-process transport: not a shared store
        ("db+postgresql://u@h/db", None, None),  # a result backend Celery reads, not ours
        ("cache+memory://", 42, None),
    ],
)
def test_a_celery_app_without_a_store_url_falls_back_on_its_redis_backend_or_broker(
    result_backend: Any, broker: Any, url: str | None
) -> None:
    from celery_exclusive.celery.config import find_url
    from celery_exclusive.config import celery_fallback_url

    assert celery_fallback_url(result_backend, broker) == url
    app = celery_app()
    app.conf.result_backend, app.conf.broker_url = result_backend, broker
    assert find_url(app) == url


def test_the_cli_settings_read_the_environment_and_arguments_win() -> None:
    env = {"CELERY_EXCLUSIVE_URL": "redis://env/0", "CELERY_EXCLUSIVE_PREFIX": "env"}
    settings = Settings.from_env(env)
    assert (settings.url, settings.prefix) == ("redis://env/0", "env")
    assert settings.store_options("sqlite:///x.db") == {"prefix": "env"}
    given = settings.merged(url="redis://arg/0", prefix=None)
    assert (given.url, given.prefix) == ("redis://arg/0", "env")
    unset = Settings.from_env({})
    assert unset.store_options("sqlite:///x.db?prefix=url") == {}  # the URL's applies
    assert unset.store_options("sqlite:///x.db") == {"prefix": "exclusive"}
