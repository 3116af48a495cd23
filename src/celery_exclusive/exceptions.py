"""Errors raised by celery-exclusive.

Every error derives from one root, so ``except ExclusiveError`` catches all of them::

    ExclusiveError
    ├── ConfigurationError      bad settings, URL, option or argument (also a ValueError)
    │   └── LimitMismatch       an acquire's limit differs from the key's live holders'
    ├── KeyArgumentError        an argument that cannot be made into a key (also a TypeError)
    ├── BackendError            the store failed or could not be reached (wraps the driver error)
    └── LeaseError              something about one lease (has ``.key``)
        ├── AlreadyHeld         the key is held by someone else (has ``.holder``)
        │   ├── AlreadyRunning  Celery: another run of the task holds the key
        │   └── AlreadyQueued   Celery: a copy of the task is already queued
        ├── Timeout             a blocking acquire gave up (has ``.timeout``)
        └── LeaseLost           a lease we held expired or was taken away
            └── StaleFence      a write's fence is below one its resource already accepted

Errors carry structured attributes rather than only a message, so callers can act on them.
Every error can be rebuilt from its message alone (the attributes are optional keywords), so
Celery can store it as a task's result and give it back from ``AsyncResult.get()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AlreadyHeld",
    "AlreadyQueued",
    "AlreadyRunning",
    "BackendError",
    "ConfigurationError",
    "ExclusiveError",
    "KeyArgumentError",
    "LeaseError",
    "LeaseLost",
    "LimitMismatch",
    "StaleFence",
    "Timeout",
]


class ExclusiveError(Exception):
    """Root of every error raised by celery-exclusive."""


class ConfigurationError(ExclusiveError, ValueError):
    """A setting, URL, option or argument is invalid."""


class LimitMismatch(ConfigurationError):
    """An acquire asked for a ``limit`` other than the one the key's live holders hold it under.

    A key's limit is set by its first grant and kept while any holder is live: a caller with
    ``limit=3`` is not let in next to a holder that took the key with ``limit=1`` (that would
    break the holder's exclusivity). ``key`` names it, ``limit`` is the key's limit (0 when
    the store could not tell) and ``requested`` the caller's.
    """

    def __init__(
        self, message: str = "", *, key: str = "", limit: int = 0, requested: int = 0
    ) -> None:
        super().__init__(
            message
            or f"{key!r} is held under limit={limit}; an acquire with limit={requested} is "
            "refused while it is held (every caller of one key must use the same limit)"
        )
        self.key = key
        self.limit = limit
        self.requested = requested


class KeyArgumentError(ExclusiveError, TypeError):
    """An argument's value cannot be turned into a stable key.

    ``argument`` names the argument and ``value_type`` is the offending type's name.
    """

    def __init__(
        self, message: str = "", *, argument: str | None = None, value_type: str = ""
    ) -> None:
        super().__init__(message)
        self.argument = argument
        self.value_type = value_type


class BackendError(ExclusiveError):
    """The store failed or could not be reached; ``__cause__`` is the driver's error."""


class LeaseError(ExclusiveError):
    """An error about one lease; ``key`` names it."""

    def __init__(self, message: str = "", *, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class AlreadyHeld(LeaseError):
    """The key is held by another owner.

    ``holder`` is the holder's metadata as the store reported it (may be empty when the
    store cannot tell).
    """

    def __init__(
        self, message: str = "", *, key: str = "", holder: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message, key=key)
        self.holder: dict[str, Any] = dict(holder or {})


class AlreadyRunning(AlreadyHeld):
    """Another run of this task holds the execution lease."""


class AlreadyQueued(AlreadyHeld):
    """A copy of this task is already queued (or running) under the same key."""


class Timeout(LeaseError):
    """A blocking acquire did not get the key within ``timeout`` seconds."""

    def __init__(self, message: str = "", *, key: str = "", timeout: float | None = None) -> None:
        super().__init__(message, key=key)
        self.timeout = timeout


class LeaseLost(LeaseError):
    """A lease we held expired or was taken away while we still relied on it."""


class StaleFence(LeaseLost):
    """A write carried a fence lower than one its resource has already accepted.

    The writer's lease was lost: the key was granted again after it (a higher fence), and
    the new holder has written. Raised by :mod:`celery_exclusive.fencing` and
    :mod:`celery_exclusive.contrib.django.fencing` before anything is changed; roll the
    transaction back (leaving ``with conn.transaction()`` or ``transaction.atomic()`` with the
    error does). ``resource`` names what was written (also ``key``), ``fence`` is the refused
    fence and ``current`` the highest one accepted (None when it could not be read).
    """

    def __init__(
        self,
        message: str = "",
        *,
        resource: str = "",
        fence: int | None = None,
        current: int | None = None,
    ) -> None:
        super().__init__(
            message
            or f"stale fence {fence} for {resource!r}: it has accepted fence {current}; "
            "this writer's lease was lost and taken again since",
            key=resource,
        )
        self.resource = resource
        self.fence = fence
        self.current = current
