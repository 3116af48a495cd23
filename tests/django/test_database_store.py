"""``CELERY_EXCLUSIVE_DATABASE``: the SQL store on the project's own database, tables by migration.

Each store test runs on two databases added to the running Django as aliases: a fresh SQLite
file, and a schema of its own in this session's PostgreSQL (``tests/pg.py``), reached through
``OPTIONS["options"] = "-csearch_path=..."`` as a project would. Both are migrated with
``migrate`` (all apps), so the lease tables are the migration's; the stores run with
``create_tables=false``. The lease contract (tests/contract/) runs on both as well.
"""

from __future__ import annotations

import io
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from django.conf import settings
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.db import connections, transaction
from django.db.backends.signals import connection_created
from django.test import override_settings

from celery_exclusive import BackendError, ConfigurationError, Store, connect
from celery_exclusive.backends.sql import PostgresBackend, SQLiteBackend
from celery_exclusive.contrib.django import conf
from celery_exclusive.contrib.django.checks import check_store
from celery_exclusive.contrib.django.conf import database_url, get_store, store_url

from ..contract import test_lease_contract as contract
from ..pg import django_database
from .aliases import add_alias, remove_alias

# The contract's tests, collected again here with this module's ``store`` fixture.
globals().update({name: f for name, f in vars(contract).items() if name.startswith("test_")})

TABLES = ("celery_exclusive_lease", "celery_exclusive_lease_fence")

#: Settings that make CELERY_EXCLUSIVE_DATABASE the store (the test settings name a cache).
NO_CACHE: dict[str, Any] = {"CELERY_EXCLUSIVE_CACHE": None}


class Boom(Exception):
    """Raised inside a transaction to roll it back."""


@dataclass
class Database:
    """One database added to Django under ``alias``, migrated."""

    alias: str
    vendor: str
    raw: Callable[[], Any]  # a new DB-API connection of its own, autocommit
    close_raw: Callable[[], None]

    def stored_tokens(self, key: str) -> list[str]:
        """The tokens of ``key``'s lease rows, read on a fresh connection of its own."""
        marker = "?" if self.vendor == "sqlite" else "%s"
        conn = self.raw()
        try:
            cur = conn.cursor()
            cur.execute(f"SELECT token FROM celery_exclusive_lease WHERE key = {marker}", (key,))
            return sorted(str(row[0]) for row in cur.fetchall())
        finally:
            conn.close()


def _sqlite(tmp: Path) -> Database:
    path = tmp / "project.sqlite3"
    add_alias("leases_sqlite", {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)})
    return Database(
        "leases_sqlite",
        "sqlite",
        lambda: sqlite3.connect(path, isolation_level=None),
        lambda: None,
    )


def _postgres(url: str) -> Database:
    import psycopg

    parts = urlsplit(url)
    # libpq parameters (str), passed as psycopg.connect's **kwargs: Any, as mypy cannot tell
    # them apart from connect's own keyword arguments
    libpq: dict[str, Any] = {k: v for k, v in parse_qsl(parts.query) if k != "table"}
    server = parts._replace(query="").geturl()
    schema = f"cex_django_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True, **libpq) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"')
    options = {**libpq, "options": f"-csearch_path={schema}"}
    add_alias("leases_pg", django_database(url, options))

    def drop() -> None:
        with psycopg.connect(server, autocommit=True, **libpq) as admin:
            admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    return Database(
        "leases_pg",
        "postgresql",
        lambda: psycopg.connect(server, autocommit=True, **options),
        drop,
    )


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    if request.param == "sqlite":
        db = _sqlite(tmp_path_factory.mktemp("db"))
    else:
        db = _postgres(request.getfixturevalue("postgres_url"))
    try:
        call_command("migrate", database=db.alias, verbosity=0, interactive=False)
        yield db
    finally:
        remove_alias(db.alias)
        db.close_raw()


@pytest.fixture
def store(database: Database, prefix: str) -> Iterator[Store]:
    """The store of ``CELERY_EXCLUSIVE_DATABASE``, as the admin and the command get it."""
    with override_settings(
        **NO_CACHE, CELERY_EXCLUSIVE_DATABASE=database.alias, CELERY_EXCLUSIVE_PREFIX=prefix
    ):
        s = get_store()
        yield s
        for info in list(s.leases()):
            s.force_release(info.key)


def ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return [m.id or "" for m in check_store()]


# -- the migration ---------------------------------------------------------------------------


def _columns(database: Database, table: str) -> list[tuple[Any, ...]]:
    conn = database.raw()
    try:
        cur = conn.cursor()
        if database.vendor == "sqlite":
            cur.execute(f'PRAGMA table_info("{table}")')
            return [tuple(row[1:]) for row in cur.fetchall()]  # name, type, notnull, dflt, pk
        schema, _, name = table.rpartition(".")
        cur.execute(
            "SELECT c.column_name, c.data_type, c.is_nullable, c.column_default, "
            "  k.ordinal_position "
            "FROM information_schema.columns c "
            "LEFT JOIN information_schema.key_column_usage k "
            "  ON k.table_schema = c.table_schema AND k.table_name = c.table_name "
            "  AND k.column_name = c.column_name "
            "WHERE c.table_name = %s AND c.table_schema = coalesce(nullif(%s, ''), "
            "  current_schema()) "
            "ORDER BY c.ordinal_position",
            (name, schema),
        )
        return [tuple(row) for row in cur.fetchall()]
    finally:
        conn.close()


def test_migrate_creates_the_tables_the_store_would_create(
    database: Database, tmp_path: Path
) -> None:
    assert set(TABLES) <= set(connections[database.alias].introspection.table_names())
    # The store's own create_tables, elsewhere, gives the same columns, keys and defaults.
    if database.vendor == "sqlite":
        own = connect(f"sqlite:///{tmp_path / 'own.db'}")
        own.lease("x").acquire()
        own.close()
        reference = Database(
            "own", "sqlite", lambda: sqlite3.connect(tmp_path / "own.db"), lambda: None
        )
        tables = {t: t for t in TABLES}
    else:
        schema = f"cex_own_{uuid.uuid4().hex[:8]}"
        conn = database.raw()
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.close()
        own = connect(
            database_url(database.alias),
            table=f"{schema}.celery_exclusive_lease",
            create_tables=True,
        )
        own.lease("x").acquire()
        own.close()
        reference = database
        tables = {t: f"{schema}.{t}" for t in TABLES}
    try:
        for table in TABLES:
            assert _columns(database, table) == _columns(reference, tables[table])
    finally:
        if database.vendor == "postgresql":
            conn = database.raw()
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
            conn.close()


def test_sqlmigrate_shows_the_ddl() -> None:
    out = io.StringIO()
    call_command("sqlmigrate", "celery_exclusive", "0002", stdout=out)
    text = out.getvalue()
    assert 'CREATE TABLE IF NOT EXISTS "celery_exclusive_lease" (' in text
    assert 'CREATE TABLE IF NOT EXISTS "celery_exclusive_lease_fence" (' in text
    assert "WITHOUT ROWID" in text  # the default database is SQLite


def test_unapplying_drops_the_tables_and_applying_makes_them_again(database: Database) -> None:
    def tables() -> set[str]:
        return set(TABLES) & set(connections[database.alias].introspection.table_names())

    call_command("migrate", "celery_exclusive", "0001", database=database.alias, verbosity=0)
    assert tables() == set()
    call_command("migrate", "celery_exclusive", database=database.alias, verbosity=0)
    assert tables() == set(TABLES)


# -- the store ------------------------------------------------------------------------------


def test_the_store_works_on_the_migrated_tables(database: Database, store: Store) -> None:
    backend = store.backend
    assert isinstance(backend, (PostgresBackend, SQLiteBackend))
    assert backend.create_tables is False  # the tables are the migration's
    first = store.lease("job", meta={"task_id": "t-1"})
    assert first.acquire()
    second = store.lease("job")
    assert not second.acquire()
    assert second.holder is not None and second.holder.meta["task_id"] == "t-1"
    assert first.release()
    assert second.acquire()
    assert first.fence is not None and second.fence is not None
    assert second.fence > first.fence
    second.release()


def test_a_grant_inside_a_transaction_is_committed_at_once(
    database: Database, store: Store, prefix: str
) -> None:
    lease = store.lease("job", auto_renew=False)
    with transaction.atomic(using=database.alias):
        if database.vendor == "postgresql":  # SQLite: see the next test
            Group.objects.using(database.alias).create(name=f"g-{uuid.uuid4().hex}")
        assert lease.acquire()
        # Another connection (another process would be no different) sees the grant now,
        # while the request's transaction is still open.
        assert database.stored_tokens(f"{prefix}:job") == [lease.token]
        other = connect(database_url(database.alias), prefix=prefix)  # as another process
        try:
            assert not other.lease("job").acquire()
        finally:
            other.close()
    lease.release()


def test_a_lease_outlives_the_rollback_of_the_requests_transaction(
    database: Database, store: Store, prefix: str
) -> None:
    name = f"g-{uuid.uuid4().hex}"
    lease = store.lease("job", auto_renew=False)
    with pytest.raises(Boom), transaction.atomic(using=database.alias):
        if database.vendor == "postgresql":
            Group.objects.using(database.alias).create(name=name)
            assert lease.acquire()
        else:  # SQLite has one writer: take the lease before the transaction writes
            assert lease.acquire()
            Group.objects.using(database.alias).create(name=name)
        raise Boom
    assert not Group.objects.using(database.alias).filter(name=name).exists()  # rolled back
    assert [h.token for h in store.holders("job")] == [lease.token]  # still held
    assert database.stored_tokens(f"{prefix}:job") == [lease.token]
    assert lease.release()


def test_on_sqlite_an_acquire_after_the_transaction_wrote_waits_for_its_write_lock(
    tmp_path: Path, prefix: str
) -> None:
    # One writer per SQLite file: the acquire waits for the request's transaction (here, the
    # same thread: until its busy timeout, OPTIONS["timeout"]) and then fails, granting nothing.
    path = tmp_path / "one-writer.sqlite3"
    alias = "leases_sqlite_timeout"
    add_alias(
        alias,
        {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path), "OPTIONS": {"timeout": 0.2}},
    )
    try:
        call_command("migrate", database=alias, verbosity=0)
        s = connect(database_url(alias), prefix=prefix)
        assert s.lease("warm-up").acquire()
        with transaction.atomic(using=alias):
            Group.objects.using(alias).create(name="writer")
            with pytest.raises(BackendError, match="locked"):
                s.lease("job").acquire()
        assert s.lease("job").acquire()  # once it committed
        s.close()
    finally:
        remove_alias(alias)


# -- settings, URL and checks (nothing connects) ------------------------------------------------

FAKE_PG = {
    "ENGINE": "django.db.backends.postgresql",
    "NAME": "app",
    "USER": "web user",
    "PASSWORD": "p@ss:w/rd",
    "HOST": "db.example.com",
    "PORT": "5433",
    "OPTIONS": {
        "sslmode": "require",
        "connect_timeout": 3,
        "isolation_level": 3,
        "pool": {"min_size": 2},
        "server_side_binding": True,
    },
}


def _pg_params(db: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setitem(settings.DATABASES, "fake", db)
    url = database_url("fake")
    assert "create_tables=false" in url
    backend = PostgresBackend.from_url(url)
    assert backend.create_tables is False
    return dict(backend._params)


def test_a_postgresql_alias_gives_its_connection_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _pg_params(FAKE_PG, monkeypatch)
    assert params["dbname"] == "app"
    assert params["user"] == "web user" and params["password"] == "p@ss:w/rd"
    assert params["host"] == "db.example.com" and params["port"] == "5433"
    assert params["sslmode"] == "require" and params["connect_timeout"] == "3"
    for django_only in ("isolation_level", "pool", "server_side_binding"):
        assert django_only not in params
    assert "p@ss" not in repr(connect(database_url("fake")))


def test_libpq_options_with_spaces_reach_the_server(
    monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    db = django_database(postgres_url, {"options": "-c statement_timeout=54321"})
    monkeypatch.setitem(settings.DATABASES, "spaces", db)
    backend = PostgresBackend.from_url(database_url("spaces"))
    try:
        row = backend._run("probe", lambda conn: conn.execute("SHOW statement_timeout").fetchone())
        assert row == ("54321ms",)
    finally:
        backend.close()


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"HOST": "/var/run/postgresql", "PORT": ""}, {"host": "/var/run/postgresql"}),
        ({"HOST": "::1"}, {"host": "::1", "port": "5433"}),
        ({"HOST": "a.example,b.example", "PORT": "5432,5433"}, {"host": "a.example,b.example"}),
        ({"NAME": None}, {"dbname": "postgres"}),
        ({"NAME": "", "OPTIONS": {"service": "app"}}, {"service": "app"}),
        ({"HOST": "", "PORT": "", "USER": "", "PASSWORD": ""}, {"dbname": "app"}),
    ],
)
def test_postgresql_hosts_and_names(
    changes: dict[str, Any], expected: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _pg_params({**FAKE_PG, **changes}, monkeypatch)
    assert expected.items() <= params.items()


def test_a_sqlite_alias_gives_its_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "my project" / "db?.sqlite3"
    db = {"ENGINE": "django.db.backends.sqlite3", "NAME": path, "OPTIONS": {"timeout": 2}}
    monkeypatch.setitem(settings.DATABASES, "fake", db)
    backend = SQLiteBackend.from_url(database_url("fake"))
    assert backend.path == str(path)
    assert backend.create_tables is False and backend.busy_timeout == 2.0


@pytest.mark.parametrize(
    ("db", "words"),
    [
        ({"ENGINE": "django.db.backends.mysql", "NAME": "app"}, "PostgreSQL and SQLite only"),
        ({"ENGINE": "django.db.backends.oracle", "NAME": "app"}, "PostgreSQL and SQLite only"),
        ({"ENGINE": "no.such.engine", "NAME": "app"}, "PostgreSQL and SQLite only"),
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}, "in-memory"),
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": "file:x?mode=memory"}, "in-memory"),
        ({"ENGINE": "django.db.backends.sqlite3", "NAME": ""}, "no NAME"),
        ({"ENGINE": "django.db.backends.postgresql", "NAME": ""}, "no NAME"),
    ],
)
def test_a_database_that_cannot_hold_leases_is_E005_and_refused_at_use(
    db: dict[str, Any], words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(settings.DATABASES, "other", db)
    assert ids(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="other") == ["celery_exclusive.E005"]
    with (
        override_settings(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="other"),
        pytest.raises(ConfigurationError, match=words),
    ):
        get_store()
    # Disabled (test settings): nothing to check.
    assert ids(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="other", CELERY_EXCLUSIVE_ENABLED=False) == []


def test_an_unknown_alias_is_E005() -> None:
    assert ids(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="nope") == ["celery_exclusive.E005"]
    with pytest.raises(ConfigurationError, match="not a DATABASES alias"):
        database_url("nope")


def test_manage_py_check_says_why_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.core.management.base import SystemCheckError

    monkeypatch.setitem(
        settings.DATABASES, "other", {"ENGINE": "django.db.backends.mysql", "NAME": "app"}
    )
    with (
        override_settings(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="other"),
        pytest.raises(SystemCheckError) as info,
    ):
        call_command("check")
    text = str(info.value)
    assert "celery_exclusive.E005" in text and "django.db.backends.mysql" in text
    assert "HINT:" in text and "CELERY_EXCLUSIVE_URL" in text


def test_postgresql_without_psycopg_3_is_E005(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a)
    )
    monkeypatch.setitem(settings.DATABASES, "fake", FAKE_PG)
    with override_settings(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="fake"):
        [message] = check_store()
    assert message.id == "celery_exclusive.E005" and "psycopg 3" in message.msg


def test_a_migrated_database_passes_the_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(settings.DATABASES, "fake", FAKE_PG)
    assert ids(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="fake") == []
    assert ids(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="default") == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"CELERY_EXCLUSIVE_DATABASE": "default"},  # and CELERY_EXCLUSIVE_CACHE = "db"
        {**NO_CACHE, "CELERY_EXCLUSIVE_DATABASE": "default", "CELERY_EXCLUSIVE_URL": "memory://"},
        {**NO_CACHE, "CELERY_EXCLUSIVE_DATABASE": "other", "CELERY_EXCLUSIVE_URL": "memory://"},
        {**NO_CACHE, "CELERY_EXCLUSIVE_DATABASE": 1},
        {**NO_CACHE, "CELERY_EXCLUSIVE_DATABASE": ""},
    ],
)
def test_two_stores_or_a_bad_value_is_E004(overrides: dict[str, Any]) -> None:
    assert ids(**overrides) == ["celery_exclusive.E004"]
    with override_settings(**overrides), pytest.raises(ConfigurationError):
        get_store()


def test_the_url_of_that_database_is_the_same_store() -> None:
    url = database_url("default")
    assert ids(**NO_CACHE, CELERY_EXCLUSIVE_DATABASE="default", CELERY_EXCLUSIVE_URL=url) == []


# -- the URL the Celery app reads ----------------------------------------------------------------


def test_the_celery_app_gets_the_url_and_follows_the_test_database(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery import Celery

    monkeypatch.setattr(conf, "_bridged", set())
    monkeypatch.setattr(conf, "_bridged_alias", None)
    db = {**FAKE_PG, "OPTIONS": {}}
    monkeypatch.setitem(settings.DATABASES, "fake", db)
    app = Celery("bridge-test", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    with override_settings(**NO_CACHE, CELERY_EXCLUSIVE_URL=None, CELERY_EXCLUSIVE_DATABASE="fake"):
        conf.bridge_settings()  # as AppConfig.ready() does
        assert app.conf.exclusive_url == database_url("fake")
        assert "p@ss" not in repr(settings.CELERY_EXCLUSIVE_URL)  # debug page, diffsettings
        assert store_url() == database_url("fake")  # ours, not a second store
        assert check_store() == []
        # The test runner renames the database, then connects to it.
        monkeypatch.setitem(db, "NAME", "test_app")
        connection_created.send(sender=None, connection=SimpleNamespace(alias="other"))
        assert "/app?" in app.conf.exclusive_url
        connection_created.send(sender=None, connection=SimpleNamespace(alias="fake"))
        assert "/test_app?" in app.conf.exclusive_url
        assert check_store() == []
        # A URL of the user's own is never replaced.
        settings.CELERY_EXCLUSIVE_URL = "redis://127.0.0.1:1/0"
        conf.bridge_settings()
        assert settings.CELERY_EXCLUSIVE_URL == "redis://127.0.0.1:1/0"
