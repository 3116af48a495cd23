"""``manage.py exclusive stats`` on leases really held (the database cache, and Redis)."""

from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from celery_exclusive import Store


@pytest.fixture
def store(configured_store: Store) -> Store:
    return configured_store


def test_manage_py_stats_counts_the_held_leases_per_task(store: Store) -> None:
    # Given two runs of one task and a queued copy of another, really held in the store
    held = [
        store.lease(f"app.sync:n={n}", meta={"task_name": "app.sync", "state": "running"})
        for n in (1, 2)
    ]
    held.append(
        store.lease("app.report@queued", meta={"task_name": "app.report", "state": "queued"})
    )
    assert all(lease.acquire() for lease in held)
    # When manage.py exclusive stats runs
    out = io.StringIO()
    call_command("exclusive", "stats", "--json", stdout=out)
    report = json.loads(out.getvalue())
    # Then it shows them per task
    assert report["healthy"] is True and report["latency_ms"] > 0
    rows = {row["task"]: row for row in report["tasks"]}
    assert (rows["app.sync"]["held"], rows["app.sync"]["running"]) == (2, 2)
    assert (rows["app.report"]["held"], rows["app.report"]["queued"]) == (1, 1)
    redis = store.backend.describe().startswith("redis")
    # waiters and lost counts where the store keeps them, "n/a" (None) where it cannot
    assert rows["app.sync"]["keys_waited_on"] == (0 if redis else None)
    assert rows["app.sync"]["lost"] == (0 if redis else None)
    out = io.StringIO()
    call_command("exclusive", "stats", stdout=out)
    assert "app.sync" in out.getvalue() and "health   ok" in out.getvalue()
    if not redis:
        assert "n/a" in out.getvalue()
    for lease in held:
        lease.release()
