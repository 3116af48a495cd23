"""The lifecycle matrix on real Celery workers: one test per worker configuration (group).

CI runs the pairwise-covering subset (tests/matrix/cases.py ``ci_cases``);
CELERY_EXCLUSIVE_SLOW=1 runs the large set (``slow_cases``) and prints the table per fault
and hold. ``CEXM_TABLE=path`` also writes the table (markdown) there; ``CEXM_ONLY=c012,c031``
runs only those cases. See docs/celery-matrix.md.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import pytest

from ..conftest import SLOW
from ..servers import RedisServer
from .cases import ci_cases, groups, slow_cases
from .runner import Group, Outcome

CASES = slow_cases() if SLOW else ci_cases()
if os.environ.get("CEXM_ONLY"):
    _only = set(os.environ["CEXM_ONLY"].split(","))
    CASES = [c for c in CASES if c["id"] in _only]
GROUPS = groups(CASES)

pytestmark = pytest.mark.timeout(5400 if SLOW else 400)


#: Groups (worker configurations) run side by side, each with its own worker and store.
PARALLEL_GROUPS = int(os.environ.get("CEXM_PARALLEL_GROUPS") or 3)


@pytest.fixture(scope="module")
def broker(own_redis: RedisServer) -> RedisServer:
    return own_redis


def test_lifecycle_matrix(broker: RedisServer) -> None:
    """Every case keeps I1-I5 (runner.py); the table per fault and hold is printed."""
    began = time.monotonic()
    runs = [Group(key, cases, broker) for key, cases in GROUPS.items()]
    outcomes: list[Outcome] = []
    crashed: list[str] = []
    with ThreadPoolExecutor(max_workers=PARALLEL_GROUPS) as ex:
        futures = {ex.submit(g.run): g for g in runs}
        for future in as_completed(futures):
            group = futures[future]
            try:
                outcomes += future.result()
            except Exception as exc:  # a group that could not run at all (no worker...)
                crashed.append(f"{_gid((group.pool, group.acks_late, group.backend))}: {exc!r}")
            if os.environ.get("CEXM_TABLE"):  # so far (a long slow run can be read meanwhile)
                with open(os.environ["CEXM_TABLE"], "w") as out:
                    done = sum(f.done() for f in futures)
                    out.write(f"(partial: {done} of {len(runs)} groups)\n\n")
                    out.write(render_table(outcomes))
    elapsed = time.monotonic() - began
    table = render_table(outcomes)
    print(f"\n{len(outcomes)} cases in {len(runs)} groups, {elapsed:.0f} s\n{table}")
    if os.environ.get("CEXM_TABLE"):
        with open(os.environ["CEXM_TABLE"], "w") as out:
            out.write(f"{len(outcomes)} cases in {len(runs)} groups, {elapsed:.0f} s\n\n{table}")
    for o in sorted(outcomes, key=lambda o: o.case["id"]):
        print(describe(o))
    failed = [o for o in outcomes if o.violations]
    for o in failed:
        print(f"--- worker log of {o.case['id']} (last lines naming its task ids)")
        print(o.log_excerpt)
    assert not crashed, crashed
    assert not failed, "\n".join(describe(o) for o in failed)


def _gid(key: tuple[Any, ...]) -> str:
    pool, acks, backend = key
    return f"{pool}-{'late' if acks else 'early'}-{backend}"


def describe(o: Outcome) -> str:
    c = o.case
    head = (
        f"{c['id']} {c['hold']}/{c['on_conflict']}/{c['on_duplicate']}/{c['on_lock_lost']} "
        f"{c['outcome']} fault={c['fault']} {c['pool']} acks_late={c['acks_late']} "
        f"backend={c['backend']} {c['timing']} ({o.seconds:.1f}s)"
    )
    verdict = "; ".join(o.violations) if o.violations else "ok"
    return f"{head}: {verdict} [{', '.join(o.notes)}]"


def render_table(outcomes: list[Outcome]) -> str:
    """Per fault and hold: cases run, how many kept every invariant, which broke."""
    cells: dict[tuple[str, str], list[Outcome]] = defaultdict(list)
    for o in outcomes:
        fault = o.case["fault"]
        if o.case["outcome"] in ("kill_worker", "term_worker", "kill_child", "hard_limit",
                                 "revoke_terminate", "revoke_queued"):  # fmt: skip
            fault = o.case["outcome"]
        cells[(fault, o.case["hold"])].append(o)
    lines = ["| fault / event | hold | cases | kept all | broken invariants (cases) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for (fault, hold), group in sorted(cells.items()):
        broken: Counter[str] = Counter()
        for o in group:
            for inv in {v.split(":", 1)[0] for v in o.violations}:
                broken[inv] += 1
        ok = sum(1 for o in group if not o.violations)
        text = ", ".join(f"{k} ({n})" for k, n in sorted(broken.items())) or "-"
        lines.append(f"| {fault} | {hold} | {len(group)} | {ok} | {text} |")
    failed = [o for o in outcomes if o.violations]
    lines.append("")
    lines.append(f"{len(outcomes)} cases, {len(outcomes) - len(failed)} kept every invariant.")
    lines += ["", "Failing cases:", ""] + [f"- {describe(o)}" for o in failed]
    return "\n".join(lines)
