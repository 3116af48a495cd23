"""Redis and Valkey backend: one Lua script per operation, one round trip each.

Keys of one lease share a hash tag, so the backend works on Redis Cluster too::

    exclusive:{<key>}:lease    hash: one field per holder token, plus "#f" (the fence counter)
                               and "#w" (until when a refused caller waits); it expires
                               ``fence_retention`` (7 days) after the key's last grant or renewal
    exclusive:{<key>}:signal   waiters BLPOP it; a release pushes only while someone waits
                               (the list expires within seconds)
    exclusive:stats:lost       hash: lost leases counted per task name, for ``stats`` (at most
                               MAX_LOST_TASKS names; it expires 30 days after the last loss)

Expiry is judged by the Redis server's clock (``TIME`` inside the scripts), never the
worker's. Works on Redis 6.2+ and Valkey: standalone, Sentinel and Cluster, plain or TLS.

The parts:

- :mod:`.backend`: :class:`RedisBackend`, what each operation sends and how its reply is read;
- ``lua/``: the scripts, one per operation, each opened by its KEYS, ARGV and reply;
- :mod:`.calls`: how script calls travel (the fast path on kept connections, releases whose
  answer is read later, redis-py's usual path, pipelines);
- :mod:`.url`: :func:`parse_url` (no network), :class:`RedisURL`, the store's options, and the
  redis-py client of a URL (plain, Sentinel, Cluster).
"""

from __future__ import annotations

# Besides the public names (__all__), importable from here as before the package (``X as X``):
# the tunables, and what tests and benchmarks use.
from .backend import LOST_COUNTS_TTL_MS as LOST_COUNTS_TTL_MS
from .backend import RENEW_CHUNK as RENEW_CHUNK
from .backend import SCAN_BATCH as SCAN_BATCH
from .backend import SCRIPTS as SCRIPTS
from .backend import SIGNAL_TTL_MS as SIGNAL_TTL_MS
from .backend import RedisBackend
from .backend import _ms as _ms
from .backend import _parse_holders as _parse_holders
from .calls import DEFAULT_SOCKET_TIMEOUT as DEFAULT_SOCKET_TIMEOUT
from .calls import _Owed as _Owed
from .calls import _pack as _pack
from .url import OWN_OPTIONS as OWN_OPTIONS
from .url import SENTINEL_OPTIONS as SENTINEL_OPTIONS
from .url import RedisURL, parse_url
from .url import build_client as build_client

__all__ = ["RedisBackend", "RedisURL", "parse_url"]
