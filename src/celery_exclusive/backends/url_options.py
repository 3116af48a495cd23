"""A store's options from its URL's query and from keyword arguments: one parser, one rule.

Every store takes its own options (``prefix``, ``table``, ``fence_retention``, ...) either in
the URL's query (``redis://host/0?prefix=app``) or as keyword arguments of
:func:`celery_exclusive.connect`. The rule, the same for every store: **a keyword argument wins
over the same option in the URL's query.** (An integration that passes a default as a keyword,
such as the Celery app's ``exclusive_prefix``, passes it only when the user set it.)

A store declares its options as a mapping from name to a *converter*: a function
``(name, value) -> typed value`` that takes the query's text or a keyword's Python value and
raises :class:`~celery_exclusive.exceptions.ConfigurationError` for a bad one. Every error
names the option and the (password-free) URL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .. import validate
from ..exceptions import ConfigurationError

__all__ = [
    "Converter",
    "boolean",
    "count",
    "key_prefix",
    "parse_options",
    "positive_int",
    "query_items",
    "seconds",
    "text",
]

#: ``(name, value) -> typed value``; raises ConfigurationError for a bad value.
Converter = Callable[[str, object], Any]


def text(name: str, value: object) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{name} must be a non-empty string, not {value!r}")
    return value


def key_prefix(name: str, value: object) -> str:
    """The first part of every key: a non-empty string without braces (a brace would start a
    Redis Cluster hash tag)."""
    prefix = text(name, value)
    if "{" in prefix or "}" in prefix:
        raise ConfigurationError(
            f"{name} must be a non-empty string without braces, not {prefix!r}"
        )
    return prefix


def boolean(name: str, value: object) -> bool:
    """``True``/``False``, or their spellings in a query: 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        spelled = value.strip().lower()
        if spelled in {"1", "true", "yes", "on"}:
            return True
        if spelled in {"0", "false", "no", "off"}:
            return False
    raise ConfigurationError(f"{name} must be true or false, not {value!r}")


def seconds(name: str, value: object) -> float:
    """A finite number of seconds > 0 (a number, or its text in a query): the core's rule,
    :func:`celery_exclusive.validate.seconds`, after reading the text."""
    number = value
    if isinstance(value, str):
        with contextlib.suppress(ValueError):  # text that is no number is refused below
            number = float(value)
    try:
        return validate.seconds(name, number)
    except ConfigurationError:
        raise ConfigurationError(f"{name} must be a number of seconds > 0, not {value!r}") from None


def positive_int(name: str, value: object) -> int:
    """An int >= 1 (an int, or its decimal text in a query)."""
    number = _whole(value)
    if number is None or number < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, not {value!r}")
    return number


def count(name: str, value: object) -> int:
    """An int >= 0 (an int, or its decimal text in a query)."""
    number = _whole(value)
    if number is None or number < 0:
        raise ConfigurationError(f"{name} must be an int >= 0, not {value!r}")
    return number


def _whole(value: object) -> int | None:
    """An int given as one (not a bool) or as decimal digits; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None


def query_items(url: str) -> list[tuple[str, str]]:
    """The ``(name, value)`` pairs of ``url``'s query, in order, blank values kept."""
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def parse_options(
    *,
    store: str,
    shown_url: str,
    options: Mapping[str, Converter],
    defaults: Mapping[str, Any],
    query: Iterable[tuple[str, str]] = (),
    keywords: Mapping[str, Any] | None = None,
    foreign: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Return ``(ours, rest)``: this store's options, converted, and the query's other items.

    ``options`` maps each option of the store to its converter; ``defaults`` gives the value
    of an option set nowhere (an option without a default is left out when not set). A
    ``keywords`` value wins over the same name in ``query``; a keyword of None counts as not
    given. Query items that are not the store's go to ``rest`` when ``foreign(name)`` says
    they belong to the driver (libpq, redis-py); any other unknown name, in the query or in
    the keywords, is a :class:`ConfigurationError` naming ``store``, the name and
    ``shown_url`` (which must already be password-free).
    """
    given: dict[str, object] = {}
    rest: list[tuple[str, str]] = []
    for name, value in query:
        if name in options:
            given[name] = value
        elif foreign is not None and foreign(name):
            rest.append((name, value))
        else:
            raise ConfigurationError(
                f"unknown {store} option {name!r} in {shown_url!r}; known: "
                + ", ".join(sorted(options))
            )
    for name, value in (keywords or {}).items():
        if name not in options:
            raise ConfigurationError(
                f"unknown {store} option {name!r} (a keyword argument) for {shown_url!r}; "
                "known: " + ", ".join(sorted(options))
            )
        if value is not None:
            given[name] = value
    ours: dict[str, Any] = {}
    for name, convert in options.items():
        if name in given:
            try:
                ours[name] = convert(name, given[name])
            except ConfigurationError as exc:
                raise ConfigurationError(f"{store} store {shown_url!r}: {exc}") from None
        elif name in defaults:
            ours[name] = defaults[name]
    return ours, rest
