"""Fences PostgreSQL enforces (``celery_exclusive.fencing``): real server, real processes.

Each test has tables of its own (random names) in the session's PostgreSQL (``postgres_url``),
dropped when it ends: a fence table (``accept_fence``) and an ``account`` row with a ``fence``
column (the documented ``UPDATE ... WHERE fence <= %(fence)s``). The paused-holder timeline of
docs/guarantees.md runs with two writer processes (this module run with ``-m``) holding leases
on the session's Redis.
"""

from __future__ import annotations

import bisect
import itertools
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import pytest

import celery_exclusive
from celery_exclusive import ConfigurationError, LeaseLost, StaleFence, connect
from celery_exclusive.fencing import (
    ACCEPT_FENCE_SQL,
    accept_fence,
    create_fence_table,
    fence_sql,
)

from ..conftest import EXPECTED, SLOW, SLOW_ONLY

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]

#: How long a fresh Python may take to start, import redis and psycopg and answer (loaded CI).
START_TIMEOUT = 30.0

#: The documented row pattern: the user's own row carries the fence.
ROW_UPDATE = (
    "UPDATE {account} SET owner = %(owner)s, fence = %(fence)s "
    "WHERE id = %(id)s AND fence <= %(fence)s"
)


def plain_dsn(url: str) -> str:
    """``url`` without the test suite's own ``table=`` parameter (libpq does not know it)."""
    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "table"])
    return parts._replace(query=query).geturl()


@dataclass
class Tables:
    """The fence table and the ``account`` table of one test."""

    dsn: str
    fence: str = field(default_factory=lambda: f"cex_fence_{uuid.uuid4().hex[:10]}")
    account: str = field(default_factory=lambda: f"cex_account_{uuid.uuid4().hex[:10]}")
    log: str = field(default_factory=lambda: f"cex_log_{uuid.uuid4().hex[:10]}")

    def connect(self, **kwargs: Any) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, connect_timeout=10, **kwargs)

    def fence_of(self, resource: str) -> int | None:
        with self.connect(autocommit=True) as conn:
            row = conn.execute(
                f"SELECT fence FROM {self.fence} WHERE resource = %s", (resource,)
            ).fetchone()
            return None if row is None else int(row[0])

    def account_row(self, id_: int = 1) -> tuple[str, int]:
        with self.connect(autocommit=True) as conn:
            row = conn.execute(
                f"SELECT owner, fence FROM {self.account} WHERE id = %s", (id_,)
            ).fetchone()
            assert row is not None
            return str(row[0]), int(row[1])


@pytest.fixture
def tables(postgres_url: str) -> Iterator[Tables]:
    t = Tables(plain_dsn(postgres_url))
    with t.connect(autocommit=True) as conn:
        create_fence_table(conn, table=t.fence)
        conn.execute(
            f"CREATE TABLE {t.account} (id int PRIMARY KEY, owner text NOT NULL, "
            "fence bigint NOT NULL DEFAULT 0)"
        )
        conn.execute(f"INSERT INTO {t.account} (id, owner) VALUES (1, 'nobody')")
        conn.execute(f"CREATE TABLE {t.log} (id bigserial PRIMARY KEY, fence bigint NOT NULL)")
    try:
        yield t
    finally:
        with t.connect(autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {t.fence}, {t.account}, {t.log}")


# -- one writer at a time -----------------------------------------------------------------------


def test_the_first_fence_of_a_new_resource_is_accepted(tables: Tables) -> None:
    with tables.connect() as conn, conn.transaction():
        accept_fence(conn, "r", 5, table=tables.fence)
    assert tables.fence_of("r") == 5


def test_the_same_fence_twice_and_a_higher_one_are_accepted(tables: Tables) -> None:
    with tables.connect(autocommit=True) as conn:
        for fence in (5, 5, 6, 6):
            with conn.transaction():
                accept_fence(conn, "r", fence, table=tables.fence)
            assert tables.fence_of("r") == fence


def test_a_lower_fence_is_refused_and_its_transaction_rolled_back(tables: Tables) -> None:
    with tables.connect(autocommit=True) as conn:
        with conn.transaction():
            accept_fence(conn, "r", 8, table=tables.fence)
            conn.execute(f"UPDATE {tables.account} SET owner = 'B' WHERE id = 1")
        with pytest.raises(StaleFence) as caught, conn.transaction():
            accept_fence(conn, "r", 7, table=tables.fence)
            conn.execute(f"UPDATE {tables.account} SET owner = 'A' WHERE id = 1")
    error = caught.value
    assert (error.resource, error.fence, error.current, error.key) == ("r", 7, 8, "r")
    assert isinstance(error, LeaseLost) and "stale fence 7" in str(error)
    assert tables.fence_of("r") == 8
    assert tables.account_row() == ("B", 0)


def test_a_cursor_works_as_well_as_a_connection(tables: Tables) -> None:
    with tables.connect() as conn, conn.cursor() as cur:
        accept_fence(cur, "r", 3, table=tables.fence)
        with pytest.raises(StaleFence):
            accept_fence(cur, "r", 2, table=tables.fence)
        assert not cur.closed
        conn.commit()
    assert tables.fence_of("r") == 3


def test_resources_are_fenced_apart(tables: Tables) -> None:
    with tables.connect() as conn, conn.transaction():
        accept_fence(conn, "a", 9, table=tables.fence)
        accept_fence(conn, "b", 1, table=tables.fence)
    assert (tables.fence_of("a"), tables.fence_of("b")) == (9, 1)


@pytest.mark.parametrize(
    ("fence", "message"),
    [
        (None, "fence is None"),
        (-1, "from 0 to 2\\*\\*63 - 1"),
        (2**63, "from 0 to 2\\*\\*63 - 1"),
        ("7", "must be an int"),
        (7.0, "must be an int"),
        (True, "must be an int"),
    ],
)
def test_a_bad_fence_is_refused_before_anything_is_sent(
    tables: Tables, fence: Any, message: str
) -> None:
    with tables.connect() as conn:
        with pytest.raises(ConfigurationError, match=message):
            accept_fence(conn, "r", fence, table=tables.fence)
        assert int(conn.info.transaction_status) == 0  # nothing was sent: still idle


@pytest.mark.parametrize("resource", ["", None, 7])
def test_a_bad_resource_is_refused(tables: Tables, resource: Any) -> None:
    with tables.connect() as conn, pytest.raises(ConfigurationError, match="resource"):
        accept_fence(conn, resource, 1, table=tables.fence)


@pytest.mark.parametrize("table", ["a b", 'x"; DROP TABLE y; --', "a.b.c", "", "1abc"])
def test_a_table_name_never_carries_sql(table: str) -> None:
    with pytest.raises(ConfigurationError, match="table"):
        fence_sql(ACCEPT_FENCE_SQL, table)


def test_a_schema_qualified_table_is_quoted(tables: Tables) -> None:
    assert fence_sql("{table}", "public.t") == '"public"."t"'
    with tables.connect() as conn, conn.transaction():
        accept_fence(conn, "r", 4, table=f"public.{tables.fence}")
    assert tables.fence_of("r") == 4


def test_autocommit_outside_a_transaction_is_refused(tables: Tables) -> None:
    # The fence row would be committed and unlocked before the write it guards.
    with (
        tables.connect(autocommit=True) as conn,
        pytest.raises(ConfigurationError, match="transaction"),
    ):
        accept_fence(conn, "r", 1, table=tables.fence)
    assert tables.fence_of("r") is None


# -- two writers at once: lock order and READ COMMITTED's re-check ------------------------------


def _waiting_for_a_lock(tables: Tables, pid: int) -> bool:
    with tables.connect(autocommit=True) as conn:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return row is not None and row[0] == "Lock"


def _second_writer(tables: Tables, pattern: str, fence: int) -> tuple[Any, threading.Thread, Any]:
    """Start a writer of ``fence`` in a thread; return its connection, thread and outcome queue."""
    conn = tables.connect()
    outcome: queue.Queue[object] = queue.Queue()

    def write() -> None:
        try:
            outcome.put(_write(conn, tables, pattern, fence, "second"))
            conn.commit()
        except BaseException as exc:
            conn.rollback()
            outcome.put(exc)

    thread = threading.Thread(target=write, name=f"writer-{fence}", daemon=True)
    thread.start()
    return conn, thread, outcome


def _write(conn: Any, tables: Tables, pattern: str, fence: int, owner: str) -> bool:
    """One fenced write of ``owner`` to account 1 (not committed): True if it was accepted."""
    if pattern == "table":
        accept_fence(conn, "account:1", fence, table=tables.fence)
        conn.execute(f"UPDATE {tables.account} SET owner = %s WHERE id = 1", (owner,))
        return True
    cur = conn.execute(
        ROW_UPDATE.format(account=tables.account), {"owner": owner, "fence": fence, "id": 1}
    )
    return bool(cur.rowcount == 1)


CASES = [
    # pattern, resource already has a fence, first fence, second fence, first commits
    pytest.param("table", True, 8, 7, True, id="table-8-then-7"),
    pytest.param("table", True, 7, 8, True, id="table-7-then-8"),
    pytest.param("table", False, 8, 7, True, id="table-new-8-then-7"),
    pytest.param("table", False, 8, 7, False, id="table-new-8-rolled-back-then-7"),
    pytest.param("table", True, 8, 7, False, id="table-8-rolled-back-then-7"),
    pytest.param("row", True, 8, 7, True, id="row-8-then-7"),
    pytest.param("row", True, 7, 8, True, id="row-7-then-8"),
    pytest.param("row", True, 8, 7, False, id="row-8-rolled-back-then-7"),
]


@pytest.mark.parametrize(("pattern", "existing", "first", "second", "commits"), CASES)
def test_a_writer_waits_for_the_other_and_rechecks_its_committed_fence(
    tables: Tables, pattern: str, existing: bool, first: int, second: int, commits: bool
) -> None:
    if existing:  # the resource has accepted fence 1 already
        with tables.connect() as conn, conn.transaction():
            assert _write(conn, tables, pattern, 1, "zero")
    # Given a first writer that has written with its fence and not committed yet
    with tables.connect() as conn1:
        assert _write(conn1, tables, pattern, first, "first")
        # When a second writer writes with its fence: it waits for the first one's row lock
        conn2, thread, outcome = _second_writer(tables, pattern, second)
        try:
            pid = conn2.info.backend_pid
            deadline = time.monotonic() + 20
            while not _waiting_for_a_lock(tables, pid):
                assert time.monotonic() < deadline, "the second writer never waited for a lock"
                assert outcome.empty(), f"the second writer did not wait: {outcome.get()}"
                time.sleep(0.02)
            # ...until the first one ends
            conn1.commit() if commits else conn1.rollback()
            thread.join(20)
            assert not thread.is_alive()
            result = outcome.get_nowait()
        finally:
            conn2.close()
    # Then the second is judged against what the first committed, not what it saw before
    winner = first if commits else (1 if existing else None)
    accepted = winner is None or second >= winner
    if pattern == "table" and not accepted:
        assert isinstance(result, StaleFence), result
        assert result.current == winner
    else:
        assert result is accepted, result
    owner, row_fence = tables.account_row()
    if accepted:
        assert owner == "second"
    else:
        assert owner == ("first" if commits else "zero")
    if pattern == "table":
        assert tables.fence_of("account:1") == max(f for f in (winner, second) if f is not None)
    else:
        assert row_fence == (second if accepted else winner)


# -- many writers at once ---------------------------------------------------------------------


@dataclass
class Attempt:
    fence: int
    began: float  # monotonic, before BEGIN
    ended: float  # monotonic, after COMMIT or ROLLBACK returned
    accepted: bool


def _fences(count: int, rng: random.Random) -> list[int]:
    """Fences in the order writers get them: rising, with neighbours swapped and repeated."""
    fences = [n // 2 + 1 for n in range(count)]  # each fence twice: the same holder again
    for i in range(len(fences)):  # a late writer overtaken by a few later grants
        j = min(len(fences) - 1, i + rng.randrange(0, 6))
        fences[i], fences[j] = fences[j], fences[i]
    return fences


def _run_writers(tables: Tables, pattern: str, threads: int, writes: int) -> list[Attempt]:
    rng = random.Random(os.getpid() ^ threads ^ writes)
    work: queue.Queue[int] = queue.Queue()
    for fence in _fences(writes, rng):
        work.put(fence)
    attempts: list[Attempt] = []
    errors: list[BaseException] = []
    guard = threading.Lock()

    def writer() -> None:
        try:
            with tables.connect() as conn:
                for _ in range(writes):
                    try:
                        fence = work.get_nowait()
                    except queue.Empty:
                        return
                    began = time.monotonic()
                    try:
                        with conn.transaction():
                            accepted = _write(conn, tables, pattern, fence, f"w{fence}")
                            if accepted:  # in the locked section: ids follow commit order
                                conn.execute(
                                    f"INSERT INTO {tables.log} (fence) VALUES (%s)", (fence,)
                                )
                            else:
                                raise StaleFence(fence=fence)  # roll back, like accept_fence
                    except StaleFence:
                        accepted = False
                    with guard:
                        attempts.append(Attempt(fence, began, time.monotonic(), accepted))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=writer, name=f"w{n}") for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(90)
    assert not any(w.is_alive() for w in workers), "a writer is stuck"
    assert not errors, errors
    assert len(attempts) == writes
    return attempts


def _check_history(tables: Tables, pattern: str, attempts: list[Attempt]) -> None:
    with tables.connect(autocommit=True) as conn:
        log = [int(r[0]) for r in conn.execute(f"SELECT fence FROM {tables.log} ORDER BY id")]
    accepted = sorted(a.fence for a in attempts if a.accepted)
    # The log holds exactly the accepted writes, and in commit order their fences never go down
    assert sorted(log) == accepted
    assert log == sorted(log), f"a lower fence committed after a higher one: {log}"
    # No write began after a higher fence's write had committed and was still accepted
    committed = sorted((a.ended, a.fence) for a in attempts if a.accepted)
    ends = [ended for ended, _ in committed]
    top_so_far = list(itertools.accumulate((f for _, f in committed), max))
    for a in attempts:
        done = bisect.bisect_left(ends, a.began)  # accepted writes committed before a began
        if a.accepted and done:
            assert top_so_far[done - 1] <= a.fence, (a, top_so_far[done - 1])
    # The highest fence is always accepted, so it is the resource's fence at the end
    top = max(a.fence for a in attempts)
    assert top in log
    if pattern == "table":
        assert tables.fence_of("account:1") == top
    assert tables.account_row() == (f"w{top}", top if pattern == "row" else 0)
    # The run was a contest: some writes were refused
    assert len(log) < len(attempts)


@pytest.mark.parametrize("pattern", ["table", "row"])
def test_concurrent_writers_commit_in_fence_order(tables: Tables, pattern: str) -> None:
    attempts = _run_writers(tables, pattern, threads=6, writes=600)
    _check_history(tables, pattern, attempts)


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason=SLOW_ONLY)
@pytest.mark.parametrize("pattern", ["table", "row"])
def test_concurrent_writers_commit_in_fence_order_long(tables: Tables, pattern: str) -> None:
    attempts = _run_writers(tables, pattern, threads=16, writes=20_000)
    _check_history(tables, pattern, attempts)


# -- the paused holder (docs/guarantees.md): real processes, a real lease ----------------------


class Writer:
    """One writer process: takes the lease, says its fence, writes when told to."""

    def __init__(self, *args: str, stderr: Path) -> None:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                [str(Path(celery_exclusive.__file__).parents[1]), str(ROOT)]
            ),
        }
        self.stderr = stderr
        self.lines: queue.Queue[str | None] = queue.Queue()
        with open(stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", __name__, *args],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                bufsize=1,
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> str:
        """The rest of the next line, which must start with ``word``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = f"(nothing within {timeout} s)"
        first, _, rest = (line or "(ended)").partition(" ")
        assert first == word, f"{line!r}; stderr:\n{self.stderr.read_text()[-3000:]}"
        return rest

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def state(self) -> str:
        """The process's state letter in /proc (``T``: stopped)."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason=EXPECTED + "needs /proc, SIGSTOP")
@pytest.mark.parametrize("pattern", ["table", "row"])
def test_a_paused_holder_resumes_and_its_stale_write_is_refused(
    tables: Tables, redis_url: str, prefix: str, pattern: str, tmp_path: Path
) -> None:
    ttl = 1.0
    common = (redis_url, prefix, tables.dsn, tables.fence, tables.account, pattern)
    # t=0: A acquires "account:1" and is about to write
    a = Writer(*common, "A", str(ttl), stderr=tmp_path / "a.err")
    b: Writer | None = None
    try:
        fence_a = int(a.expect("acquired", START_TIMEOUT))
        # t=1: A's process is paused before its write (its renewal thread with it)
        a.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while a.state() != "T":
            assert time.monotonic() < deadline, "A was not stopped"
            time.sleep(0.01)
        # t=ttl: A's lease expires in the store; B acquires with a higher fence and writes
        b = Writer(*common, "B", "30", stderr=tmp_path / "b.err")
        fence_b = int(b.expect("acquired", START_TIMEOUT + 10 * ttl))
        assert fence_b > fence_a
        b.send("write")
        assert b.expect("wrote", 20) == str(fence_b)
        assert tables.account_row() == ("B", fence_b if pattern == "row" else 0)
        # t=45: A resumes and writes with its fence: refused, and B's write stays
        a.proc.send_signal(signal.SIGCONT)
        a.send("write")
        refusal = a.expect("stale", 20)
        if pattern == "table":
            assert refusal == str(fence_b)  # StaleFence.current: B's fence
        assert tables.account_row() == ("B", fence_b if pattern == "row" else 0)
        if pattern == "table":
            assert tables.fence_of("account:1") == fence_b
        assert a.proc.wait(20) == 0
        # B held its lease throughout: its release frees it
        b.send("exit")
        assert b.expect("released", 20) == "True"
        assert b.proc.wait(20) == 0
    finally:
        a.stop()
        if b is not None:
            b.stop()


def _writer_main(argv: list[str]) -> int:
    """A writer process (see :class:`Writer`): ``acquired <fence>``, then ``wrote`` or ``stale``."""
    import psycopg

    redis_url, prefix, dsn, fence_table, account, pattern, name, ttl = argv
    store = connect(redis_url, prefix=prefix)
    lease = store.lease("account:1", ttl=float(ttl))
    if not lease.acquire(blocking=True, timeout=60):
        print("busy", flush=True)
        return 1
    print("acquired", lease.fence, flush=True)
    assert sys.stdin.readline().strip() == "write"
    assert lease.fence is not None
    # No ensure_held() here: A does not know it was paused (the timeline's point).
    with psycopg.connect(dsn) as conn:
        try:
            with conn.transaction():
                if pattern == "table":
                    accept_fence(conn, "account:1", lease.fence, table=fence_table)
                    conn.execute(f"UPDATE {account} SET owner = %s WHERE id = 1", (name,))
                else:
                    cur = conn.execute(
                        ROW_UPDATE.format(account=account),
                        {"owner": name, "fence": lease.fence, "id": 1},
                    )
                    if cur.rowcount != 1:
                        raise StaleFence(resource="account:1", fence=lease.fence)
        except StaleFence as exc:
            print("stale", exc.current, flush=True)
            store.close()
            return 0
    print("wrote", lease.fence, flush=True)
    assert sys.stdin.readline().strip() == "exit"
    print("released", lease.release(), flush=True)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(_writer_main(sys.argv[1:]))
