"""Memcached (``django.core.cache.backends.memcached.PyMemcacheCache``): records as items.

A lease key's record (see ``common.py``) is one Memcached item, changed with ``gets``/``cas``
and created with ``add``; an index of record names (:data:`INDEX_SHARDS` items) lets a
listing find them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import unquote

from ...exceptions import BackendError
from .connections import PerThread

__all__ = ["INDEX_CELL", "INDEX_SHARDS", "MemcachedCells"]

logger = logging.getLogger(__name__)

# Memcached's index of record names, for listings: each name is in one of these items (an
# item holds at most 1 MB, about 15,000 names; 16 items list about 250,000 keys).
INDEX_SHARDS = 16
INDEX_CELL = "celery-exclusive#index:{}"


class MemcachedCells:
    """Records as Memcached items, changed with ``gets``/``cas``; created with ``add``.

    pymemcache clients are not thread-safe: each thread (and each forked child) builds its
    own from the cache's settings.

    Listing cannot rely on Memcached's own walk of its items (``lru_crawler metadump all``):
    the crawler is no snapshot, and items that a write moves between LRU segments while it
    runs are not dumped (measured: 26 of 60 listings of 50 held, renewed keys missed 18-31
    of them). So each record's name is also appended (``append``, atomic on the server) to
    one of :data:`INDEX_SHARDS` index items right after the ``add`` that created it; a
    listing reads the index (one ``get_many``) and also the crawler's dump where the server
    has one (records created before the index existed, or whose index entry was lost with a
    crash between ``add`` and ``append`` or an eviction), and prunes from the index the
    names whose record is gone, by ``cas``.
    """

    def __init__(self, new_cache: Any, description: str) -> None:
        self.description = description
        self._new_cache = new_cache
        self._servers: list[str] = list(new_cache()._servers)
        # A pymemcache HashClient of our own per thread: they are not thread-safe.
        self._clients = PerThread(lambda: new_cache()._cache, lambda client: client.close())

    @contextlib.contextmanager
    def _client(self, what: str) -> Iterator[Any]:
        from pymemcache.exceptions import MemcacheError

        try:
            with self._clients.use(broken=(MemcacheError, OSError)) as client:
                yield client
        except (MemcacheError, OSError) as exc:
            raise BackendError(f"{what} on {self.description} failed: {exc}") from exc

    @staticmethod
    def _expire(keep: float) -> int:
        seconds = max(1, math.ceil(keep))
        # Memcached reads more than 30 days as a Unix time.
        return seconds if seconds <= 30 * 24 * 3600 else int(time.time()) + seconds

    def read(self, cell: str) -> tuple[str, Any] | None:
        with self._client("gets") as client:
            got = client.gets(cell)
        if not got or got[0] is None:
            return None
        return str(got[0]), got[1]

    def read_many(self, cells: Sequence[str]) -> dict[str, tuple[str, Any]]:
        with self._client("gets") as client:
            got = client.gets_many(list(cells)) or {}
        return {k: (str(v), cas) for k, (v, cas) in got.items() if v is not None}

    def create(self, cell: str, value: str, keep: float, *, listed: bool = True) -> bool:
        with self._client("add") as client:
            created = bool(client.add(cell, value, expire=self._expire(keep), noreply=False))
            if created and listed:
                self._index(client, cell)
        return created

    @staticmethod
    def _index(client: Any, cell: str) -> None:
        """Add ``cell`` to its index item (created on first use; it never expires)."""
        shard = _index_shard(cell)
        line = cell + "\n"
        try:
            for _ in range(3):  # append fails while the item is missing; add, if it appeared
                if client.append(shard, line, noreply=False) or client.add(
                    shard, line, expire=0, noreply=False
                ):
                    return
        except Exception:  # the record exists: its grant stands, only listings may miss it
            pass
        logger.warning("could not index %r in %s: listings may miss it", cell, shard, exc_info=True)

    def replace(self, cell: str, value: str, version: Any, keep: float) -> bool:
        with self._client("cas") as client:
            done = client.cas(cell, value, version, expire=self._expire(keep), noreply=False)
        return done is True  # False: changed since our gets; None: gone

    def replace_many(self, writes: Sequence[tuple[str, str, Any]], keep: float) -> list[bool]:
        return [self.replace(cell, value, version, keep) for cell, value, version in writes]

    def scan(self, prefix: str) -> Iterator[tuple[str, str]]:
        shards = [INDEX_CELL.format(n) for n in range(INDEX_SHARDS)]
        with self._client("gets") as client:
            indexes = {k: (str(v), cas) for k, (v, cas) in (client.gets_many(shards) or {}).items()}
        indexed = {c for text, _ in indexes.values() for c in text.split("\n") if c}
        crawled: set[str] = set()
        for server in self._servers:
            try:
                crawled.update(_metadump(server))
            except BackendError:
                logger.debug("no crawler dump from %s: the index alone", server, exc_info=True)
        cells = sorted(c for c in indexed | crawled if c.startswith(prefix))
        gone: set[str] = set()
        for n in range(0, len(cells), 200):
            with self._client("get") as client:
                values = client.get_many(cells[n : n + 200]) or {}
            for cell in cells[n : n + 200]:
                value = values.get(cell)
                if value is None:
                    gone.add(cell)
                else:
                    yield cell, str(value)
        self._prune(indexes, gone)

    def _prune(self, indexes: Mapping[str, tuple[str, Any]], gone: set[str]) -> None:
        """Drop names of records that are gone from the index items read at ``version``.

        ``cas`` fails if a record was indexed since the read: that shard is pruned next time.
        A record created after our read of it is appended after its ``add``, so it is never
        pruned away.
        """
        for shard, (text, version) in indexes.items():
            names = [c for c in text.split("\n") if c]
            kept = [c for c in names if c not in gone]
            if len(kept) < len(names):
                value = "".join(c + "\n" for c in kept)
                with contextlib.suppress(BackendError), self._client("cas") as client:
                    client.cas(shard, value, version, expire=0, noreply=False)

    def cleanup(self, prefix: str) -> None:
        """Memcached drops expired items by itself."""

    def close(self) -> None:
        self._clients.close()


def _index_shard(cell: str) -> str:
    """The index item that lists ``cell`` (see :class:`MemcachedCells`)."""
    return INDEX_CELL.format(zlib.crc32(cell.encode()) % INDEX_SHARDS)


def _metadump(server: str, timeout: float = 10.0) -> list[str]:
    """Return the keys of every item on one Memcached server (``lru_crawler metadump all``)."""
    if server.startswith("unix:"):
        address: Any = server[len("unix:") :]
        family = socket.AF_UNIX
    else:
        host, _, port = server.rpartition(":")
        if not host:
            host, port = server, "11211"
        address = (host.strip("[]"), int(port))
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    keys: list[str] = []
    for attempt in range(20):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                sock.sendall(b"lru_crawler metadump all\r\n")
                data = b""
                while not (data.endswith(b"END\r\n") or data.startswith((b"BUSY", b"ERROR"))):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError as exc:
            raise BackendError(f"listing keys on memcached {server} failed: {exc}") from exc
        if data.startswith(b"BUSY"):  # another crawl is running: it ends soon
            time.sleep(0.05 * (attempt + 1))
            continue
        if not data.endswith(b"END\r\n"):
            raise BackendError(
                f"memcached {server} cannot list its keys (needs memcached 1.4.31+ with the "
                f"LRU crawler): {data[:200]!r}"
            )
        for line in data.splitlines():  # item lines end in \n, the END line in \r\n
            if line.startswith(b"key="):
                keys.append(unquote(line.split(b" ", 1)[0][4:].decode()))
        return keys
    raise BackendError(f"memcached {server} stayed busy crawling; try listing again")
