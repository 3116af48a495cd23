"""In CI a skip passes only when it is an expected one (tests/conftest.py): run a small session.

The session runs in this process (pytester), with ``CI`` set for its length.
"""

from __future__ import annotations

import pytest

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


def test_in_ci_only_expected_skips_pass(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_skips=TESTS)
    monkeypatch.setenv("CI", "1")
    result = pytester.runpytest_inprocess(
        "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"
    )
    out = result.stdout.str()
    assert "FAILED test_skips.py::test_a_plain_skip" in out, out
    assert "ERROR test_skips.py::test_a_marker_skip" in out, out
    assert "FAILED test_skips.py::test_a_missing_server" in out, out
    assert "not for this run: set CELERY_EXCLUSIVE_SLOW=1" in out, out
    assert "not for this run: the memory:// store cannot do it" in out, out
    assert "XFAIL test_skips.py::test_an_expected_failure" in out, out
    result.assert_outcomes(failed=2, skipped=2, xfailed=1, errors=1)
