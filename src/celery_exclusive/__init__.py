"""celery-exclusive: run a Celery task at most once at a time, across every worker.

The core is a *lease*: a lock on a key with an owner token, an expiry renewed in the
background, compare-and-delete release, and a fencing number that grows with every grant::

    from celery_exclusive import connect

    store = connect("redis://localhost:6379/0")
    with store.lease("nightly-sync", ttl=30) as lease:
        run_sync(fence=lease.fence)

The Celery integration lives in :mod:`celery_exclusive.celery`.
"""

from __future__ import annotations

from .backends.base import Holder, LeaseInfo
from .exceptions import (
    AlreadyHeld,
    AlreadyQueued,
    AlreadyRunning,
    BackendError,
    ConfigurationError,
    ExclusiveError,
    KeyArgumentError,
    LeaseError,
    LeaseLost,
    LimitMismatch,
    StaleFence,
    Timeout,
)
from .lease import Lease
from .store import Store, connect

__version__ = "0.1.0.dev0"

__all__ = [
    "AlreadyHeld",
    "AlreadyQueued",
    "AlreadyRunning",
    "BackendError",
    "ConfigurationError",
    "ExclusiveError",
    "Holder",
    "KeyArgumentError",
    "Lease",
    "LeaseError",
    "LeaseInfo",
    "LeaseLost",
    "LimitMismatch",
    "StaleFence",
    "Store",
    "Timeout",
    "__version__",
    "connect",
]
