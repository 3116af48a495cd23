"""What both SQL stores share: their options, key prefixing, cleanup pacing, listings, renewals.

:class:`_SQLBackend` is the base of :class:`~.postgres.PostgresBackend` and
:class:`~.sqlite.SQLiteBackend`; the functions here are the dialect-free steps both use. The
options both stores take (from the URL's query or keyword arguments, a keyword winning) are
declared once in :func:`shared_options` and parsed by
:func:`~celery_exclusive.backends.url_options.parse_options`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ...exceptions import BackendError, ConfigurationError
from ..base import DEFAULT_FENCE_RETENTION, DONE, Backend, Holder, LeaseInfo, RenewRequest
from ..url_options import Converter, boolean, seconds
from .schema import DEFAULT_TABLE, check_table

__all__ = [
    "DEFAULT_CLEANUP_INTERVAL",
    "SCAN_PAGE",
    "SHARED_DEFAULTS",
    "glob_prefix",
    "renew_plan",
    "shared_options",
]

logger = logging.getLogger(__name__)

#: Expired lease rows and idle fence counters are deleted at most this often per backend.
DEFAULT_CLEANUP_INTERVAL = 300.0

#: Rows fetched per round trip by ``scan``.
SCAN_PAGE = 500

#: The value of each shared option set nowhere.
SHARED_DEFAULTS: dict[str, Any] = {
    "table": DEFAULT_TABLE,
    "prefix": "",
    "fence_retention": DEFAULT_FENCE_RETENTION,
    "cleanup_interval": DEFAULT_CLEANUP_INTERVAL,
    "create_tables": True,
}


def _prefix(name: str, value: object) -> str:
    """A key prefix: any string, empty for none (the SQL stores' default)."""
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, not {value!r}")
    return value


def shared_options(*, schema_allowed: bool) -> dict[str, Converter]:
    """The options both SQL stores take, with their converters (``schema.table`` on PostgreSQL)."""

    def table(name: str, value: object) -> str:
        return check_table(value, schema_allowed=schema_allowed)

    return {
        "table": table,
        "prefix": _prefix,
        "fence_retention": seconds,
        "cleanup_interval": seconds,
        "create_tables": boolean,
    }


def glob_prefix(match: str | None) -> str:
    """The literal start of a glob (everything before its first wildcard)."""
    if not match:
        return ""
    cut = len(match)
    for char in "*?[":
        at = match.find(char)
        if at != -1:
            cut = min(cut, at)
    return match[:cut]


def renew_plan(
    requests: Sequence[RenewRequest], stored: Callable[[str], str]
) -> tuple[list[tuple[str, str, float]], list[int]]:
    """Deduplicate (key, token) pairs (keeping the longest ttl); map each request to its pair."""
    index: dict[tuple[str, str], int] = {}
    unique: list[tuple[str, str, float]] = []
    where: list[int] = []
    for r in requests:
        pair = (stored(r.key), r.token)
        at = index.get(pair)
        if at is None:
            at = index[pair] = len(unique)
            unique.append((pair[0], pair[1], r.ttl))
        elif r.ttl > unique[at][2]:
            unique[at] = (pair[0], pair[1], r.ttl)
        where.append(at)
    return unique, where


class _SQLBackend(Backend):
    """What both SQL backends share: key prefixing, options, cleanup pacing, listings."""

    def __init__(
        self,
        *,
        table: str,
        prefix: str,
        fence_retention: float,
        cleanup_interval: float,
        create_tables: bool,
        description: str,
    ) -> None:
        self.table = table
        self.prefix = prefix
        self.fence_retention = fence_retention
        self.cleanup_interval = cleanup_interval
        self.create_tables = create_tables
        self._description = description
        self._pid = os.getpid()
        self._ready = False
        self._setup_lock = threading.Lock()
        # First cleanup after one interval, not at start-up (many processes start together).
        self._next_cleanup = time.monotonic() + cleanup_interval

    # -- keys -----------------------------------------------------------------------------

    def _k(self, key: str) -> str:
        return f"{self.prefix}:{key}" if self.prefix else key

    def _done_key(self, key: str) -> str:
        """The stored key of ``key``'s done marks (rows whose token is a task id)."""
        return self._k(key + DONE)

    def _unk(self, stored: str) -> str:
        return stored[len(self.prefix) + 1 :] if self.prefix else stored

    def _scan_prefix(self, match: str | None) -> str:
        return self._k(glob_prefix(match)) if self.prefix else glob_prefix(match)

    def describe(self) -> str:
        return self._description

    # -- cleanup --------------------------------------------------------------------------

    def _cleanup_due(self) -> bool:
        now = time.monotonic()
        if now < self._next_cleanup:
            return False
        self._next_cleanup = now + self.cleanup_interval
        return True

    def _maybe_cleanup(self) -> None:
        if not self._cleanup_due():
            return
        try:
            self.cleanup()
        except BackendError:  # housekeeping only: the next interval tries again
            logger.debug("cleanup of %s failed", self._description, exc_info=True)

    def cleanup(self) -> None:
        """Delete expired holds, and fence counters idle for ``fence_retention`` seconds.

        Runs by itself at most every ``cleanup_interval`` seconds (after an acquire); call it
        from a periodic job if you prefer.
        """
        raise NotImplementedError  # pragma: no cover

    # -- listings -------------------------------------------------------------------------

    def _scan_rows(
        self, match: str | None, page: Callable[[str, str, str], list[tuple[Any, ...]]]
    ) -> Iterator[LeaseInfo]:
        """Group the rows of ``page(after_key, after_token, prefix)`` calls into LeaseInfos."""
        prefix = self._scan_prefix(match)
        after_key, after_token = "", ""
        current: str | None = None
        holders: list[Holder] = []
        while True:
            rows = page(after_key, after_token, prefix)
            for stored, *rest in rows:
                if stored != current:
                    if current is not None and holders:
                        yield LeaseInfo(key=self._unk(current), holders=holders)
                    current, holders = stored, []
                key = self._unk(stored)
                if self.prefix and not stored.startswith(self.prefix + ":"):
                    continue
                if stored.endswith(DONE):  # done marks (mark_done), not leases
                    continue
                if match is not None and not fnmatch.fnmatchcase(key, match):
                    continue
                holders.append(self._holder_row(rest))
            if len(rows) < SCAN_PAGE:
                break
            after_key, after_token = rows[-1][0], rows[-1][1]
        if current is not None and holders:
            yield LeaseInfo(key=self._unk(current), holders=holders)

    def _holder_row(self, row: Sequence[Any]) -> Holder:
        raise NotImplementedError  # pragma: no cover
