"""etcd store URLs, parsed and checked without the network.

``etcd://host:2379[,host2:2379...][?options]`` talks plain HTTP to the members' client ports;
``etcd+https://...`` talks HTTPS (the system's CA certificates, or ``ca_file``). The store's
options come from the query or from keyword arguments, a keyword winning
(:func:`~celery_exclusive.backends.url_options.parse_options`).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ...exceptions import ConfigurationError
from ..base import DEFAULT_PREFIX, redact_url
from ..url_options import Converter, key_prefix, parse_options, query_items, seconds, text

__all__ = ["DEFAULT_PORT", "DEFAULT_SOCKET_TIMEOUT", "OPTIONS", "EtcdURL", "parse_url"]

#: etcd's client port.
DEFAULT_PORT = 2379

#: Seconds one call may take on one member before the next member is tried.
DEFAULT_SOCKET_TIMEOUT = 5.0

#: The store's options, each in the query or as a keyword argument.
OPTIONS: dict[str, Converter] = {
    "prefix": key_prefix,
    "socket_timeout": seconds,
    "ca_file": text,
}
_DEFAULTS = {"prefix": DEFAULT_PREFIX, "socket_timeout": DEFAULT_SOCKET_TIMEOUT}

_SCHEMES = {"etcd": False, "etcd+https": True}


@dataclass(frozen=True)
class EtcdURL:
    """An etcd store URL, parsed and checked: nothing is connected."""

    members: tuple[tuple[str, int], ...]
    tls: bool
    prefix: str
    socket_timeout: float
    ca_file: str | None
    description: str

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of an ``etcd+https://`` URL (None for plain HTTP)."""
        if not self.tls:
            return None
        return ssl.create_default_context(cafile=self.ca_file)


def parse_url(url: str, **options: Any) -> EtcdURL:
    """Parse and check an etcd store URL without connecting; raise ConfigurationError.

    ``options`` (``prefix``, ``socket_timeout``, ``ca_file``) win over the same names in the
    query. etcd's user authentication is not supported: a URL with a user name is refused.
    """
    shown = redact_url(url)
    scheme, _, rest = url.partition("://")
    tls = _SCHEMES.get(scheme.lower())
    if tls is None:
        raise ConfigurationError(f"not an etcd URL: {shown!r}; expected etcd://host:2379")
    netloc = rest.split("?", 1)[0].split("#", 1)[0]
    netloc, _, path = netloc.partition("/")
    if path.strip("/"):
        raise ConfigurationError(f"an etcd URL has no path ({path!r}): {shown!r}")
    if "@" in netloc:
        raise ConfigurationError(
            f"etcd user authentication is not supported by this store: {shown!r}"
        )
    members = tuple(_member(part, shown) for part in netloc.split(",")) if netloc else ()
    if not members:
        raise ConfigurationError(f"an etcd URL names at least one host:port: {shown!r}")
    ours, _ = parse_options(
        store="etcd",
        shown_url=shown,
        options=OPTIONS,
        defaults=_DEFAULTS,
        query=query_items(url),
        keywords=options,
    )
    if ours.get("ca_file") and not tls:
        raise ConfigurationError(f"ca_file is for etcd+https:// URLs only: {shown!r}")
    hosts = ",".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in members)
    return EtcdURL(
        members=members,
        tls=tls,
        prefix=ours["prefix"],
        socket_timeout=ours["socket_timeout"],
        ca_file=ours.get("ca_file"),
        description=f"{scheme.lower()}://{hosts}",
    )


def _member(part: str, shown: str) -> tuple[str, int]:
    try:
        parsed = urlsplit(f"//{part}")
        host, port = parsed.hostname, parsed.port
    except ValueError as exc:
        raise ConfigurationError(f"bad etcd member {part!r} in {shown!r}: {exc}") from None
    if not host:
        raise ConfigurationError(f"an etcd member needs a host ({part!r}) in {shown!r}")
    return host, port or DEFAULT_PORT
