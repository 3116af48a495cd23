"""Checks of argument values shared by the core: one rule for what counts as seconds.

A store's lease arguments (:meth:`celery_exclusive.Store.lease`) and a task's options
(:mod:`celery_exclusive.options`) take durations as Python numbers, checked here. A duration
written as text (a URL's query, an environment variable) is converted where it is read (see
:mod:`celery_exclusive.backends.url_options`), then checked by the same rule.
"""

from __future__ import annotations

import math

from .exceptions import ConfigurationError

__all__ = ["optional_seconds", "seconds"]


def seconds(name: str, value: object) -> float:
    """Return ``value`` as a float if it is a finite number > 0 (not a bool, not text).

    Raises :class:`ConfigurationError` naming ``name`` otherwise.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be seconds > 0 (a number), not {value!r}")
    return float(value)


def optional_seconds(name: str, value: object) -> float | None:
    """:func:`seconds`, with None allowed (and returned)."""
    return None if value is None else seconds(name, value)
