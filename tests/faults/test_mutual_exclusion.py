"""Many processes race for a few keys; the recorded history must show exclusion and fence order.

Each worker is ``holder.py loop``: it takes one of three keys at random (blocking), holds it
0-5 ms, releases it, and records when it held what (``time.monotonic_ns()``, one clock for the
whole machine). The store's own hold of each grant covers the recorded one, so any overlap
beyond ``limit`` in the records is a real double grant. CI runs a bounded history; set
CELERY_EXCLUSIVE_SLOW=1 for the long one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ..conftest import SLOW, SLOW_ONLY
from ..history import check_history
from .conftest import START_TIMEOUT, SpawnHolder

KEYS = "k0,k1,k2"

needs_slow = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not SLOW, reason=SLOW_ONLY),
]


@pytest.mark.parametrize(
    ("limit", "workers", "count", "run_timeout"),
    [
        pytest.param(1, 4, 150, 30.0, id="lock-ci", marks=pytest.mark.timeout(60)),
        pytest.param(2, 4, 150, 30.0, id="semaphore2-ci", marks=pytest.mark.timeout(60)),
        pytest.param(1, 8, 1500, 200.0, id="lock-slow", marks=needs_slow),
        pytest.param(2, 8, 1500, 200.0, id="semaphore2-slow", marks=needs_slow),
    ],
)
def test_history_of_racing_processes_is_exclusive(
    spawn_holder: SpawnHolder,
    store_url: str,
    prefix: str,
    tmp_path: Path,
    limit: int,
    workers: int,
    count: int,
    run_timeout: float,
) -> None:
    # Given workers that all start racing at once
    outs = [tmp_path / f"worker-{i}.jsonl" for i in range(workers)]
    options = [
        "--keys", KEYS,
        "--limit", str(limit),
        "--count", str(count),
        "--ttl", "10",  # far beyond a 5 ms hold: a lease never expires while held
        "--timeout", "15",
        "--max-hold-ms", "5",
    ]  # fmt: skip
    children = [
        spawn_holder(
            store_url, prefix, "loop", *options, "--seed", str(1000 * limit + i), "--out", str(out)
        )
        for i, out in enumerate(outs)
    ]
    for child in children:
        child.expect("READY", START_TIMEOUT)
    for child in children:
        child.send("GO")

    # When every worker has done its acquisitions
    deadline = time.monotonic() + run_timeout
    for child in children:
        holds, timeouts = child.expect("DONE", max(deadline - time.monotonic(), 0.1)).split()
        assert int(timeouts) == 0, f"a blocking acquire timed out: {child.describe()}"
        assert int(holds) == count
        assert child.wait(10) == 0, child.describe()

    # Then the history has every hold, each released while still ours...
    records = [json.loads(line) for out in outs for line in out.read_text().splitlines() if line]
    assert len(records) == workers * count
    not_ours = [r for r in records if not r["released"]]
    assert not_ours == [], f"release() found the lease gone: {not_ours[:5]}"
    assert {r["key"] for r in records} == set(KEYS.split(","))
    # ...no more than `limit` holds of a key at once, and fences in grant order
    check_history(records, limit=limit)
