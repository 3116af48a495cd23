"""examples/django_project stays runnable: its checks pass, its tasks find their store.

Each test copies the project to a temp dir (nothing is written into the source tree) and runs
``manage.py`` in a subprocess, as its README does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_project"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    target = tmp_path / "django_project"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("*.sqlite3", "__pycache__"))
    return target


def manage(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("store", ["redis", "db"])
def test_manage_py_check_passes_without_contacting_the_store(project: Path, store: str) -> None:
    # Port 1: nothing listens there. The checks are static, so this must still pass.
    result = manage(project, "check", REDIS_URL="redis://127.0.0.1:1/0", EXCLUSIVE_STORE=store)
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


SCRIPT = """
import json
from celery_exclusive.celery import is_skipped
from celery_exclusive.celery.config import store_for
from proj.celery import app
from reports.tasks import run_report, sync_customer

# A report is running elsewhere: it holds the lease of its key.
key = run_report.exclusive_key((), {})
held = store_for(app).lease(key, meta={"task_id": "elsewhere"}, ttl=30)
assert held.acquire()

skipped = run_report.apply((0,)).get()
other = sync_customer.apply((7, 0)).get()
report = sync_customer.apply((42, 0)).get()
print(json.dumps({"key": key, "skipped": is_skipped(skipped), "holder": skipped["holder_task_id"],
                  "other": other, "report": report}))
"""


@pytest.mark.parametrize("store", ["redis", "db"])
def test_the_tasks_take_their_leases_in_the_configured_store(
    project: Path, store: str, redis_url: str
) -> None:
    env = {"REDIS_URL": redis_url, "EXCLUSIVE_STORE": store}
    if store == "db":
        for command in (["migrate", "-v0"], ["createcachetable"]):
            done = manage(project, *command, **env)
            assert done.returncode == 0, done.stderr

    # Given a report running elsewhere, when the tasks run
    ran = manage(project, "shell", "-c", SCRIPT, **env)
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout.strip().splitlines()[-1])

    # Then the report is skipped, naming the holder; the syncs run with a fence
    assert out["key"] == "reports.tasks.run_report"
    assert out["skipped"] is True and out["holder"] == "elsewhere"
    assert out["other"]["customer_id"] == 7 and out["other"]["fence"] > 0
    assert out["report"]["customer_id"] == 42 and out["report"]["fence"] > 0

    # ... and manage.py exclusive sees (and releases) the lease left held in that store
    listed = manage(project, "exclusive", "list", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    rows = [r for r in json.loads(listed.stdout) if r["key"] == out["key"]]
    assert [r["task_id"] for r in rows] == ["elsewhere"]
    released = manage(project, "exclusive", "release", out["key"], **env)
    assert released.returncode == 0, released.stderr
    shown = manage(project, "exclusive", "show", out["key"], **env)
    assert shown.returncode == 1 and "is free" in shown.stdout
