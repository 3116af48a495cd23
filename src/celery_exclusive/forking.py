"""What a child process must not inherit from ``fork()``: held locks and the parent's grants.

``fork()`` copies every lock in the state it was in, but only the forking thread. A lock that
another thread (the renewal thread, a waiter) held at that moment stays held in the child with
nobody left to release it, and the child's next use of it hangs forever. Celery's prefork pool
forks worker children from a process that may have threads, so every lock of the lease core
is replaced in the child, without being taken, right after the fork::

    forking.replace_after_fork(self, "_lock", threading.Lock)   # an object's lock
    forking.call_after_fork(self, Renewer._reset_after_fork)     # or a reset method

And a grant belongs to the process it was made in: :func:`epoch` changes in every child, so a
:class:`~celery_exclusive.Lease` granted before the fork knows, in the child, that it holds
nothing there (the parent still does, and renews it).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["call_after_fork", "epoch", "replace_after_fork"]

T = TypeVar("T")

_epoch = 0
_resets: list[tuple[weakref.ref[Any], Callable[[Any], None]]] = []
_resets_lock = threading.Lock()
_prune_at = 64


def epoch() -> int:
    """A number that changes in every forked child (0 in a process that never forked)."""
    return _epoch


def call_after_fork(owner: T, reset: Callable[[T], None]) -> None:
    """Call ``reset(owner)`` in every forked child, as long as ``owner`` lives."""
    global _prune_at
    with _resets_lock:
        if len(_resets) >= _prune_at:  # drop the dead now and then: amortised O(1) per call
            _resets[:] = [entry for entry in _resets if entry[0]() is not None]
            _prune_at = max(64, 2 * len(_resets))
        _resets.append((weakref.ref(owner), reset))


def replace_after_fork(owner: object, attr: str, factory: Callable[[], object]) -> None:
    """Set ``owner.<attr> = factory()`` in every forked child (for a lock or condition)."""
    call_after_fork(owner, lambda obj: setattr(obj, attr, factory()))


def _after_fork_in_child() -> None:
    global _epoch, _resets_lock
    _epoch += 1
    _resets_lock = threading.Lock()
    for ref, reset in list(_resets):
        owner = ref()
        if owner is not None:
            reset(owner)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
