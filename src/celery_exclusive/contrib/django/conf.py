"""Settings and store of a Django project: the Django adapter of :class:`Settings`.

Read from ``django.conf.settings``, all optional but the store::

    CELERY_EXCLUSIVE_URL       a store URL (redis://..., postgresql://..., django-cache://alias)
    CELERY_EXCLUSIVE_CACHE     or a Django cache alias: short for django-cache://<alias>
    CELERY_EXCLUSIVE_DATABASE  or a DATABASES alias (PostgreSQL or SQLite): the SQL store on
                               that database, in the tables of migration 0002
    CELERY_EXCLUSIVE_PREFIX, _ENABLED, _QUEUE_TTL, _DEFAULTS, and one default per task option
    (CELERY_EXCLUSIVE_TTL, CELERY_EXCLUSIVE_ON_CONFLICT, ...): what the Celery app reads as
    exclusive_* through config_from_object("django.conf:settings", namespace="CELERY").

With none of URL, cache and database, the store is the Redis ``CELERY_RESULT_BACKEND`` or
``CELERY_BROKER_URL``, as the Celery app finds it; else there is none (``celery_exclusive.E002``).
The admin page and ``manage.py exclusive`` use the store built here, once per process.

``CELERY_EXCLUSIVE_DATABASE`` gives a ``postgresql://`` or ``sqlite:///`` URL built from that
alias's settings (``create_tables=false``: the migration made the tables), so the store opens
connections of its own to the same database rather than using Django's: it needs a connection
to ``LISTEN`` on, psycopg's pipeline mode for one-round-trip acquires, and above all commits
that do not wait for, or roll back with, the request's transaction.
"""

from __future__ import annotations

import importlib
import os
import re
import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import quote, urlencode

from ...backends.registry import redact
from ...config import Settings, celery_fallback_url
from ...exceptions import ConfigurationError
from ...store import Store, connect

__all__ = [
    "UnsupportedDatabase",
    "bridge_settings",
    "cache_alias",
    "database_alias",
    "database_url",
    "django_settings",
    "get_store",
    "reset",
    "setting",
    "store_url",
]

#: Database ENGINEs whose database can hold the leases, by the SQL store they get.
POSTGRES_ENGINES = frozenset(
    {
        "django.db.backends.postgresql",
        "django.db.backends.postgresql_psycopg2",
        "django.contrib.gis.db.backends.postgis",
    }
)
SQLITE_ENGINES = frozenset(
    {"django.db.backends.sqlite3", "django.contrib.gis.db.backends.spatialite"}
)
#: Engines known not to (not imported to find out).
OTHER_ENGINES = frozenset(
    {
        "django.db.backends.mysql",
        "django.db.backends.oracle",
        "django.db.backends.dummy",
        "django.contrib.gis.db.backends.mysql",
        "django.contrib.gis.db.backends.oracle",
    }
)

#: DATABASES OPTIONS that Django itself consumes: not libpq parameters.
DJANGO_ONLY_PG_OPTIONS = frozenset(
    {
        "isolation_level", "assume_role", "pool", "server_side_binding", "cursor_factory",
        "context", "prepare_threshold", "autocommit", "row_factory",
    }
)  # fmt: skip

_PLAIN_HOST = re.compile(r"^[A-Za-z0-9_.-]+$")

_lock = threading.Lock()
_store: tuple[int, Store] | None = None
#: Every CELERY_EXCLUSIVE_URL that bridge_settings() set (not the user): none is a second store.
_bridged: set[str] = set()
#: The DATABASES alias the bridged URL was built from, if any (re-built when its NAME changes).
_bridged_alias: str | None = None


class UnsupportedDatabase(ConfigurationError):
    """``CELERY_EXCLUSIVE_DATABASE`` names a database that cannot hold the leases."""


class _BridgedURL(str):
    """A URL built from ``DATABASES``: its repr hides the password, as Django hides PASSWORD
    (the debug page and ``diffsettings`` show settings by their repr)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact(str(self)))


def setting(name: str) -> Any:
    """The value of the Django setting ``name`` (upper-cased), None when it is not set."""
    from django.conf import settings

    return getattr(settings, name.upper(), None)


def django_settings() -> Settings:
    """Return the library's settings from ``CELERY_EXCLUSIVE_*`` Django settings."""
    return Settings.from_lookup(setting, prefix="CELERY_EXCLUSIVE_")


def cache_alias() -> str | None:
    """Return ``CELERY_EXCLUSIVE_CACHE`` (a cache alias), or None."""
    return _alias_setting("CELERY_EXCLUSIVE_CACHE", "a cache alias")


def database_alias() -> str | None:
    """Return ``CELERY_EXCLUSIVE_DATABASE`` (a ``DATABASES`` alias), or None."""
    return _alias_setting("CELERY_EXCLUSIVE_DATABASE", "a DATABASES alias")


def _alias_setting(name: str, what: str) -> str | None:
    alias = setting(name)
    if alias is None:
        return None
    if not isinstance(alias, str) or not alias:
        raise ConfigurationError(f"{name} must name {what} (a str), not {alias!r}")
    return alias


def store_url(settings: Settings | None = None) -> Any:
    """Return the store URL (or client) the settings name, or None when they name none.

    ``CELERY_EXCLUSIVE_URL``, else ``django-cache://<CELERY_EXCLUSIVE_CACHE>``, else the SQL
    store of ``CELERY_EXCLUSIVE_DATABASE``, else a Redis ``CELERY_RESULT_BACKEND`` or
    ``CELERY_BROKER_URL``. Two of the first three naming different stores is an error.
    """
    settings = settings or django_settings()
    alias = cache_alias()
    database = database_alias()
    if isinstance(settings.url, str) and settings.url in _bridged:
        # We set that URL from CELERY_EXCLUSIVE_CACHE/_DATABASE: it is not a second store.
        settings = replace(settings, url=None)
    if alias is not None and database is not None:
        raise ConfigurationError(
            f"CELERY_EXCLUSIVE_CACHE ({alias!r}) and CELERY_EXCLUSIVE_DATABASE ({database!r}) "
            "name two stores; set only one"
        )
    if alias is not None:
        from_cache = f"django-cache://{alias}"
        if settings.url is not None and settings.url != from_cache:
            raise ConfigurationError(
                f"CELERY_EXCLUSIVE_URL ({redact(settings.url)}) and CELERY_EXCLUSIVE_CACHE "
                f"({alias!r}) name two stores; set only one"
            )
        return from_cache
    if database is not None:
        if settings.url is not None:
            try:
                same = settings.url == database_url(database)
            except ConfigurationError:
                same = False
            if not same:
                raise ConfigurationError(
                    f"CELERY_EXCLUSIVE_URL ({redact(settings.url)}) and "
                    f"CELERY_EXCLUSIVE_DATABASE ({database!r}) name two stores; set only one"
                )
        return database_url(database)
    if settings.url is not None:
        return settings.url
    return celery_fallback_url(setting("CELERY_RESULT_BACKEND"), setting("CELERY_BROKER_URL"))


# -- CELERY_EXCLUSIVE_DATABASE -----------------------------------------------------------------


def database_url(alias: str) -> str:
    """Return the store URL of the ``DATABASES`` alias: ``postgresql://...`` or ``sqlite:///...``.

    Built from the settings Django connects with (after the test runner renamed the database,
    the test database), with ``create_tables=false``. Reads settings only; connects nothing.
    Raises :class:`UnsupportedDatabase` for an unknown alias, an engine other than PostgreSQL
    or SQLite, or an SQLite database that is not a file.
    """
    db = _database_settings(alias)
    engine = str(db.get("ENGINE") or "")
    vendor = _vendor(engine)
    if vendor == "postgresql":
        return _postgres_url(alias, db)
    if vendor == "sqlite":
        return _sqlite_url(alias, db)
    raise UnsupportedDatabase(
        f"DATABASES[{alias!r}] is {engine or 'no ENGINE'}"
        + (f" ({vendor})" if vendor and vendor not in engine else "")
        + ": the SQL lease store runs on PostgreSQL and SQLite only"
    )


def _database_settings(alias: str) -> Mapping[str, Any]:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connections

    # What Django connects with: the same dicts as settings.DATABASES, which the test runner
    # renames in place (and its parallel workers re-point at their clones).
    try:
        return connections.settings[alias]  # type: ignore[no-any-return]
    except KeyError:
        pass
    except ImproperlyConfigured as exc:
        raise UnsupportedDatabase(f"DATABASES is improperly configured: {exc}") from None
    databases = getattr(settings, "DATABASES", None) or {}
    if alias in databases:  # an alias added by override_settings
        return databases[alias]  # type: ignore[no-any-return]
    raise UnsupportedDatabase(
        f"{alias!r} is not a DATABASES alias (known: {', '.join(sorted(databases)) or 'none'})"
    )


def _vendor(engine: str) -> str:
    """``postgresql``, ``sqlite``, or another vendor name ("" when it cannot be told)."""
    if engine in POSTGRES_ENGINES:
        return "postgresql"
    if engine in SQLITE_ENGINES:
        return "sqlite"
    if engine in OTHER_ENGINES:
        return engine.rpartition(".")[2]
    # A third-party engine (a wrapper of a built-in one, usually): ask its class, which
    # imports its module (as Django would at first use) but connects nothing.
    try:
        wrapper = importlib.import_module(f"{engine}.base").DatabaseWrapper
        return str(wrapper.vendor)
    except Exception:
        return ""


def _postgres_url(alias: str, db: Mapping[str, Any]) -> str:
    options = dict(db.get("OPTIONS") or {})
    name = db.get("NAME")
    user, password = db.get("USER") or "", db.get("PASSWORD") or ""
    host, port = str(db.get("HOST") or ""), str(db.get("PORT") or "")
    if name == "" and not options.get("service"):
        raise UnsupportedDatabase(f"DATABASES[{alias!r}] has no NAME (nor OPTIONS['service'])")
    query: dict[str, str] = {}
    for key, value in options.items():
        if key in DJANGO_ONLY_PG_OPTIONS or not isinstance(value, (str, int, float)):
            continue
        query[str(key)] = str(value)
    netloc = ""
    if user:
        netloc = quote(str(user), safe="")
        if password:
            netloc += ":" + quote(str(password), safe="")
        netloc += "@"
    if host and _PLAIN_HOST.match(host) and (not port or port.isdigit()):
        netloc += host + (f":{port}" if port else "")
    else:  # a socket directory, several hosts, an IPv6 address: as libpq parameters
        if host:
            query["host"] = host
        if port:
            query["port"] = port
    # An empty authority ("postgresql:///db") does not survive urlsplit().geturl(), which
    # drops the "//"; an empty user info ("postgresql://@/db") means the same to libpq and does.
    netloc = netloc or "@"
    if name is None:  # as Django does: the 'postgres' database, whatever the service says
        query.pop("service", None)
    dbname = quote("postgres" if name is None else str(name), safe="")
    query["create_tables"] = "false"
    return f"postgresql://{netloc}/{dbname}?{urlencode(query, quote_via=quote)}"


def _sqlite_url(alias: str, db: Mapping[str, Any]) -> str:
    raw = db.get("NAME")
    name = os.fspath(raw) if isinstance(raw, (str, os.PathLike)) else ""
    if not name:
        raise UnsupportedDatabase(f"DATABASES[{alias!r}] has no NAME (an SQLite file path)")
    if name == ":memory:" or name.startswith("file:") or "mode=memory" in name:
        raise UnsupportedDatabase(
            f"DATABASES[{alias!r}] is the SQLite database {name!r}, not a file path: an "
            "in-memory database is private to one connection (in tests, set "
            f"DATABASES[{alias!r}]['TEST']['NAME'] to a file)"
        )
    query: dict[str, str] = {"create_tables": "false"}
    timeout = (db.get("OPTIONS") or {}).get("timeout")
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0:
        query["busy_timeout"] = str(timeout)
    path = quote(os.path.abspath(name))
    return f"sqlite:///{path}?{urlencode(query)}"


# -- the store -----------------------------------------------------------------------------


def get_store() -> Store:
    """Return this process's store (built at first use; no connection before an operation)."""
    global _store
    pid = os.getpid()
    with _lock:
        if _store is not None and _store[0] == pid:
            return _store[1]
    settings = django_settings()
    url = store_url(settings)
    if url is None:
        raise ConfigurationError(
            "celery-exclusive has no store: set CELERY_EXCLUSIVE_URL (redis://...), "
            "CELERY_EXCLUSIVE_CACHE (a Redis, database or Memcached cache alias) or "
            "CELERY_EXCLUSIVE_DATABASE (a PostgreSQL or SQLite DATABASES alias) in your "
            "Django settings"
        )
    store = connect(url, **settings.store_options(url))
    with _lock:
        if _store is not None and _store[0] == pid:  # another thread was faster
            store.close()
            return _store[1]
        _store = (pid, store)
    return store


def reset(**_: Any) -> None:
    """Forget the store (after a settings change, e.g. ``override_settings`` in tests)."""
    global _store
    with _lock:
        old, _store = _store, None
    if old is not None and old[0] == os.getpid():
        old[1].close()


# -- the URL the Celery app reads ------------------------------------------------------------


def bridge_settings() -> None:
    """Set ``CELERY_EXCLUSIVE_URL`` from ``CELERY_EXCLUSIVE_CACHE`` or ``_DATABASE``.

    The Celery app reads ``CELERY_EXCLUSIVE_URL`` (as ``exclusive_url``) and knows nothing of
    Django caches or databases; this makes it use the same store as the admin and the
    management command. Called from ``AppConfig.ready()``, before any task runs, and again
    when Django opens a connection to the bridged database alias (:func:`database_changed`),
    so that the URL follows the test runner to the test database. A URL the user set is
    never touched; nothing is set when the settings are invalid (the checks say why).
    """
    global _bridged_alias
    from django.conf import settings

    with _lock:
        current = setting("CELERY_EXCLUSIVE_URL")
        if current is not None and not (isinstance(current, str) and current in _bridged):
            return  # the user's own URL
        try:
            alias, database = cache_alias(), database_alias()
        except ConfigurationError:
            return
        url: str | None = None
        if alias is not None and database is None:
            url = f"django-cache://{alias}"
        elif database is not None and alias is None:
            try:
                url = _BridgedURL(database_url(database))
            except ConfigurationError:
                url = None  # reported by the check (E005), raised by get_store()
        _bridged_alias = database if alias is None else None
        if url == current:
            return
        if url is not None:
            _bridged.add(url)
        settings.CELERY_EXCLUSIVE_URL = url
    reset()  # the store built before, if any, was of the old URL


def database_changed(sender: Any = None, connection: Any = None, **_: Any) -> None:
    """``connection_created`` receiver: re-bridge when the bridged alias may have moved.

    The test runner renames a database (``test_<NAME>``, or a parallel worker's clone) after
    ``ready()``: the next connection to it has the new name.
    """
    if _bridged_alias is not None and getattr(connection, "alias", None) == _bridged_alias:
        bridge_settings()
