"""The metrics and stats modules: core-safe imports, lost reasons, the missing extra."""

from __future__ import annotations

import subprocess
import sys

import pytest

from celery_exclusive import renewal
from celery_exclusive.backends.memory import MemoryBackend
from celery_exclusive.metrics import LOST_REASONS, lost_reason

BLOCKER = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"celery", "kombu", "django", "prometheus_client"}:
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, Block())
import importlib
module = importlib.import_module(sys.argv[1])
bad = sorted(m for m in sys.modules if m.split(".")[0] in {"celery", "kombu", "django"})
assert not bad, bad
if sys.argv[1] == "celery_exclusive.metrics":
    try:
        module.get_metrics()
    except module.ConfigurationError as exc:
        print(exc)
"""


@pytest.mark.parametrize("module", ["celery_exclusive.metrics", "celery_exclusive.stats"])
def test_imports_without_celery_django_or_prometheus(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, module], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    if module.endswith("metrics"):
        # and a metric asked for without the package says which extra to install
        assert "pip install 'celery-exclusive[prometheus]'" in result.stdout


def test_every_lost_reason_the_core_gives_has_its_label() -> None:
    # The texts are those the lease and the renewer really give (see lease.py, renewal.py).
    assert lost_reason("renewal refused: the store no longer had it") == "refused"
    assert lost_reason("the store no longer had it (expired, or released by force)") == "refused"
    assert lost_reason(renewal._OVERDUE) == "overdue"
    assert lost_reason(renewal._MAX_HOLD.format(60, 30)) == "max_hold"
    assert lost_reason("it was granted to the process this one was forked from") == "forked"
    assert lost_reason("something new") == "other"
    assert set(LOST_REASONS) == {"refused", "overdue", "max_hold", "forked", "other"}


def test_memory_store_counts_lost_leases_per_task_and_bounds_the_names() -> None:
    backend = MemoryBackend(clock=lambda: 1000.0)
    assert backend.lost_counts() == {}
    assert backend.record_lost("a") and backend.record_lost("a") and backend.record_lost("b")
    counts = backend.lost_counts()
    assert counts is not None
    assert {k: (v.count, v.last_at) for k, v in counts.items()} == {
        "a": (2, 1000.0),
        "b": (1, 1000.0),
    }
    assert backend.waiting(["k"]) == [False]
