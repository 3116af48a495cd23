"""The failover and partition table of docs/guarantees.md, measured on this machine.

    python -m tests.faults.failover_table [--rounds 3] [--lag-ms 20] [--out table.md]

(as root, from the repository root, with the package importable). Each scenario
(:data:`SCENARIOS`) runs ``--rounds`` times with ``replicas`` off and with ``replicas=1``,
on a Sentinel group (master, one replica, three Sentinels) whose replica follows through a
relay that delays its copy by ``--lag-ms`` (what the relay holds when the master dies is
lost, as a dead master's unsent output is), on the same group with no relay (loopback), and
on a Redis Cluster of three masters with a replica each. Then the partition runs (a holder in a
network namespace cut off from a standalone Redis). ``test_failover.py``'s slow test runs it
and checks the invariants.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..topologies import Netns, ReplicatedCluster, SentinelGroup, netns_unavailable_reason
from .failover_runs import (
    Measure,
    OnCluster,
    OnSentinel,
    Plan,
    Topology,
    run_fault,
    run_partition,
    summary,
    table,
)

#: The ttl of the leases held across a fault: longer than a failover, so a lease whose grant
#: survived is kept; the hammer's leases (held a few ms) use 3 s.
HELD_TTL = 10.0


@dataclass(frozen=True)
class Scenario:
    """A plan and the topology it runs on (``sentinel-lag``, ``sentinel``, ``cluster``)."""

    on: str
    plan: Plan


SCENARIOS = (
    Scenario("sentinel-lag", Plan("Sentinel, replica {lag} ms behind: kill master, leases held "
                                  "(replicated)", hold_keys=3, ttl=HELD_TTL)),
    Scenario("sentinel-lag", Plan("Sentinel, replica {lag} ms behind: kill master as soon as a "
                                  "grant is answered", hold_keys=1, kill_on_grant=True,
                                  hammer_workers=3, ttl=HELD_TTL)),
    Scenario("sentinel-lag", Plan("Sentinel, replica {lag} ms behind: kill master under "
                                  "acquire/release loops", hold_keys=0, hammer_workers=4,
                                  replicated_first=False)),
    Scenario("sentinel-lag", Plan("Sentinel, replica {lag} ms behind: pause master (SIGSTOP) "
                                  "past down-after", fault="pause", hold_keys=3,
                                  hammer_workers=3, ttl=HELD_TTL, replicated_first=False)),
    Scenario("sentinel", Plan("Sentinel, loopback: kill master as soon as a grant is answered",
                              hold_keys=1, kill_on_grant=True, hammer_workers=3, ttl=HELD_TTL)),
    Scenario("cluster", Plan("Cluster (3 masters + 3 replicas), loopback: kill a shard's master "
                             "as soon as a grant is answered", hold_keys=1, kill_on_grant=True,
                             hammer_workers=3, ttl=HELD_TTL)),
)  # fmt: skip


def run_matrix(
    rounds: int,
    lag_ms: float,
    directory: Path,
    replicas: Sequence[int] = (0, 1),
    log: Callable[[str], object] = print,
    on: Sequence[str] = ("sentinel-lag", "sentinel", "cluster"),
) -> list[Measure]:
    """Every scenario on the topologies ``on``, ``rounds`` times per ``replicas`` value; one
    Measure per pair."""
    results: list[Measure] = []
    makers: dict[str, Callable[[], tuple[Topology, Callable[[], None]]]] = {
        "sentinel-lag": lambda: _sentinel(lag_ms),
        "sentinel": lambda: _sentinel(0.0),
        "cluster": _cluster,
    }
    for where, make in makers.items():
        if where not in on:
            continue
        scenarios = [s for s in SCENARIOS if s.on == where]
        topology, cleanup = make()
        try:
            for scenario in scenarios:
                for n in replicas:
                    name = scenario.plan.scenario.format(lag=f"{lag_ms:g}")
                    total = Measure(name, n)
                    for i in range(rounds):
                        started = time.monotonic()
                        one = run_fault(topology, scenario.plan, n, directory)
                        total.add(one)
                        took = time.monotonic() - started
                        log(
                            f"{name} replicas={n} round {i + 1}: {took:.0f} s, double holders "
                            f"{one.double_holders}, kept/lost {one.kept}/{one.lost}"
                        )
                    results.append(total)
        finally:
            cleanup()
    return results


def _sentinel(lag_ms: float) -> tuple[Topology, Callable[[], None]]:
    group = SentinelGroup(lag_ms=lag_ms).start()
    return OnSentinel(group), group.cleanup


def _cluster() -> tuple[Topology, Callable[[], None]]:
    cluster = ReplicatedCluster().start()
    return OnCluster(cluster), cluster.cleanup


def run_partitions(rounds: int, ttl: float, directory: Path) -> list[Measure]:
    """The partition runs: link down, then every packet dropped; ``rounds`` each."""
    results = []
    for how in ("down", "loss"):
        total = Measure(f"partition ({how})")
        for _ in range(rounds):
            with Netns() as netns:
                server = netns.redis_server().start()
                try:
                    total.add(run_partition(server, netns, how, ttl, directory))
                finally:
                    server.cleanup()
        results.append(total)
    return results


def partition_table(measures: Sequence[Measure], ttl: float) -> str:
    """A markdown table of the partition runs."""
    rows = [
        "| cut | runs | ttl (s) | holder told (ms after the cut) | key granted to another "
        "(ms after the cut) | told before the grant by (ms) | double holders |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in measures:
        how = next((n for n in m.notes if n.startswith(("link", "netem", "pfifo"))), m.scenario)
        rows.append(
            f"| {how} | {m.rounds} | {ttl:g} | {summary(m.learned_ms)} | {summary(m.usable_ms)} | "
            f"{summary(m.margin_ms)} | {m.double_holders} |"
        )
    return "\n".join(rows)


def machine() -> str:
    """One line naming this machine and the date."""
    cpus = os.cpu_count()
    return (
        f"{time.strftime('%Y-%m-%d')}, {platform.system()} {platform.release()}, {cpus} CPUs, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run everything and print (or write) the tables."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lag-ms", type=float, default=20.0)
    parser.add_argument("--partition-ttl", type=float, default=3.0)
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--on",
        action="append",
        choices=("sentinel-lag", "sentinel", "cluster"),
        help="only these topologies (repeat the option; default: all)",
    )
    parser.add_argument("--no-partitions", action="store_true", help="leave the partitions out")
    args = parser.parse_args(argv)
    directory = Path(tempfile.mkdtemp(prefix="cex-failover-"))
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    topologies = args.on or ("sentinel-lag", "sentinel", "cluster")
    measures = run_matrix(args.rounds, args.lag_ms, directory, log=log, on=topologies)
    text = [f"Measured {machine()}; {args.rounds} run(s) per row.", "", table(measures), ""]
    reason = "--no-partitions" if args.no_partitions else netns_unavailable_reason()
    if reason is None:
        parts = run_partitions(args.rounds, args.partition_ttl, directory)
        text += [partition_table(parts, args.partition_ttl), ""]
    else:
        text += [f"(partition runs left out: {reason})", ""]
    notes = [n for m in measures for n in m.notes]
    text += ["Notes:", *(f"- {n}" for n in notes[:40])]
    output = "\n".join(text) + "\n"
    if args.out:
        Path(args.out).write_text(output)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
