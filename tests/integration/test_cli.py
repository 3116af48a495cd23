"""The command line: ``celery-exclusive`` and ``celery -A app exclusive`` on a real Redis."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

import pytest

from celery_exclusive import connect
from celery_exclusive.cli import main

from ..workers import ROOT, worker_env


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_list_show_release(redis_url: str, prefix: str) -> None:
    store = connect(redis_url, prefix=prefix)
    lease = store.lease("myapp.sync:customer_id=42", meta={"task_id": "t-1", "task_name": "sync"})
    lease.acquire()
    code, text = run("list", "--url", redis_url, "--prefix", prefix, "--json")
    assert code == 0
    (row,) = json.loads(text)
    assert row["key"] == "myapp.sync:customer_id=42"
    assert row["task_id"] == "t-1" and row["fence"] == lease.fence
    code, text = run("list", "--url", redis_url, "--prefix", prefix)
    assert "myapp.sync:customer_id=42" in text and "t-1" in text
    code, text = run("show", "myapp.sync:customer_id=42", "--url", redis_url, "--prefix", prefix)
    assert code == 0 and "t-1" in text
    code, text = run("release", "myapp.sync:customer_id=42", "--url", redis_url, "--prefix", prefix)
    assert code == 0 and "released 1" in text
    assert not lease.renew()  # the holder sees it lost
    code, text = run("show", "myapp.sync:customer_id=42", "--url", redis_url, "--prefix", prefix)
    assert code == 1 and "free" in text


def test_the_environment_names_the_store_and_its_prefix_and_options_win(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a lease held under this test's prefix, and an environment that names both
    store = connect(redis_url, prefix=prefix)
    lease = store.lease("env-named", meta={"task_id": "t-env"})
    assert lease.acquire()
    monkeypatch.setenv("CELERY_EXCLUSIVE_URL", redis_url)
    monkeypatch.setenv("CELERY_EXCLUSIVE_PREFIX", prefix)
    # When the script lists with no --url and no --prefix, it finds the lease
    code, text = run("list", "--json")
    assert code == 0 and [r["task_id"] for r in json.loads(text)] == ["t-env"]
    # and a --prefix given wins over the environment's
    code, text = run("list", "--json", "--prefix", f"{prefix}-other")
    assert code == 0 and json.loads(text) == []
    lease.release()


def test_a_bad_setting_in_the_environment_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CELERY_EXCLUSIVE_PREFIX", "{tagged}")
    assert run("list", "--url", "memory://")[0] == 1
    assert "CELERY_EXCLUSIVE_PREFIX" in capsys.readouterr().err


def test_missing_store_is_a_clear_error(capsys: object) -> None:
    env = dict(os.environ)
    env.pop("CELERY_EXCLUSIVE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "celery_exclusive.cli", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "CELERY_EXCLUSIVE_URL" in result.stderr


def test_celery_subcommand_uses_the_apps_store(redis_url: str, prefix: str) -> None:
    env = worker_env(redis_url, prefix, "unused")
    store = connect(env["CEX_STORE_URL"], prefix=prefix)
    lease = store.lease("cex_tests.report", meta={"task_id": "t-9"})
    lease.acquire()
    result = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.celery_app", "exclusive", "list", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert [r["task_id"] for r in json.loads(result.stdout)] == ["t-9"]
    lease.release()


def test_help_is_plain_text_without_rest_markup(capsys: pytest.CaptureFixture[str]) -> None:
    # Given the script's --help, and each sub-command's
    names = ("list", "show", "release", "stats", "demo")
    for argv in (["--help"], *([name, "--help"] for name in names)):
        # When it is printed
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        # Then it reads as text: no reStructuredText backquotes from a docstring
        shown = capsys.readouterr().out
        assert "``" not in shown, shown
        assert "usage: celery-exclusive" in shown


def test_the_script_and_the_celery_command_take_the_same_arguments() -> None:
    from celery_exclusive.celery.cli import exclusive
    from celery_exclusive.cli import STORE_COMMANDS, build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    script = sub.choices
    assert set(exclusive.commands) == {c.name for c in STORE_COMMANDS}
    for command in STORE_COMMANDS:
        options = {
            flag
            for action in script[command.name]._actions
            for flag in action.option_strings or [action.dest]
        } - {"-h", "--help", "--url", "--prefix"}
        clicked = {opt for param in exclusive.commands[command.name].params for opt in param.opts}
        assert options == clicked, command.name
