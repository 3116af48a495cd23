"""The one options parser every store uses: conversions, unknown names, and precedence."""

from __future__ import annotations

import pytest

from celery_exclusive.backends.url_options import (
    boolean,
    key_prefix,
    parse_options,
    positive_int,
    query_items,
    seconds,
    text,
)
from celery_exclusive.exceptions import ConfigurationError

OPTIONS = {"prefix": text, "ttl": seconds, "create": boolean, "size": positive_int}
DEFAULTS = {"prefix": "exclusive", "create": True}


def parse(url: str, **keywords: object) -> tuple[dict[str, object], list[tuple[str, str]]]:
    return parse_options(
        store="test",
        shown_url=url.split("?")[0],
        options=OPTIONS,
        defaults=DEFAULTS,
        query=query_items(url),
        keywords=keywords,
        foreign=lambda name: name.startswith("driver_"),
    )


def test_defaults_apply_and_unset_options_without_default_are_left_out() -> None:
    assert parse("x://h/") == ({"prefix": "exclusive", "create": True}, [])


def test_query_values_are_converted() -> None:
    ours, _ = parse("x://h/?prefix=app&ttl=1.5&create=off&size=3")
    assert ours == {"prefix": "app", "ttl": 1.5, "create": False, "size": 3}


def test_a_keyword_wins_over_the_query() -> None:
    ours, _ = parse("x://h/?prefix=from-url&ttl=9", prefix="from-keyword", ttl=2)
    assert ours["prefix"] == "from-keyword"
    assert ours["ttl"] == 2.0


def test_a_keyword_of_none_counts_as_not_given() -> None:
    ours, _ = parse("x://h/?prefix=from-url", prefix=None)
    assert ours["prefix"] == "from-url"


def test_foreign_query_items_are_passed_on_in_order() -> None:
    _, rest = parse("x://h/?driver_b=2&prefix=p&driver_a=1")
    assert rest == [("driver_b", "2"), ("driver_a", "1")]


@pytest.mark.parametrize(
    "url, keywords, words",
    [
        ("x://h/?nope=1", {}, ["unknown test option 'nope'", "x://h/"]),
        ("x://h/", {"nope": 1}, ["unknown test option 'nope'", "keyword"]),
        ("x://h/?ttl=abc", {}, ["ttl", "'abc'", "x://h/"]),
        ("x://h/?ttl=-1", {}, ["ttl", "> 0"]),
        ("x://h/?ttl=inf", {}, ["ttl"]),
        ("x://h/", {"ttl": True}, ["ttl"]),
        ("x://h/?create=maybe", {}, ["create", "true or false"]),
        ("x://h/?size=0", {}, ["size", ">= 1"]),
        ("x://h/?size=1.5", {}, ["size"]),
        ("x://h/?prefix=", {}, ["prefix", "non-empty"]),
    ],
)
def test_every_bad_option_is_a_configuration_error_naming_it(
    url: str, keywords: dict[str, object], words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        parse(url, **keywords)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", 3, None])
def test_a_key_prefix_is_a_non_empty_string_without_braces(bad: object) -> None:
    assert key_prefix("prefix", "app:1") == "app:1"
    with pytest.raises(ConfigurationError, match="prefix"):
        key_prefix("prefix", bad)
