"""The core must not import Celery or Django: run each import with both blocked."""

from __future__ import annotations

import subprocess
import sys

import pytest

CORE_MODULES = [
    "celery_exclusive",
    "celery_exclusive.exceptions",
    "celery_exclusive.events",
    "celery_exclusive.keys",
    "celery_exclusive.lease",
    "celery_exclusive.renewal",
    "celery_exclusive.store",
    "celery_exclusive.backends.base",
    "celery_exclusive.backends.memory",
    "celery_exclusive.backends.redis",
]

BLOCKER = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"celery", "kombu", "django"}:
            raise ImportError(f"{name} is blocked: the core must not import it")
        return None

sys.meta_path.insert(0, Block())
import importlib
importlib.import_module(sys.argv[1])
bad = sorted(m for m in sys.modules if m.split(".")[0] in {"celery", "kombu", "django"})
assert not bad, bad
"""


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_without_celery_or_django(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, module], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
