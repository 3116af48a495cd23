"""The PostgreSQL store through PgBouncer in transaction mode, as many Django projects run it.

In transaction mode each transaction may land on another server connection, so anything kept
in a session (advisory locks, prepared statements, ``SET``, ``LISTEN``) breaks. The store keeps
none on its operations; waiters ``LISTEN`` on a direct connection (``listen_url``). A private
``pgbouncer`` (Debian's package; ``.ci/run`` installs it) runs in front of the session's
PostgreSQL with a pool of 3 server connections, fewer than the racing threads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from celery_exclusive import connect
from celery_exclusive.embedded import stop_process

from ..conftest import unavailable
from ..history import check_history
from ..pg import _run_as
from ..servers import GaveUp, free_port, wait_until

POOL_SIZE = 3
THREADS = 8
HOLDS_PER_THREAD = 25


def _pgbouncer_binary() -> str | None:
    found = os.environ.get("CELERY_EXCLUSIVE_TEST_PGBOUNCER") or shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


@pytest.fixture(scope="module")
def postgres_and_pgbouncer(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(direct URL, URL through a private transaction-mode PgBouncer) of one database."""
    binary = _pgbouncer_binary()
    if binary is None:
        unavailable(
            "no pgbouncer: apt-get install pgbouncer, or set CELERY_EXCLUSIVE_TEST_PGBOUNCER"
        )
    direct: str = request.getfixturevalue("postgres_url")
    parts = urlsplit(direct)
    user, database = parts.username or "postgres", parts.path.lstrip("/") or "postgres"
    password = parts.password or ""
    port = free_port()
    directory = tempfile.mkdtemp(prefix="cex-pgbouncer-")
    run_as: dict[str, Any] = _run_as()  # PgBouncer refuses to run as root
    Path(directory, "users.txt").write_text(f'"{user}" "{password}"\n')
    Path(directory, "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{database} = host={parts.hostname} port={parts.port or 5432} dbname={database} "
        f"user={user}" + (f" password={password}" if password else "") + "\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = {'plain' if password else 'trust'}\n"
        f"auth_file = {directory}/users.txt\n"
        "pool_mode = transaction\n"
        f"default_pool_size = {POOL_SIZE}\nmin_pool_size = 0\nreserve_pool_size = 0\n"
        "max_client_conn = 100\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
        f"logfile = {directory}/pgbouncer.log\n"
    )
    if run_as:
        for name in ("", "users.txt", "pgbouncer.ini"):
            os.chown(os.path.join(directory, name), run_as["user"], run_as["group"])
    proc: subprocess.Popen[bytes] = subprocess.Popen(
        [binary, os.path.join(directory, "pgbouncer.ini")],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        **run_as,
    )
    query = f"?{parts.query}" if parts.query else ""
    userinfo = parts.netloc.rpartition("@")[0] or user
    pooled = f"postgresql://{userinfo}@127.0.0.1:{port}/{database}{query}"

    def answers() -> bool:
        import psycopg

        if proc.poll() is not None:
            log = Path(directory, "pgbouncer.log")
            raise GaveUp(f"pgbouncer exited: {log.read_text() if log.exists() else '?'}")
        with psycopg.connect(pooled.split("?")[0], connect_timeout=2, prepare_threshold=None):
            return True

    try:
        wait_until(answers, 20, f"pgbouncer on port {port}", step=0.05)
        yield direct, pooled
    finally:
        stop_process(proc)
        shutil.rmtree(directory, ignore_errors=True)


def test_racing_threads_through_a_transaction_pool_get_an_exclusive_history(
    postgres_and_pgbouncer: tuple[str, str], prefix: str
) -> None:
    # Given one store reached through PgBouncer (3 server connections for 8 threads), whose
    # waiters LISTEN on a direct connection
    direct, pooled = postgres_and_pgbouncer
    store = connect(pooled, prefix=prefix, listen_url=direct.split("?")[0])
    records: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(n: int) -> None:
        try:
            start.wait(30)
            for i in range(HOLDS_PER_THREAD):
                # ttl far beyond the acquire timeout: only a release's NOTIFY can wake a
                # waiter in time, never the holder's expiry
                lease = store.lease(f"k{i % 2}", ttl=60)
                requested = time.monotonic_ns()
                assert lease.acquire(timeout=30), f"thread {n}: no wake-up within 30 s"
                began = time.monotonic_ns()
                time.sleep(0.002)
                ended = time.monotonic_ns()
                assert lease.release() is True
                with lock:
                    records.append(
                        {
                            "key": lease.key,
                            "start": began,
                            "end": ended,
                            "requested": requested,
                            "fence": lease.fence,
                            "id": f"t{n}:{i}",
                        }
                    )
        except BaseException as exc:
            errors.append(exc)

    # When every thread takes the two keys in turn
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "a thread did not finish in 120 s"
        # Then no operation failed (a session feature through the pool would have raised),
        assert not errors, errors[0]
        # every hold is there, and no two holds of a key overlapped
        assert len(records) == THREADS * HOLDS_PER_THREAD
        check_history(records)
        assert store.holders("k0") == [] and store.holders("k1") == []
    finally:
        store.close()


def test_holder_listing_and_force_release_through_the_pool(
    postgres_and_pgbouncer: tuple[str, str], prefix: str
) -> None:
    _, pooled = postgres_and_pgbouncer
    store = connect(pooled, prefix=prefix)
    try:
        lease = store.lease("report", meta={"task_id": "t-1"})
        assert lease.acquire()
        [info] = list(store.leases())
        assert info.key == "report" and info.holders[0].meta["task_id"] == "t-1"
        assert store.force_release("report") == 1
        assert lease.renew() is False  # the holder learns it at its next renewal
    finally:
        store.close()
