"""The SQL stores' options: one parser (``url_options``), a keyword winning over the URL query.

Nothing connects: a PostgreSQL backend connects lazily (port 1: nothing listens there), and a
SQLite backend opens its file on first use.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from celery_exclusive import ConfigurationError
from celery_exclusive.backends.sql import PostgresBackend, SQLiteBackend

PG = "postgresql://u:pw@127.0.0.1:1/db"


def test_a_keyword_wins_over_the_query_on_both_stores() -> None:
    pg = PostgresBackend.from_url(f"{PG}?prefix=url&table=t_url", prefix="kw", table="t_kw")
    lite = SQLiteBackend.from_url("sqlite:///x.db?prefix=url&busy_timeout=3", prefix="kw")
    assert (pg.prefix, pg.table) == ("kw", "t_kw")
    assert (lite.prefix, lite.busy_timeout) == ("kw", 3.0)


def test_query_values_are_converted_and_defaults_apply() -> None:
    lite = SQLiteBackend.from_url("sqlite:///x.db?create_tables=off&fence_retention=60")
    assert lite.create_tables is False and lite.fence_retention == 60.0
    assert lite.table == "celery_exclusive_lease" and lite.prefix == ""
    assert lite.cleanup_interval == 300.0 and lite.busy_timeout == 10.0


def test_an_empty_prefix_means_none() -> None:
    assert SQLiteBackend.from_url("sqlite:///x.db?prefix=").prefix == ""


def test_other_query_items_go_to_libpq() -> None:
    backend = PostgresBackend.from_url(f"{PG}?sslmode=disable&table=t")
    assert backend._params["sslmode"] == "disable"
    assert "table" not in backend._params and backend.table == "t"


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: PostgresBackend.from_url(PG, bogus=1), ["bogus", "keyword", "127.0.0.1"]),
        (lambda: SQLiteBackend.from_url("sqlite:///x.db", bogus=1), ["bogus", "x.db"]),
        (lambda: PostgresBackend.from_url(f"{PG}?listen_url=x"), ["listen_url", "keyword"]),
        (lambda: PostgresBackend.from_url(PG, listen_url=5), ["listen_url", "127.0.0.1"]),
        (lambda: PostgresBackend.from_url(PG, create_tables="maybe"), ["create_tables"]),
        (lambda: SQLiteBackend.from_url("sqlite:///x.db", prefix=1), ["prefix", "x.db"]),
        (lambda: SQLiteBackend.from_url("sqlite:///x.db", table="s.t"), ["table name", "x.db"]),
        (lambda: PostgresBackend.from_url(PG, cleanup_interval=True), ["cleanup_interval"]),
    ],
)
def test_every_bad_option_is_a_configuration_error_naming_it(
    build: Callable[[], object], words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as info:
        build()
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert ":pw@" not in message
