"""Library bugs the model test found, each as a small deterministic test that fails until fixed.

The Django database cache (``DjangoCacheBackend`` over ``DatabaseCells``) opens one database
connection per thread (``PerThread.use``, ``backends/django_cache/connections.py``) and closes them
only in ``Store.close()``: a thread that used the store and then ended leaves its connection open,
held by the backend's slot list, for the life of the store. A process whose threads come and go
(Django's threaded runserver, a thread per blocking acquire, the model test's waiters) runs the
database out of connections ("FATAL: sorry, too many clients already")."""

from __future__ import annotations

import threading
import uuid

import pytest

from ..pg import shared_postgres_url
from .conftest import ModelStore

THREADS = 12


def _open_backends(database: str) -> set[int]:
    import psycopg

    with psycopg.connect(shared_postgres_url(), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [database],
        ).fetchall()
    return {pid for (pid,) in rows}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("model_store", ["django:database-postgres"], indirect=True)
def test_a_thread_that_ended_does_not_keep_a_database_connection(model_store: ModelStore) -> None:
    from django.conf import settings

    store = model_store.store
    database = settings.DATABASES["pg"]["NAME"]
    run = uuid.uuid4().hex[:8]

    def take_and_give_back(i: int) -> None:
        lease = store.lease(f"leak-{run}-{i}", ttl=5.0, auto_renew=False)
        assert lease.acquire()
        assert lease.release()

    before = _open_backends(database)
    threads = [threading.Thread(target=take_and_give_back, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
        thread.join(10.0)  # one at a time: each thread has ended before the next starts
        assert not thread.is_alive()
    left = _open_backends(database) - before
    # A connection or two of our own may stay (a pool, this thread's); one per dead thread may not.
    assert len(left) <= 2, (
        f"{THREADS} threads each took and released one lease, then ended; {len(left)} "
        "database connections they opened are still open"
    )
