"""etcd backend: leases as keys with etcd leases, through etcd's JSON gateway.

``etcd://host:2379[,host2:2379...][?prefix=...&socket_timeout=...]`` (``etcd+https://`` for
TLS, with ``ca_file``). No driver to install: the store talks to the members' JSON gateway
(etcd 3.4 and later) over the standard library's ``http.client``.

- :mod:`.backend`: :class:`EtcdBackend`, what each operation sends (the keys are drawn there);
- :mod:`.gateway`: :class:`Gateway`, the calls, member failover, batched keep-alives, watches;
- :mod:`.url`: :func:`parse_url` (no network) and the store's options.
"""

from __future__ import annotations

from .backend import EtcdBackend, lease_seconds
from .gateway import Gateway
from .url import EtcdURL, parse_url

__all__ = ["EtcdBackend", "EtcdURL", "Gateway", "lease_seconds", "parse_url"]
