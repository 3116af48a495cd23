"""Redis store URLs: parsed and checked without the network, then turned into a client.

:func:`parse_url` reads every part of a ``redis://``, ``rediss://``, ``unix://``,
``redis+sentinel://`` or ``redis+cluster://`` URL (``valkey://`` and ``valkeys://`` too) into
a :class:`RedisURL`, one function per topology: plain, Sentinel, Cluster. The store's own
options (:data:`OWN_OPTIONS`) come from the query or from keyword arguments, a keyword winning
(:func:`~celery_exclusive.backends.url_options.parse_options`); on a plain URL the other query
parameters go to redis-py, which must know them. :func:`build_client` then builds the redis-py
client (Sentinel, Cluster or plain).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, quote, unquote, urlencode, urlsplit

from ...exceptions import BackendError, ConfigurationError
from ..base import DEFAULT_FENCE_RETENTION, DEFAULT_PREFIX, redact_url
from ..url_options import Converter, count, key_prefix, parse_options, query_items, seconds
from .calls import DEFAULT_REPLICA_TIMEOUT, DEFAULT_SOCKET_TIMEOUT, import_redis

__all__ = [
    "OWN_OPTIONS",
    "SENTINEL_OPTIONS",
    "RedisURL",
    "build_client",
    "check_replica_timeout",
    "parse_url",
]

_SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel", "sentinel"})
_CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})
_PLAIN_SCHEMES = frozenset({"redis", "rediss", "unix"})
#: Options the store reads itself, on every Redis scheme: in the query or as keywords.
OWN_OPTIONS = ("prefix", "socket_timeout", "fence_retention", "replicas", "replica_timeout")
#: Query parameters of a Sentinel URL besides ours.
SENTINEL_OPTIONS = ("service_name", "db", "sentinel_password")


_OPTIONS: dict[str, Converter] = {
    "prefix": key_prefix,
    "socket_timeout": seconds,
    "fence_retention": seconds,
    "replicas": count,
    "replica_timeout": seconds,
}
_DEFAULTS = {
    "prefix": DEFAULT_PREFIX,
    "socket_timeout": DEFAULT_SOCKET_TIMEOUT,
    "fence_retention": DEFAULT_FENCE_RETENTION,
    "replicas": 0,
    "replica_timeout": DEFAULT_REPLICA_TIMEOUT,
}


@dataclass(frozen=True)
class RedisURL:
    """A Redis store URL, parsed and checked: nothing is connected.

    ``prefix``, ``socket_timeout``, ``fence_retention``, ``replicas`` and ``replica_timeout``
    are the store's options (a keyword argument's, else the query's, else the default).
    ``query`` holds the parameters left for redis-py (plain schemes only), as given; ``url``
    is the URL redis-py gets (plain schemes: the query without the store's options).
    """

    scheme: str
    description: str
    prefix: str
    socket_timeout: float
    fence_retention: float
    db: int
    #: Replicas that must confirm each grant and renewal (``WAIT``); 0: none.
    replicas: int = 0
    #: How long a grant or renewal waits for them, in seconds.
    replica_timeout: float = DEFAULT_REPLICA_TIMEOUT
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    query: dict[str, str] = field(default_factory=dict)
    url: str = field(default="", repr=False)


def parse_url(url: str, **options: Any) -> RedisURL:
    """Parse and check a Redis store URL without connecting; raise ConfigurationError.

    ``options`` are the store's own (:data:`OWN_OPTIONS`): each wins over the same name in
    the query. Every error names the bad part and the URL, with its password replaced by
    ``***``. ``valkey://`` and ``valkeys://`` are read as ``redis://`` and ``rediss://``::

        parse_url("redis://h:6379/0?prefix=a", prefix="b").prefix   # "b"
    """
    if url[:6].lower() == "valkey":
        url = "redis" + url[len("valkey") :]
    shown = redact_url(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    # Query parameters not ours: on a plain URL redis-py's (checked here: redis-py imported
    # only if the query has some); on the others, each topology's parser says which it takes.
    foreign: Callable[[str], bool] = _any_name
    if scheme in _PLAIN_SCHEMES:
        foreign = functools.partial(_redis_py_takes, scheme)
    elif scheme not in _SENTINEL_SCHEMES and scheme not in _CLUSTER_SCHEMES:
        raise _bad(shown, f"not a Redis scheme: {scheme!r}")
    ours, rest = parse_options(
        store="Redis",
        shown_url=shown,
        options=_OPTIONS,
        defaults=_DEFAULTS,
        query=query_items(url),
        keywords=options,
        foreign=foreign,
    )
    check_replica_timeout(ours["replica_timeout"], ours["socket_timeout"], shown)
    query = dict(rest)  # the last one wins, as in redis-py
    common: dict[str, Any] = {"scheme": scheme, "description": shown, **ours}
    if scheme in _SENTINEL_SCHEMES:
        return _parse_sentinel(parts, query, common)
    if scheme in _CLUSTER_SCHEMES:
        return _parse_cluster(parts, query, common)
    return _parse_plain(parts, query, common)


def check_replica_timeout(timeout: float, socket_timeout: float | None, shown: str) -> None:
    """Refuse a ``replica_timeout`` the socket timeout would cut short: ``WAIT`` blocks the
    connection that long, and a read timed out would be taken for a broken server."""
    if socket_timeout is not None and timeout >= socket_timeout:
        raise _bad(
            shown,
            f"replica_timeout ({timeout:g} s) must be shorter than socket_timeout "
            f"({socket_timeout:g} s)",
        )


def _parse_sentinel(parts: SplitResult, query: dict[str, str], common: dict[str, Any]) -> RedisURL:
    """``redis+sentinel://[:password@]host:port[,host:port...]/service/db``."""
    shown = common["description"]
    creds, _, hostlist = parts.netloc.rpartition("@")
    path = [p for p in parts.path.split("/") if p]
    service = query.pop("service_name", path[0] if path else "")
    if not service:
        raise ConfigurationError(
            "a Sentinel URL must name the service: redis+sentinel://host:26379/mymaster/0"
        )
    if len(path) > 2:
        raise _bad(shown, f"expected /service/db after the hosts, not {parts.path!r}")
    if len(path) > 1 and "db" in query:
        raise _bad(shown, "the db is given twice: in the path and as ?db=")
    db = _db(shown, path[1] if len(path) > 1 else query.pop("db", "0"))
    sentinel_password = query.pop("sentinel_password", None)
    _refuse_rest(shown, query, OWN_OPTIONS + SENTINEL_OPTIONS, "a Sentinel URL")
    return RedisURL(
        **common,
        db=db,
        hosts=_hosts(shown, hostlist, 26379),
        service=service,
        password=unquote(creds.partition(":")[2]) if creds else None,
        sentinel_password=sentinel_password,
    )


def _parse_cluster(parts: SplitResult, query: dict[str, str], common: dict[str, Any]) -> RedisURL:
    """``redis+cluster://[:password@]host:port[,host:port...]`` (``rediss+cluster`` for TLS)."""
    shown = common["description"]
    if parts.path.strip("/"):
        raise _bad(shown, "a Redis Cluster has only db 0: give no path after the hosts")
    _refuse_rest(shown, query, OWN_OPTIONS, "a Redis Cluster URL")
    creds, _, hostlist = parts.netloc.rpartition("@")
    return RedisURL(
        **common,
        db=0,
        hosts=_hosts(shown, hostlist, 6379),
        password=unquote(creds.partition(":")[2]) if creds.partition(":")[2] else None,
    )


def _parse_plain(parts: SplitResult, query: dict[str, str], common: dict[str, Any]) -> RedisURL:
    """``redis://``, ``rediss://`` and ``unix://``: the query's other parameters are
    redis-py's."""
    shown = common["description"]
    if parts.scheme.lower() == "unix":
        if not parts.path:
            raise _bad(shown, "a unix:// URL needs the socket path: unix:///run/redis.sock")
        db_text = query.get("db", "0")
    else:
        try:
            parts.port  # noqa: B018  (read for its check: a port that is not a number)
        except ValueError as exc:
            raise _bad(shown, f"bad port: {exc}") from None
        if not parts.hostname:
            raise _bad(shown, "no host")
        db_path = parts.path.strip("/") if parts.path not in ("", "/") else ""
        if db_path and "db" in query:
            raise _bad(shown, "the db is given twice: in the path and as ?db=")
        db_text = query.get("db", db_path or "0")
    db = _db(shown, db_text)
    _check_redis_py_values(shown, query)
    plain = parts._replace(query=urlencode(query, quote_via=quote)).geturl()
    return RedisURL(**common, db=db, query=query, url=plain)


def _bad(shown: str, what: str) -> ConfigurationError:
    return ConfigurationError(f"invalid Redis URL {shown!r}: {what}")


def _any_name(name: str) -> bool:
    return True


def _hosts(shown: str, netloc: str, default_port: int) -> tuple[tuple[str, int], ...]:
    """``host:port[,host:port...]``, a missing port being ``default_port``."""
    hosts = []
    for item in netloc.split(","):
        item = item.strip()
        host, sep, port = item.rpartition(":")
        if not sep or item.endswith("]"):  # no port given (or a bare [IPv6] address)
            host, port = item, str(default_port)
        if not host:
            raise _bad(shown, f"invalid host:port {item!r} in Redis URL: no host")
        try:
            hosts.append((host.strip("[]"), int(port)))
        except ValueError:
            raise _bad(shown, f"invalid host:port {item!r} in Redis URL") from None
    if not hosts or not all(h for h, _ in hosts):
        raise _bad(shown, "a Redis URL must name at least one host")
    return tuple(hosts)


def _db(shown: str, text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise _bad(shown, f"db must be a number >= 0 (as in redis://host:6379/0), not {text!r}")
    return int(text)


def _refuse_rest(shown: str, query: dict[str, str], known: tuple[str, ...], where: str) -> None:
    if query:
        raise _bad(
            shown,
            f"unknown option(s) {', '.join(sorted(query))} for {where} (known: "
            f"{', '.join(known)}); pass redis-py options as keyword arguments to connect()",
        )


def _redis_py_takes(scheme: str, name: str) -> bool:
    return name in _redis_py_options(scheme)


@functools.cache
def _redis_py_options(scheme: str) -> frozenset[str]:
    """The query parameters redis-py takes on a ``scheme`` URL.

    redis-py passes unknown ones on to the connection class, which fails with a TypeError
    only when it first connects, inside a running task: they are refused here instead.
    """
    redis = import_redis()
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    connection_class = {
        "rediss": redis.SSLConnection,
        "unix": redis.UnixDomainSocketConnection,
    }.get(scheme, redis.Connection)
    known = set(URL_QUERY_ARGUMENT_PARSERS) - {"timeout"}  # timeout: BlockingConnectionPool's
    for klass in (*connection_class.__mro__, redis.ConnectionPool):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
                known.add(param.name)
    known -= {"self", "host", "port", "path", "username", "password", "connection_class"}
    return frozenset(known)


def _check_redis_py_values(shown: str, query: Mapping[str, str]) -> None:
    """Refuse a redis-py query parameter whose value redis-py cannot read."""
    if not query:
        return
    from redis.connection import URL_QUERY_ARGUMENT_PARSERS

    parsers: dict[str, Any] = URL_QUERY_ARGUMENT_PARSERS
    for name, value in query.items():
        parser = parsers.get(name)
        if parser is None:
            continue
        try:
            parser(value)
        except (TypeError, ValueError):
            raise _bad(shown, f"{name} has an invalid value {value!r}") from None


# -- clients (Sentinel, Cluster, plain) ---------------------------------------------------


def build_client(parsed: RedisURL, options: Mapping[str, Any]) -> Any:
    """Return the redis-py client of ``parsed``; ``options`` are redis-py's keyword arguments.

    Only a Cluster client connects while it is built (to learn the slot map): a failure is a
    BackendError; options redis-py refuses are a ConfigurationError.
    """
    redis = import_redis()
    timeout = parsed.socket_timeout
    kwargs: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": min(timeout, 5.0),
        "health_check_interval": 30,
        **options,
    }
    try:
        if parsed.scheme in _SENTINEL_SCHEMES:
            return _sentinel_client(parsed, kwargs)
        if parsed.scheme in _CLUSTER_SCHEMES:
            return _cluster_client(parsed, kwargs)
        return redis.Redis.from_url(parsed.url, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"invalid Redis URL {parsed.description!r}: {exc}") from exc
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        raise BackendError(f"could not connect to {parsed.description}: {exc}") from exc


def _sentinel_client(parsed: RedisURL, kwargs: dict[str, Any]) -> Any:
    from redis.sentinel import Sentinel

    sentinel_kwargs = {"socket_timeout": kwargs["socket_timeout"]}
    if parsed.sentinel_password:
        sentinel_kwargs["password"] = parsed.sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]  # untyped before redis-py 8.2
        parsed.hosts,
        sentinel_kwargs=sentinel_kwargs,
        ssl=parsed.scheme.startswith("rediss"),
        **kwargs,
    )
    return sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
        parsed.service, db=parsed.db, password=parsed.password
    )


def _cluster_client(parsed: RedisURL, kwargs: dict[str, Any]) -> Any:
    cluster = import_redis().cluster
    nodes = [cluster.ClusterNode(host, port) for host, port in parsed.hosts]
    if parsed.password:
        kwargs["password"] = parsed.password
    if parsed.scheme.startswith("rediss"):
        kwargs["ssl"] = True
    kwargs.pop("health_check_interval", None)
    return cluster.RedisCluster(startup_nodes=nodes, **kwargs)
