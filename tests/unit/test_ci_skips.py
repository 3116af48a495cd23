"""In CI a skip passes only when it is an expected one (tests/conftest.py): run a small session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = """
from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport
"""

TESTS = """
import pytest

from tests.conftest import SLOW_ONLY, expected_skip, unavailable

def test_a_plain_skip():
    pytest.skip("no reason CI accepts")

@pytest.mark.skipif(True, reason="a marker")
def test_a_marker_skip():
    pass

@pytest.mark.skipif(True, reason=SLOW_ONLY)
def test_the_slow_mode_off():
    pass

def test_a_store_without_a_feature():
    expected_skip("the memory:// store cannot do it")

def test_a_missing_server():
    unavailable("no such server")

@pytest.mark.xfail(reason="known")
def test_an_expected_failure():
    assert False
"""


def run_in_ci(tmp_path: Path) -> str:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_skips.py").write_text(TESTS)
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), CI="1")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return done.stdout


def test_in_ci_only_expected_skips_pass(tmp_path: Path) -> None:
    out = run_in_ci(tmp_path)
    assert "FAILED test_skips.py::test_a_plain_skip" in out, out
    assert "ERROR test_skips.py::test_a_marker_skip" in out, out
    assert "FAILED test_skips.py::test_a_missing_server" in out, out
    assert "not for this run: set CELERY_EXCLUSIVE_SLOW=1" in out, out
    assert "not for this run: the memory:// store cannot do it" in out, out
    assert "XFAIL test_skips.py::test_an_expected_failure" in out, out
    assert "2 failed, 2 skipped, 1 xfailed, 1 error" in out, out
