"""Fences in Django (``celery_exclusive.contrib.django.fencing``) on SQLite and PostgreSQL.

Each test runs on two databases added to the running Django as aliases: a SQLite file of this
module's own and this session's PostgreSQL (``postgres_url``). The test models live in an app
label of their own that is not installed (no migrations to check); their tables, with random
names, are created by the schema editor and dropped when the module ends. The fence table is
created by :func:`fence_table_operation`, as a project's migration would.
"""

from __future__ import annotations

import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth.models import Group
from django.db import connections, models, transaction
from django.db.migrations.state import ProjectState

from celery_exclusive import ConfigurationError, LeaseLost, StaleFence
from celery_exclusive.contrib.django.fencing import (
    FencedQuerySet,
    FenceField,
    accept_fence,
    create_fence_table,
    fence_table_operation,
    fenced_update,
)

from ..pg import django_database
from .aliases import add_alias, remove_alias

pytestmark = pytest.mark.timeout(120)

SUFFIX = uuid.uuid4().hex[:10]
FENCE_TABLE = f"cex_fence_{SUFFIX}"


class Account(models.Model):
    """A row that carries the fence of its last writer."""

    owner: models.CharField[str, str] = models.CharField(max_length=40, default="nobody")
    fence = FenceField()

    objects = FencedQuerySet["Account"].as_manager()

    class Meta:
        app_label = "cex_fencing_tests"
        db_table = f"cex_fence_account_{SUFFIX}"


class Log(models.Model):
    """The accepted writes, in commit order (written in the fenced transaction)."""

    fence: models.BigIntegerField[int, int] = models.BigIntegerField()

    class Meta:
        app_label = "cex_fencing_tests"
        db_table = f"cex_fence_log_{SUFFIX}"


@dataclass
class Database:
    alias: str
    vendor: str


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def database(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Database]:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("fencing") / "fencing.sqlite3"
        # A writer waits up to 30 s for another one's lock (SQLite serialises writers).
        config: dict[str, Any] = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(path)}
        config["OPTIONS"] = {"timeout": 30}
        db = Database("fencing_sqlite", "sqlite")
    else:
        from urllib.parse import parse_qsl, urlsplit

        url = str(request.getfixturevalue("postgres_url"))
        libpq = {k: v for k, v in parse_qsl(urlsplit(url).query) if k != "table"}
        config = django_database(url, libpq)
        db = Database("fencing_pg", "postgresql")
    add_alias(db.alias, config)
    connection = connections[db.alias]
    operation = fence_table_operation(FENCE_TABLE)
    try:
        with connection.schema_editor() as editor:
            editor.create_model(Account)
            editor.create_model(Log)
            state = ProjectState()
            operation.database_forwards("cex_fencing_tests", editor, state, state)
        yield db
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(Account)
            editor.delete_model(Log)
            operation.database_backwards("cex_fencing_tests", editor, state, state)
        remove_alias(db.alias)


@pytest.fixture
def account(database: Database) -> Iterator[Account]:
    """Account 1, new (fence 0); the tables are emptied after the test."""
    row = Account.objects.using(database.alias).create(pk=1)
    try:
        yield row
    finally:
        Account.objects.using(database.alias).all().delete()
        Log.objects.using(database.alias).all().delete()
        with connections[database.alias].cursor() as cursor:
            cursor.execute(f'DELETE FROM "{FENCE_TABLE}"')


def _row(database: Database, pk: int = 1) -> tuple[str, int]:
    row = Account.objects.using(database.alias).get(pk=pk)
    return row.owner, row.fence


def _fence_of(database: Database, resource: str) -> int | None:
    with connections[database.alias].cursor() as cursor:
        cursor.execute(f'SELECT fence FROM "{FENCE_TABLE}" WHERE resource = %s', [resource])
        row = cursor.fetchone()
    return None if row is None else int(row[0])


# -- FenceField and fenced_update ---------------------------------------------------------------


def test_a_fence_field_starts_at_0_and_keeps_its_default_out_of_migrations() -> None:
    assert Account().fence == 0
    field = Account._meta.get_field("fence")
    assert isinstance(field, models.BigIntegerField)
    _, _, _, kwargs = field.deconstruct()
    assert "default" not in kwargs
    _, _, _, kwargs = FenceField(default=5).deconstruct()
    assert kwargs["default"] == 5


def test_the_first_write_the_same_fence_again_and_a_higher_one_are_accepted(
    database: Database, account: Account
) -> None:
    accounts = Account.objects.using(database.alias).filter(pk=1)
    for fence, owner in ((5, "A"), (5, "A again"), (6, "B")):
        assert accounts.fenced_update(fence, owner=owner) == 1
        assert _row(database) == (owner, fence)


def test_a_lower_fence_is_refused_and_the_row_kept(database: Database, account: Account) -> None:
    accounts = Account.objects.using(database.alias).filter(pk=1)
    assert fenced_update(accounts, 8, owner="B") == 1
    with pytest.raises(StaleFence) as caught:
        fenced_update(accounts, 7, owner="A")
    assert (caught.value.fence, caught.value.current) == (7, 8)
    assert caught.value.resource == "cex_fencing_tests.Account"
    assert isinstance(caught.value, LeaseLost)
    assert _row(database) == ("B", 8)


def test_a_missing_row_updates_nothing_and_is_not_an_error(
    database: Database, account: Account
) -> None:
    assert Account.objects.using(database.alias).filter(pk=99).fenced_update(3, owner="A") == 0


def test_several_rows_are_all_updated_or_none(database: Database, account: Account) -> None:
    accounts = Account.objects.using(database.alias)
    accounts.create(pk=2, owner="high", fence=9)
    # Given row 1 at fence 0 and row 2 at fence 9: fence 5 may not write row 2, so neither
    with pytest.raises(StaleFence) as caught:
        accounts.all().fenced_update(5, owner="A")
    assert caught.value.current == 9
    assert (_row(database, 1), _row(database, 2)) == (("nobody", 0), ("high", 9))
    assert accounts.all().fenced_update(9, owner="C") == 2
    assert (_row(database, 1), _row(database, 2)) == (("C", 9), ("C", 9))


def test_a_refusal_inside_an_atomic_block_rolls_back_the_other_writes(
    database: Database, account: Account
) -> None:
    accounts = Account.objects.using(database.alias)
    accounts.filter(pk=1).fenced_update(8, owner="B")
    with pytest.raises(StaleFence), transaction.atomic(using=database.alias):
        Log.objects.using(database.alias).create(fence=7)
        accounts.filter(pk=1).fenced_update(7, owner="A")
    assert not Log.objects.using(database.alias).exists()


@pytest.mark.parametrize(
    ("fence", "message"),
    [(None, "fence is None"), (-1, "from 0"), ("7", "must be an int"), (True, "must be an int")],
)
def test_a_bad_fence_is_refused(
    database: Database, account: Account, fence: Any, message: str
) -> None:
    accounts = Account.objects.using(database.alias).filter(pk=1)
    with pytest.raises(ConfigurationError, match=message):
        fenced_update(accounts, fence, owner="A")
    with pytest.raises(ConfigurationError, match=message), transaction.atomic(database.alias):
        accept_fence("r", fence, using=database.alias, table=FENCE_TABLE)
    assert _row(database) == ("nobody", 0)


def test_the_fence_is_not_a_value_to_set(database: Database, account: Account) -> None:
    with pytest.raises(ConfigurationError, match="'fence' is set to the fence"):
        Account.objects.using(database.alias).filter(pk=1).fenced_update(3, fence=4)


def test_a_model_without_a_fence_field_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="exactly one FenceField on Group, found 0"):
        fenced_update(Group.objects.all(), 1, name="x")


# -- the fence table ----------------------------------------------------------------------------


def test_the_fence_table_accepts_a_new_resource_the_same_fence_and_a_higher_one(
    database: Database, account: Account
) -> None:
    for fence in (4, 4, 5):
        with transaction.atomic(using=database.alias):
            accept_fence("sync:42", fence, using=database.alias, table=FENCE_TABLE)
        assert _fence_of(database, "sync:42") == fence


def test_the_fence_table_refuses_a_lower_fence_and_rolls_back_the_write(
    database: Database, account: Account
) -> None:
    accounts = Account.objects.using(database.alias).filter(pk=1)
    with transaction.atomic(using=database.alias):
        accept_fence("account:1", 8, using=database.alias, table=FENCE_TABLE)
        accounts.update(owner="B")
    with pytest.raises(StaleFence) as caught, transaction.atomic(using=database.alias):
        accept_fence("account:1", 7, using=database.alias, table=FENCE_TABLE)
        accounts.update(owner="A")
    assert (caught.value.resource, caught.value.fence, caught.value.current) == (
        "account:1",
        7,
        8,
    )
    assert _row(database) == ("B", 0)
    assert _fence_of(database, "account:1") == 8


def test_the_fence_table_is_refused_outside_a_transaction(
    database: Database, account: Account
) -> None:
    with pytest.raises(ConfigurationError, match=r"transaction\.atomic"):
        accept_fence("r", 1, using=database.alias, table=FENCE_TABLE)
    assert _fence_of(database, "r") is None


def test_create_fence_table_makes_a_table_once(database: Database) -> None:
    table = f"cex_fence_own_{uuid.uuid4().hex[:8]}"
    try:
        create_fence_table(using=database.alias, table=table)
        create_fence_table(using=database.alias, table=table)  # exists: nothing happens
        with transaction.atomic(using=database.alias):
            accept_fence("r", 1, using=database.alias, table=table)
        with pytest.raises(StaleFence), transaction.atomic(using=database.alias):
            accept_fence("r", 0, using=database.alias, table=table)
    finally:
        with connections[database.alias].cursor() as cursor:
            cursor.execute(f'DROP TABLE IF EXISTS "{table}"')


# -- two writers at once (PostgreSQL) ----------------------------------------------------------


def _waiting_for_a_lock(database: Database, pid: int) -> bool:
    with connections[database.alias].cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("pattern", ["row", "table"])
def test_a_lower_fence_waiting_on_a_higher_ones_transaction_is_refused_after_its_commit(
    database: Database, account: Account, pattern: str
) -> None:
    if database.vendor != "postgresql":
        pytest.skip("not for this run: SQLite serialises writers; no row locks to wait on")
    alias = database.alias

    def write(fence: int, owner: str) -> None:
        if pattern == "row":
            Account.objects.using(alias).filter(pk=1).fenced_update(fence, owner=owner)
        else:
            accept_fence("account:1", fence, using=alias, table=FENCE_TABLE)
            Account.objects.using(alias).filter(pk=1).update(owner=owner)

    outcome: queue.Queue[object] = queue.Queue()
    pids: queue.Queue[int] = queue.Queue()
    release_first = threading.Event()

    def first() -> None:  # fence 8: writes, then keeps its transaction open until told
        try:
            with transaction.atomic(using=alias):
                write(8, "B")
                pids.put(-1)
                release_first.wait(30)
        finally:
            connections[alias].close()

    def second() -> None:  # fence 7: starts while 8 is uncommitted
        try:
            with connections[alias].cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.put(int(cursor.fetchone()[0]))
            with transaction.atomic(using=alias):
                write(7, "A")
            outcome.put("accepted")
        except BaseException as exc:
            outcome.put(exc)
        finally:
            connections[alias].close()

    t1 = threading.Thread(target=first, daemon=True)
    t1.start()
    assert pids.get(timeout=20) == -1  # 8 has written
    t2 = threading.Thread(target=second, daemon=True)
    t2.start()
    pid = pids.get(timeout=20)
    deadline = time.monotonic() + 20
    while not _waiting_for_a_lock(database, pid):
        assert time.monotonic() < deadline, "fence 7 never waited for fence 8's lock"
        assert outcome.empty(), f"fence 7 did not wait: {outcome.get()}"
        time.sleep(0.02)
    release_first.set()
    t1.join(20)
    t2.join(20)
    result = outcome.get_nowait()
    assert isinstance(result, StaleFence) and result.current == 8, result
    assert _row(database)[0] == "B"


# -- many writers at once -----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["row", "table"])
def test_concurrent_writers_commit_in_fence_order(
    database: Database, account: Account, pattern: str
) -> None:
    alias = database.alias
    rng = random.Random()
    fences = [n // 2 + 1 for n in range(300)]
    for i in range(len(fences)):
        j = min(len(fences) - 1, i + rng.randrange(0, 6))
        fences[i], fences[j] = fences[j], fences[i]
    work: queue.Queue[int] = queue.Queue()
    for f in fences:
        work.put(f)
    accepted: list[int] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def writer() -> None:
        try:
            for _ in range(len(fences)):
                try:
                    fence = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    with transaction.atomic(using=alias):
                        if pattern == "row":
                            Account.objects.using(alias).filter(pk=1).fenced_update(
                                fence, owner=f"w{fence}"
                            )
                        else:
                            accept_fence("account:1", fence, using=alias, table=FENCE_TABLE)
                            Account.objects.using(alias).filter(pk=1).update(owner=f"w{fence}")
                        Log.objects.using(alias).create(fence=fence)
                except StaleFence:
                    continue
                with guard:
                    accepted.append(fence)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections[alias].close()

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads) and not errors, errors
    log = list(Log.objects.using(alias).order_by("pk").values_list("fence", flat=True))
    assert sorted(log) == sorted(accepted)
    assert log == sorted(log), f"a lower fence committed after a higher one: {log}"
    assert 0 < len(log) < len(fences)
    top = max(fences)
    assert _row(database)[0] == f"w{top}"
    assert (_row(database)[1] if pattern == "row" else _fence_of(database, "account:1")) == top
