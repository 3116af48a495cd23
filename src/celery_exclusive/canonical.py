"""The canonical JSON text of a task argument: the part of a lease key that names a value.

The producer (when a task is queued) and the worker (when it runs) must write the same text
for the same value, after the value's round trip through a Celery message: tuples and lists
are one, dict key order does not matter, and ``1``, ``1.0``, ``True`` and ``"1"`` stay four
different texts. :mod:`celery_exclusive.keys` builds keys from these texts.
"""

from __future__ import annotations

import datetime
import decimal
import json
import math
import uuid

from .exceptions import KeyArgumentError

__all__ = ["canonical", "short_repr"]

HINT = "pass a JSON-like value or choose key=[...] / a callable"


def short_repr(value: object, limit: int = 40) -> str:
    """Return ``repr(value)``, cut to about ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject(argument: str, path: str, value: object, what: str) -> KeyArgumentError:
    """Build the error for a value that has no canonical form."""
    where = "" if path == argument else f" (at {path})"
    type_name = type(value).__name__
    return KeyArgumentError(
        f"argument {argument!r}{where} {what}, which cannot be made into a key; {HINT}",
        argument=argument,
        value_type=type_name,
    )


def _normalize(value: object, argument: str, path: str, active: set[int]) -> object:
    """Return ``value`` as plain JSON data (None, bool, int, float, str, list, dict)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if type(value) is int else int.__int__(value)
    if isinstance(value, float):
        number = value if type(value) is float else float.__float__(value)
        if not math.isfinite(number):
            raise _reject(argument, path, value, f"is the non-finite float {number!r}")
        return number
    if isinstance(value, str):
        return value if type(value) is str else str.__str__(value)
    if isinstance(value, (list, tuple, dict)):
        marker = id(value)
        if marker in active:
            raise _reject(argument, path, value, "contains itself")
        active.add(marker)
        try:
            if isinstance(value, dict):
                return _normalize_dict(value, argument, path, active)
            return [
                _normalize(item, argument, f"{path}[{index}]", active)
                for index, item in enumerate(value)
            ]
        finally:
            active.discard(marker)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise _reject(argument, path, value, f"is the non-finite Decimal {str(value)!r}")
        return str(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        # datetime is a subclass of date; isoformat() is right for each of the three.
        return value.isoformat()
    raise _reject(argument, path, value, f"has type {type(value).__name__}")


def _normalize_dict(
    value: dict[object, object], argument: str, path: str, active: set[int]
) -> dict[str, object]:
    """Return a dict with str keys and normalized values (key order is irrelevant)."""
    result: dict[str, object] = {}
    for item_key, item in value.items():
        if not isinstance(item_key, str):
            what = (
                f"has a dict key {short_repr(item_key)} of type {type(item_key).__name__}"
                " (JSON object keys must be strings)"
            )
            raise _reject(argument, path, item_key, what)
        text_key = item_key if type(item_key) is str else str.__str__(item_key)
        result[text_key] = _normalize(item, argument, f"{path}[{short_repr(text_key)}]", active)
    return result


def canonical(value: object, *, argument: str = "value") -> str:
    """Return the canonical JSON text of a JSON-like value.

    Accepted: ``None``, ``bool``, ``int``, finite ``float``, ``str`` (and subclasses of
    int, float and str such as ``IntEnum`` members, as their plain value), ``list`` and
    ``tuple`` (both as JSON arrays, because a JSON message round trip turns tuples into
    lists), ``dict`` with str keys (keys sorted), ``uuid.UUID`` and finite
    ``decimal.Decimal`` (their ``str()``), and ``datetime.datetime``, ``datetime.date``
    and ``datetime.time`` (``isoformat()``). The text is compact (``","`` and ``":"``
    separators) and not ASCII-escaped. ``True`` and ``1`` and ``1.0`` give different texts.

    Anything else raises :class:`~celery_exclusive.exceptions.KeyArgumentError` whose
    message names ``argument`` and the path to the bad value inside containers, and whose
    ``argument`` and ``value_type`` attributes are set.
    """
    try:
        normalized = _normalize(value, argument, argument, set())
        return json.dumps(
            normalized,
            ensure_ascii=False,
            separators=(",", ":"),
            sort_keys=True,
            allow_nan=False,
        )
    except RecursionError:
        raise KeyArgumentError(
            f"argument {argument!r} is nested too deeply to be made into a key; {HINT}",
            argument=argument,
            value_type=type(value).__name__,
        ) from None
