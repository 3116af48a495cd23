"""Hooks that integrations and users connect to: acquired, conflict, released, lost.

A tiny signal in the core, so that the core needs neither Celery's nor Django's. Receivers are
called synchronously with keyword arguments; an exception in a receiver is logged and never
breaks the lease operation that fired it::

    from celery_exclusive import events

    @events.lease_lost.connect
    def page_someone(lease, reason, **kwargs):
        ...
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from . import forking

__all__ = ["Hook", "lease_acquired", "lease_conflict", "lease_lost", "lease_released"]

logger = logging.getLogger(__name__)

Receiver = Callable[..., object]


class Hook:
    """A named list of receivers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._receivers: list[Receiver] = []
        self._lock = threading.Lock()
        forking.replace_after_fork(self, "_lock", threading.Lock)

    def connect(self, receiver: Receiver) -> Receiver:
        """Add ``receiver`` (usable as a decorator); connecting twice has no effect."""
        with self._lock:
            if receiver not in self._receivers:
                self._receivers = [*self._receivers, receiver]
        return receiver

    def disconnect(self, receiver: Receiver) -> None:
        """Remove ``receiver`` if it is connected."""
        with self._lock:
            self._receivers = [r for r in self._receivers if r != receiver]

    def send(self, **kwargs: Any) -> None:
        """Call every receiver with ``kwargs``; log (never raise) a receiver's error."""
        for receiver in self._receivers:
            try:
                receiver(**kwargs)
            except Exception:
                logger.exception("receiver %r of %s failed", receiver, self.name)

    def __repr__(self) -> str:
        return f"<Hook {self.name} receivers={len(self._receivers)}>"


#: ``lease``: a lease was granted (``lease.fence`` is set).
lease_acquired = Hook("lease_acquired")
#: ``lease``, ``holders``: an acquire found the key held (``holders``: list of Holder).
lease_conflict = Hook("lease_conflict")
#: ``lease``, ``released`` (bool: whether the store still had it): a lease was released.
lease_released = Hook("lease_released")
#: ``lease``, ``reason``: a held lease was found gone, refused renewal, or could not be
#: renewed before it expired.
lease_lost = Hook("lease_lost")
