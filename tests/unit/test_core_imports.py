"""The import direction of every module under ``src/celery_exclusive``, found by a path walk.

The layers (docs/architecture.md), from the bottom:

- the **foundation**, ``exceptions``, ``forking``, ``embedded`` and ``validate``: imported by
  everything;
- the **backends**, ``backends/``: a few atomic operations each; they import the foundation
  and each other, never the lease core nor an integration; no Celery; no Django either, except
  the Django-cache store (``backends/django_cache``);
- the **lease core**, every other module at the package root: never Celery nor Django, never
  an integration (even in a function body);
- the **integrations**, ``celery/``, ``contrib/``, ``compat/``, ``demo/`` and ``cli``: free to
  import anything.

Each rule is checked twice: on the source (every import statement, including those inside
functions, which run later), and by importing every core and backend module in a fresh
interpreter with the forbidden packages blocked (what an import pulls in through a third party
shows up only there). A new module is covered by being there; a new sub-package must be given
a layer below before the test passes.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import celery_exclusive

PACKAGE = "celery_exclusive"
SOURCE = Path(celery_exclusive.__file__).parent

FOUNDATION = {f"{PACKAGE}.{name}" for name in ("exceptions", "forking", "embedded", "validate")}
BACKENDS = f"{PACKAGE}.backends"
#: The modules (and sub-packages) of the integrations layer.
INTEGRATIONS = {f"{PACKAGE}.{name}" for name in ("celery", "contrib", "compat", "demo", "cli")}
#: Third-party packages of the integrations (billiard and kombu come with Celery).
CELERY = {"celery", "kombu", "billiard"}
DJANGO = {"django"}
#: Backends allowed to import Django: the store that runs on Django's caches.
DJANGO_BACKENDS = f"{BACKENDS}.django_cache"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    #: Every module an import statement names (``from a import b``: ``a`` and ``a.b``).
    imports: frozenset[str]

    @property
    def layer(self) -> str:
        if self.name in FOUNDATION:
            return "foundation"
        if within(self.name, BACKENDS):
            return "backends"
        if any(within(self.name, p) for p in INTEGRATIONS):
            return "integrations"
        if self.name == PACKAGE or self.name.count(".") == 1:
            return "core"
        return "unknown"

    @property
    def forbidden_packages(self) -> set[str]:
        """Third-party top-level packages this module must never import."""
        if self.layer == "integrations":
            return set()
        if within(self.name, DJANGO_BACKENDS):
            return CELERY
        return CELERY | DJANGO


def _imports(tree: ast.Module, package: str) -> frozenset[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return frozenset(found)


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _drop_type_checking_blocks(tree: ast.Module) -> None:
    """Drop ``if TYPE_CHECKING:`` blocks: those imports never run."""
    for node in ast.walk(tree):
        for field in ("body", "orelse"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                kept = [child for child in block if not _is_type_checking(child)]
                setattr(node, field, kept or [ast.Pass()])


def discover() -> list[Module]:
    """Every module under the package, by walking its folder (nothing is imported)."""
    modules = []
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        _drop_type_checking_blocks(tree)
        package = name if is_package else name.rpartition(".")[0]
        modules.append(Module(name, path, _imports(tree, package)))
    return modules


MODULES = discover()
IMPORTABLE = [m.name for m in MODULES if m.layer != "integrations"]


def test_the_walk_finds_every_layer_and_places_every_module() -> None:
    names = {m.name for m in MODULES}
    # A walk that finds nothing would let every test below pass: it finds what we know is there.
    assert {f"{PACKAGE}.lease", f"{PACKAGE}.renewal", f"{PACKAGE}.exceptions"} <= names
    assert any(within(n, f"{BACKENDS}.redis") for n in names)
    assert any(within(n, f"{PACKAGE}.celery.task") for n in names)
    unplaced = [m.name for m in MODULES if m.layer == "unknown"]
    assert unplaced == [], f"give these modules a layer in {__name__}: {unplaced}"


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name)
def test_no_module_imports_against_the_layers(module: Module) -> None:
    internal = {i for i in module.imports if within(i, PACKAGE)}
    bad_third_party = sorted(
        i for i in module.imports if i.split(".")[0] in module.forbidden_packages
    )
    assert bad_third_party == [], f"{module.name} imports {bad_third_party}"
    if module.layer in ("core", "foundation", "backends"):
        bad = sorted(i for i in internal if any(within(i, p) for p in INTEGRATIONS))
        assert bad == [], f"{module.name} ({module.layer}) imports an integration: {bad}"
    if module.layer == "foundation":
        bad = sorted(
            i for i in internal if i != PACKAGE and not any(within(i, f) for f in FOUNDATION)
        )
        assert bad == [], f"{module.name} (foundation) imports {bad}"
    if module.layer == "backends":
        lease_core = sorted(
            i
            for i in internal
            if i != PACKAGE
            and not within(i, BACKENDS)
            and not any(within(i, f) for f in FOUNDATION)
        )
        assert lease_core == [], f"{module.name} (a backend) imports the lease core: {lease_core}"


BLOCKER = """
import importlib, json, sys

class Block:
    blocked = set()

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"{name} is blocked")
        return None

block = Block()
sys.meta_path.insert(0, block)
failures = {}
for name, blocked in json.loads(sys.argv[1]):
    block.blocked = set(blocked)
    before = {m for m in sys.modules if m.split(".")[0] in blocked}
    try:
        importlib.import_module(name)
    except Exception as exc:
        failures[name] = f"{type(exc).__name__}: {exc}"
        continue
    pulled = sorted({m for m in sys.modules if m.split(".")[0] in blocked} - before)
    if pulled:
        failures[name] = f"pulled in {pulled}"
print(json.dumps(failures))
"""


def test_core_and_backend_modules_import_with_celery_and_django_blocked() -> None:
    # One interpreter for all: a module that needs a blocked package fails to import (and is
    # not cached), so every module that imports it fails too. The Django-cache backends come
    # last, with Django unblocked: nothing imported before them can lean on it.
    plan = sorted(
        ((m.name, sorted(m.forbidden_packages)) for m in MODULES if m.layer != "integrations"),
        key=lambda entry: (len(entry[1]) < len(CELERY | DJANGO), entry[0]),
    )
    assert len(plan) == len(IMPORTABLE) > 10
    result = subprocess.run(
        [sys.executable, "-c", BLOCKER, json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}
