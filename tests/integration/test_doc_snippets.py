"""Every code block of README.md and docs/celery.md does what its comments say.

The Celery blocks run as written (see tests/doc_snippets.py) on a real prefork worker of three
processes: each task gets a burst of calls, then a second burst once its first run has started.
"One at a time" fails on any overlap of two runs of a key; "at most one more waiting" fails on a
third message (the first burst must collapse into one message, the second into one pending
copy). A block with no check here fails the test that lists them, so a new block is tested or
consciously left out.
"""

from __future__ import annotations

import ast
import json
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_exclusive import AlreadyHeld, connect
from celery_exclusive.celery import is_skipped

from ..doc_snippets import Snippet, runs, snippets
from ..history import check_history
from ..workers import ROOT, Worker, shown_if_failed, worker_env

DOCUMENTS = ("README.md", "docs/celery.md")

#: Per Celery block (found by a line of its code): task -> (arguments, what its comment claims).
ONE_AT_A_TIME = "one at a time"  # never two runs of a key at once; the others are skipped
ONE_RUNNING_ONE_WAITING = "one running, at most one more waiting"
CELERY_BLOCKS: dict[str, dict[str, tuple[list[Any], str]]] = {
    # README.md, "Celery"
    'exclusive={"key": ["customer_id"], "hold": "queued_and_running"})': {
        "run_report": ([], ONE_AT_A_TIME),
        "sync_customer": ([42], ONE_RUNNING_ONE_WAITING),
    },
    # docs/celery.md, the opening example
    "def import_customer(customer_id): ...": {
        "run_report": ([], ONE_AT_A_TIME),
        "sync_customer": ([42], ONE_AT_A_TIME),
        "import_customer": ([42], ONE_RUNNING_ONE_WAITING),
    },
}


def _marker(block: Snippet, markers: Any) -> str | None:
    return next((m for m in markers if m in block.code), None)


def _python_blocks() -> list[Snippet]:
    return [b for path in DOCUMENTS for b in snippets(path) if b.lang == "python"]


def test_every_python_block_is_checked() -> None:
    checked = [*CELERY_BLOCKS, *OTHER_BLOCKS]
    unchecked = [b.name for b in _python_blocks() if _marker(b, checked) is None]
    assert not unchecked, f"code blocks no test runs (add a check here): {unchecked}"
    for marker in checked:
        assert sum(marker in b.code for b in _python_blocks()) == 1, marker


# ---------------------------------------------------------------- Celery blocks, on a worker


@pytest.fixture
def block_worker(
    request: pytest.FixtureRequest, redis_url: str, prefix: str
) -> Iterator[Callable[[Snippet], dict[str, str]]]:
    """Start a worker that runs one block; return the environment its callers need."""
    workers: list[Worker] = []

    def start(block: Snippet) -> dict[str, str]:
        env = {
            **worker_env(redis_url, prefix, f"snippets-{uuid.uuid4().hex[:8]}"),
            "CEX_SNIPPET": block.name,
            "CEX_SNIPPET_SECONDS": "1",
        }
        worker = Worker(env, concurrency=3, app="tests.doc_snippets")
        workers.append(worker)
        worker.start()
        return env

    try:
        yield start
    finally:
        for worker in workers:
            with shown_if_failed(request, worker):
                worker.stop()


def _drive(env: dict[str, str], task: str, arguments: list[Any]) -> dict[str, Any]:
    """Two bursts of 4 calls from a process of its own; the calls and every result."""
    code = "from tests.doc_snippets import drive; drive()"
    done = subprocess.run(
        [sys.executable, "-c", code, task, json.dumps(arguments), "4"],
        env={**env, "PYTHONPATH": str(ROOT), "PATH": ""},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("marker", list(CELERY_BLOCKS))
def test_a_celery_block_does_what_its_comments_say(
    marker: str, block_worker: Callable[[Snippet], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the block, run as written by a worker of three processes
    block = next(b for b in _python_blocks() if marker in b.code)
    env = block_worker(block)
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # runs() reads the store named there
    for task, (arguments, claim) in CELERY_BLOCKS[marker].items():
        # When each task gets two bursts of calls
        drove = _drive(env, task, arguments)
        ids = list(dict.fromkeys(call["id"] for call in drove["sent"]))
        values = drove["results"]
        mine = [r for r in runs() if r["id"] in ids]
        # Then no two of its runs overlap, and each call ended as the comment says
        check_history(mine)
        assert all(v == "done" or is_skipped(v) for v in values.values()), values
        assert mine, f"{task}: nothing ran"
        if claim == ONE_RUNNING_ONE_WAITING:
            # Each burst became one message: the first one queued, the second one pending
            # behind the running first (never skipped, never a third)
            assert len(ids) == 2, f"{task}: {len(ids)} messages for two bursts: {drove['sent']}"
            assert sorted(r["id"] for r in mine) == sorted(ids), mine
        else:
            assert claim == ONE_AT_A_TIME
            assert len(ids) == 8  # no enqueue hold: every call is a message
            skipped = [v for v in values.values() if is_skipped(v)]
            assert len(mine) + len(skipped) == 8, values
            assert skipped, f"{task}: 8 calls on 3 processes, and none found the key held?"


# ---------------------------------------------------------------- the other blocks


def _lease_block(block: Snippet, redis_url: str, prefix: str) -> None:
    url = f"{redis_url}?prefix={prefix}"
    code = block.code.replace('"redis://localhost:6379/0"', repr(url))
    assert repr(url) in code, "the block no longer connects to redis://localhost:6379/0"
    store = connect(url)
    written: list[tuple[str, int]] = []

    def run_sync(fence: int) -> None:
        # "renewed while you work": the key is held, by this grant, while the body runs
        assert [h.fence for h in store.holders("nightly-sync")] == [fence]

    def batches() -> list[str]:
        return ["a", "b"]

    def write(batch: str, fence: int) -> None:
        written.append((batch, fence))

    namespace: dict[str, Any] = {"run_sync": run_sync, "batches": batches, "write": write}
    exec(code, namespace)  # as written: the with-block, then acquire, batches, release
    assert store.holders("nightly-sync") == []
    assert store.holders("import:customer=42") == []
    fence = namespace["lease"].fence
    assert written == [("a", fence), ("b", fence)]
    # "AlreadyHeld if another holder has it"
    with store.lease("nightly-sync"), pytest.raises(AlreadyHeld):
        exec(code, dict(namespace))
    # "False (and a no-op) if no longer ours"
    assert namespace["lease"].release() is False


def _django_block(block: Snippet, redis_url: str, prefix: str) -> None:
    settings: dict[str, Any] = {}
    exec(block.code, settings)
    assert settings["INSTALLED_APPS"][-1] == "celery_exclusive.contrib.django"
    assert settings["CELERY_EXCLUSIVE_URL"] == "redis://localhost:6379/0"
    # The block's settings in a Django project of their own, on the test's Redis
    apps = ["django.contrib.contenttypes", "django.contrib.auth"] + [
        a for a in settings["INSTALLED_APPS"] if a is not Ellipsis
    ]
    script = (
        "import django, sys; from django.conf import settings; "
        f"settings.configure(INSTALLED_APPS={apps!r}, CELERY_EXCLUSIVE_URL=sys.argv[1], "
        f"CELERY_EXCLUSIVE_PREFIX={prefix!r}); "
        "django.setup(); from django.core.management import call_command; "
        "call_command('check', fail_level='WARNING'); call_command('exclusive', 'list')"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, redis_url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no leases held" in done.stdout


def _skipped_result_block(block: Snippet, redis_url: str, prefix: str) -> None:
    # "{..., ...}": the holder shows these keys and more; the rest is the record's exact shape
    documented = ast.literal_eval(block.code.replace(", ...}", "}"))
    from celery import Celery

    from celery_exclusive.celery import ExclusiveTask

    app = Celery("snippet_skip", set_as_current=False)
    app.conf.update(exclusive_url=redis_url, exclusive_prefix=prefix, task_always_eager=True)

    @app.task(base=ExclusiveTask, exclusive={"key": []}, shared=False)
    def report(inner: bool = False) -> Any:
        # a second run of the key while this one runs: the record of its skip
        return "ran" if inner else report.apply(kwargs={"inner": True}).result

    skipped = report.delay().get()
    assert set(skipped) == set(documented)
    assert set(documented["holder"]) <= set(skipped["holder"]), skipped["holder"]
    assert skipped["reason"] == documented["reason"]


def _compat_block(block: Snippet, redis_url: str, prefix: str) -> None:
    from celery_exclusive.celery import ExclusiveTask
    from celery_exclusive.compat import celery_once, celery_singleton

    names: dict[str, Any] = {}
    exec(block.code, names)  # the imports, as written
    assert names["QueueOnce"] is celery_once.QueueOnce
    assert names["Singleton"] is celery_singleton.Singleton
    assert issubclass(names["QueueOnce"], ExclusiveTask)
    assert issubclass(names["Singleton"], ExclusiveTask)
    assert issubclass(names["AlreadyQueued"], Exception) and callable(names["clear_locks"])
    # What they do on a real worker: tests/integration/test_compat_celery_*.py


OTHER_BLOCKS: dict[str, Callable[[Snippet, str, str], None]] = {
    "from celery_exclusive.compat.celery_once import QueueOnce": _compat_block,
    'store = connect("redis://localhost:6379/0")': _lease_block,
    'INSTALLED_APPS = [..., "celery_exclusive.contrib.django"]': _django_block,
    '{"exclusive": "skipped", "reason": "already running"': _skipped_result_block,
}


@pytest.mark.parametrize("marker", list(OTHER_BLOCKS))
def test_a_block_does_what_its_comments_say(marker: str, redis_url: str, prefix: str) -> None:
    block = next(b for b in _python_blocks() if marker in b.code)
    OTHER_BLOCKS[marker](block, redis_url, prefix)


def test_the_readme_command_lines_work(redis_url: str, prefix: str) -> None:
    # Given a held lease of the key the README shows
    block = next(b for b in snippets("README.md") if "celery-exclusive list --url" in b.code)
    store = connect(redis_url, prefix=prefix)
    key = "myapp.sync_customer:customer_id=42"
    lease = store.lease(key)
    assert lease.acquire()
    env = {"CELERY_EXCLUSIVE_URL": f"{redis_url}?prefix={prefix}", "PATH": ""}
    outputs = []
    for line in block.code.splitlines():
        argv = shlex.split(line, comments=True)
        if argv[0] != "celery-exclusive":
            continue  # `celery -A proj`: tests/integration/test_cli.py runs it on an app
        argv = [a.replace("redis://localhost:6379/0", env["CELERY_EXCLUSIVE_URL"]) for a in argv]
        done = subprocess.run(
            [sys.executable, "-m", "celery_exclusive.cli", *argv[1:]],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, (line, done.stderr)
        outputs.append(done.stdout)
    # When list, show, release, list --json and stats ran; Then they saw it, freed it, and it
    # is gone
    listed, shown, _released, as_json, stats = outputs
    assert key in listed and key in shown
    assert json.loads(as_json) == []
    assert "store" in stats.lower(), stats
    assert lease.renew() is False  # its next renewal finds it gone
    assert not lease.held
