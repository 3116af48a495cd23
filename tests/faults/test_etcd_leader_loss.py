"""etcd's leader is killed (SIGKILL) under load and restarted; the history stays exclusive.

A private 3-member cluster on loopback. Worker processes (``tests/etcd.py``, run as a script)
take one of three keys at a time, hold it up to 50 ms and release it, counting the errors a
cluster without a leader answers with instead of dying of them, and record every hold that
was still held (by its local deadline) when it ended. Meanwhile the test kills the leader,
waits for a new one, restarts the killed member and waits for it to rejoin. The records must
show no two holds of a key at once and fences rising in grant order across the leader
changes (etcd's revision), and the store must have granted leases after each kill. CI runs
one kill in about 15 s; CELERY_EXCLUSIVE_SLOW=1 runs five over a minute.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ..conftest import SLOW, SLOW_ONLY
from ..etcd import EtcdCluster
from ..history import check_history
from . import conftest as faults
from .conftest import START_TIMEOUT, SpawnHolder

KEYS = "k0,k1,k2"
WORKERS = 4

needs_slow = [pytest.mark.slow, pytest.mark.skipif(not SLOW, reason=SLOW_ONLY)]


@pytest.mark.parametrize(
    ("kills", "seconds"),
    [
        pytest.param(1, 10.0, id="one-kill-ci", marks=pytest.mark.timeout(120)),
        pytest.param(5, 60.0, id="five-kills-slow", marks=[*needs_slow, pytest.mark.timeout(400)]),
    ],
)
def test_killing_the_leader_keeps_holds_exclusive_and_fences_rising(
    etcd_cluster: EtcdCluster,
    spawn_holder: SpawnHolder,
    monkeypatch: pytest.MonkeyPatch,
    prefix: str,
    tmp_path: Path,
    kills: int,
    seconds: float,
) -> None:
    # Given workers racing for three keys on a 3-member cluster (URL naming every member)
    monkeypatch.setattr(faults, "HOLDER", str(Path(__file__).parents[1] / "etcd.py"))
    outs = [tmp_path / f"worker-{i}.jsonl" for i in range(WORKERS)]
    workers = [
        spawn_holder(etcd_cluster.url, prefix, "worker", KEYS, str(seconds), str(out), str(i))
        for i, out in enumerate(outs)
    ]
    for worker in workers:
        worker.expect("READY", START_TIMEOUT)
    for worker in workers:
        worker.send("GO")
    began = time.monotonic()

    # When the leader is killed `kills` times, each time restarted once a new leader leads
    kill_times: list[int] = []
    gap = seconds / (kills + 1)
    for n in range(kills):
        _sleep_until(began + gap * (n + 1) - 1.0)
        leader = etcd_cluster.leader()
        kill_times.append(time.monotonic_ns())
        leader.kill()
        others = [m for m in etcd_cluster.members if m is not leader]
        new = etcd_cluster.leader()
        assert new in others
        leader.start(etcd_cluster.binary)
        etcd_cluster.wait_healthy()

    # Then every worker ends on time...
    deadline = began + seconds + 60
    records = []
    errors = 0
    for worker, out in zip(workers, outs, strict=True):
        holds, failed, _lost = worker.expect("DONE", max(deadline - time.monotonic(), 1)).split()
        assert worker.wait(10) == 0, worker.describe()
        errors += int(failed)
        records += [json.loads(line) for line in out.read_text().splitlines() if line]
        assert int(holds) > 0, worker.describe()
    # ...leases were granted after each kill (the store recovered)...
    for killed_at in kill_times:
        after = [r for r in records if r["start"] > killed_at]
        assert after, f"no hold began after the kill at {killed_at}; {errors} errors"
    # ...and no two holds of a key overlapped, fences rising in grant order
    print(f"{len(records)} holds, {errors} store errors, {kills} leader kills")  # for -s runs
    assert len(records) >= 50, (len(records), errors)
    check_history(records)


def _sleep_until(moment: float) -> None:
    """Sleep until ``moment`` (monotonic); a bounded number of short sleeps."""
    for _ in range(10_000):
        remaining = moment - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 0.1))
