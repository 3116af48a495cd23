"""The README's first command: both demos run to "All checks passed" on an embedded Redis."""

from __future__ import annotations

import re
import subprocess
import sys

from ..workers import ROOT


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_exclusive.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


def test_celery_demo_passes_its_checks() -> None:
    result = run_demo("demo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"overlapping runs of a key\s+0\n", out)
    assert re.search(r"killed run's lease free\s+after \d+\.\d+ s", out)
    assert "All checks passed." in out


def test_lease_demo_passes_its_checks() -> None:
    result = run_demo("demo-leases", "--duration", "3", "--ttl", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"overlapping holds\s+0\n", result.stdout)
    assert "All checks passed." in result.stdout
