"""Failover and partition runs: real faults on real servers, and what the holders saw.

One run (:func:`run_fault`) starts worker processes (``failover_worker.py``): a *holder* that
takes some keys and keeps them across the fault, and *hammer* workers that take, hold and
release keys in a loop. A *prober* thread in this process tries, every 25 ms, to take the
holder's keys (a grant is recorded and released at once) and a fresh key each time (the first
fresh grant after the fault says when the store takes grants again). Then the fault: the
master is killed (SIGKILL) or paused (SIGSTOP) until a replica is promoted. Every hold is a
record of :mod:`tests.history` (``key``, ``start``, ``end``, ``fence``, ``id``) on the shared
monotonic clock, and :func:`analyse` counts in them:

- **double holders**: two holds of one key that overlap (two processes believed they held it);
- **repeated fences**: a fence granted twice on one key (a grant lost in the failover, and its
  fence handed out again by the promoted replica);
- **learned**: for a hold that spanned the fault and was reported lost, the time from the
  fault until its holder was told (``on_lost``, or ``held`` read False);
- **usable again**: the time from the fault until the first new grant.

:func:`run_partition` does the same for one holder in a network namespace cut off from a
standalone Redis (``tests.topologies.Netns``) and healed: rule 3 wants the holder to be told
before anyone else is granted its key.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

from redis.crc import key_slot

from celery_exclusive import connect
from celery_exclusive.exceptions import BackendError, ConfigurationError

from ..servers import RedisServer, wait_until
from ..topologies import Netns, ReplicatedCluster, SentinelGroup
from .conftest import HolderProcess

WORKER = str(Path(__file__).with_name("failover_worker.py"))

#: Every run's clients give up on a silent server after this many seconds (the default, 10 s,
#: would make each run wait that long on a paused master).
SOCKET_TIMEOUT = 1.0

#: With ``replicas``: how long a grant or renewal waits for its confirmation (the store
#: wants it shorter than the socket timeout).
REPLICA_TIMEOUT = 0.5

#: How often the prober tries the held keys and a fresh key.
PROBE_EVERY = 0.025

Record = dict[str, Any]


def store_url(base: str, replicas: int = 0) -> str:
    """``base`` with the runs' socket and replica timeouts, and ``?replicas=N`` when
    ``replicas`` > 0."""
    # replica_timeout even without replicas: its default (1 s) must be below socket_timeout.
    query: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "replica_timeout": REPLICA_TIMEOUT,
    }
    if replicas:
        query["replicas"] = replicas
    return f"{base}{'&' if '?' in base else '?'}{urlencode(query)}"


def replicas_supported() -> bool:
    """Whether this build's Redis store takes the ``replicas`` option."""
    try:
        connect("redis://127.0.0.1:1/0?replicas=1")
    except ConfigurationError:
        return False
    except BackendError:
        return True
    return True


# -- worker processes -------------------------------------------------------------------------


class Worker(HolderProcess):
    """One ``failover_worker.py`` child (optionally inside a network namespace)."""

    def __init__(self, args: list[str], stderr_path: Path, netns: Netns | None = None) -> None:
        argv = [sys.executable, WORKER, *args]
        super().__init__(args, stderr_path, netns.command(*argv) if netns is not None else argv)


@contextlib.contextmanager
def workers(directory: Path) -> Iterator[list[Worker]]:
    """A list to put :class:`Worker` objects in; each is killed when the block ends."""
    started: list[Worker] = []
    try:
        yield started
    finally:
        for worker in started:
            worker.close()


def spawn(
    started: list[Worker],
    directory: Path,
    url: str,
    prefix: str,
    mode: str,
    *options: str,
    netns: Netns | None = None,
) -> Worker:
    """Start a worker, remember it in ``started``."""
    worker = Worker(
        [url, prefix, mode, *options], directory / f"worker-{len(started)}.stderr", netns
    )
    started.append(worker)
    return worker


# -- what a run saw ---------------------------------------------------------------------------


@dataclass
class Measure:
    """What one scenario's runs saw (times in ms)."""

    scenario: str
    replicas: int = 0
    rounds: int = 0
    holds: int = 0
    grants_just_before: int = 0  # grants in the 100 ms before the fault
    double_holders: int = 0  # holds someone else was granted into (the key's two holders)
    max_overlap_ms: float = 0.0  # the longest time such a hold went on after that grant
    repeated_fences: int = 0
    fence_regressions: int = 0
    kept: int = 0  # leases held across the fault and still held after it
    lost: int = 0  # leases held across the fault and reported lost
    learned_ms: list[float] = field(default_factory=list)
    usable_ms: list[float] = field(default_factory=list)
    failover_ms: list[float] = field(default_factory=list)
    told_late: int = 0  # a holder told of its loss after someone else was granted the key
    margin_ms: list[float] = field(default_factory=list)  # that grant minus the loss report
    errors: int = 0
    notes: list[str] = field(default_factory=list)

    def add(self, other: Measure) -> None:
        """Add another round's counts and times to these."""
        self.rounds += other.rounds
        for name in (
            "holds",
            "grants_just_before",
            "double_holders",
            "repeated_fences",
            "fence_regressions",
            "kept",
            "lost",
            "told_late",
            "errors",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_overlap_ms = max(self.max_overlap_ms, other.max_overlap_ms)
        for name in ("learned_ms", "usable_ms", "failover_ms", "margin_ms"):
            getattr(self, name).extend(getattr(other, name))
        self.notes.extend(n for n in other.notes if n not in self.notes)


def overlapping_pairs(records: Sequence[Record]) -> list[tuple[Record, Record, int]]:
    """Pairs of holds of one key that overlap in time, with the overlap in ns."""
    by_key: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    pairs = []
    for holds in by_key.values():
        holds.sort(key=lambda r: r["start"])
        active: list[Record] = []
        for record in holds:
            active = [a for a in active if a["end"] > record["start"]]
            for other in active:
                overlap = min(other["end"], record["end"]) - record["start"]
                pairs.append((other, record, overlap))
            active.append(record)
    return pairs


def repeated_fences(records: Sequence[Record]) -> int:
    """How many grants carried a fence already granted on the same key."""
    counts = Counter((r["key"], r["fence"]) for r in records)
    return sum(n - 1 for n in counts.values() if n > 1)


def fence_regressions(records: Sequence[Record]) -> int:
    """Holds whose fence is lower than that of a hold of the same key that started earlier."""
    by_key: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_key[record["key"]].append(record)
    count = 0
    for holds in by_key.values():
        highest = -1
        for record in sorted(holds, key=lambda r: r["start"]):
            if record["fence"] < highest:
                count += 1
            highest = max(highest, record["fence"])
    return count


def analyse(measure: Measure, records: Sequence[Record], fault_ns: int) -> None:
    """Count double holders, repeated fences, and when the store took grants again."""
    measure.holds += len(records)
    measure.grants_just_before += sum(
        1 for r in records if fault_ns - 100_000_000 <= r["start"] <= fault_ns
    )
    # A hold others were granted into: its holder and they both believed they held the key.
    overrun: dict[int, tuple[Record, int]] = {}
    for first, second, _overlap in overlapping_pairs(records):
        earlier, later = (first, second) if first["start"] <= second["start"] else (second, first)
        seen = overrun.get(id(earlier))
        overrun[id(earlier)] = (earlier, min(later["start"], seen[1] if seen else later["start"]))
    measure.double_holders += len(overrun)
    for hold, first_rival in overrun.values():
        span = (hold["end"] - first_rival) / 1e6
        measure.max_overlap_ms = max(measure.max_overlap_ms, span)
        measure.notes.append(
            f"{hold['id']} (fence {hold['fence']}) still believed it held {hold['key']!r} "
            f"{span:.0f} ms after another was granted it"
        )
    measure.repeated_fences += repeated_fences(records)
    measure.fence_regressions += fence_regressions(records)
    for record in records:
        if record["start"] < fault_ns < record["end"] and record.get("lost_at"):
            measure.lost += 1
            measure.learned_ms.append((record["lost_at"] - fault_ns) / 1e6)
            # Rule 3: nobody else may be granted the key before this holder was told.
            rivals = [
                r["start"]
                for r in records
                if r["key"] == record["key"] and r is not record and r["start"] > record["start"]
            ]
            if rivals:
                margin = (min(rivals) - record["lost_at"]) / 1e6
                measure.margin_ms.append(margin)
                measure.told_late += margin < 0


# -- topologies, seen the same way ------------------------------------------------------------


class Topology(Protocol):
    """What a run needs of a topology that can fail over."""

    url: str

    def victim(self, key: str) -> RedisServer: ...
    def replica_of(self, victim: RedisServer) -> RedisServer: ...
    def wait_promoted(self, victim: RedisServer, key: str) -> None: ...
    def wait_demoted(self, victim: RedisServer) -> None: ...
    def restore(self, victim: RedisServer) -> None: ...
    def on_victim(self, victim: RedisServer, names: Sequence[str]) -> list[str]: ...


class OnSentinel:
    """:class:`SentinelGroup` seen as a :class:`Topology`."""

    def __init__(self, group: SentinelGroup) -> None:
        self.group = group
        self.url = group.url

    def victim(self, key: str) -> RedisServer:
        return self.group.master()

    def replica_of(self, victim: RedisServer) -> RedisServer:
        return next(n for n in self.group.nodes if n is not victim)

    def wait_promoted(self, victim: RedisServer, key: str) -> None:
        self.group.wait_promoted(victim)

    def wait_demoted(self, victim: RedisServer) -> None:
        self.group.wait_demoted(victim)

    def restore(self, victim: RedisServer) -> None:
        if victim.proc is not None and victim.proc.poll() is None:
            self.group.wait_demoted(victim)
        else:
            self.group.restart_as_replica(victim)

    def on_victim(self, victim: RedisServer, names: Sequence[str]) -> list[str]:
        return list(names)


class OnCluster:
    """:class:`ReplicatedCluster` seen as a :class:`Topology` (the victim: one shard's
    master)."""

    def __init__(self, cluster: ReplicatedCluster) -> None:
        self.cluster = cluster
        self.url = cluster.url

    def victim(self, key: str) -> RedisServer:
        return self.cluster.owner(key_slot(key.encode()))

    def replica_of(self, victim: RedisServer) -> RedisServer:
        victim_id = self.cluster.node_id(victim)
        for node in self.cluster.nodes:
            if node is victim or node.proc is None or node.proc.poll() is not None:
                continue
            with node.client() as c:
                nodes = c.execute_command("CLUSTER NODES")
            text = nodes.decode() if isinstance(nodes, bytes) else str(nodes)
            for line in text.splitlines():
                if "myself" in line and victim_id in line:
                    return node
        raise LookupError(f"no replica of port {victim.port}")

    def wait_promoted(self, victim: RedisServer, key: str) -> None:
        self.cluster.wait_promoted(key_slot(key.encode()), victim)

    def wait_demoted(self, victim: RedisServer) -> None:
        wait_until(self.cluster.healthy, 30, "the old master to rejoin as a replica", 0.05)

    def restore(self, victim: RedisServer) -> None:
        if victim.proc is not None and victim.proc.poll() is None:
            self.wait_demoted(victim)
        else:
            self.cluster.restart_as_replica(victim)

    def on_victim(self, victim: RedisServer, names: Sequence[str]) -> list[str]:
        slots = self._slots(victim)
        return [n for n in names if key_slot(n.encode()) in slots]

    def _slots(self, victim: RedisServer) -> set[int]:
        with victim.client() as c:
            ranges = c.execute_command("CLUSTER SLOTS")
        return {
            s
            for start, end, primary, *_ in ranges
            if int(primary[1]) == victim.port
            for s in range(start, end + 1)
        }


def wait_replicated(master: RedisServer, replica: RedisServer, timeout: float = 10.0) -> None:
    """Wait until ``replica`` has applied everything ``master`` has written so far."""
    with master.client() as c:
        offset = int(c.info("replication")["master_repl_offset"])

    def caught_up() -> bool:
        with replica.client() as c:
            return int(c.info("replication").get("slave_repl_offset", -1)) >= offset

    wait_until(caught_up, timeout, f"port {replica.port} to catch up with {master.port}")


# -- the prober -------------------------------------------------------------------------------


class Prober:
    """A thread that tries the held keys and a fresh key every :data:`PROBE_EVERY` s."""

    def __init__(self, url: str, prefix: str, keys: Sequence[str], fresh: Sequence[str]) -> None:
        self.store = connect(url, prefix=prefix)
        self.keys = list(keys)
        self.fresh = list(fresh)
        self.records: list[Record] = []
        self.fresh_grants: list[tuple[int, int]] = []  # (asked, granted) of each fresh key
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="prober", daemon=True)

    def __enter__(self) -> Prober:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.store.close()

    def _run(self) -> None:
        for i in range(1_000_000):
            if self.stop.wait(PROBE_EVERY):
                return
            for key in self.keys:
                self._try(key, f"probe:{i}")
            if self.fresh:
                # A new key each time (a grant whose answer was lost cannot block the next),
                # on the victim's slots: a suffix of its own would move it to another shard.
                lease = self.store.lease(self.fresh[i % len(self.fresh)], ttl=5)
                asked = time.monotonic_ns()
                with contextlib.suppress(BackendError):
                    if lease.acquire():
                        self.fresh_grants.append((asked, time.monotonic_ns()))
                        lease.release()

    def _try(self, key: str, rid: str) -> None:
        lease = self.store.lease(key, ttl=5, auto_renew=False)
        try:
            if not lease.acquire():
                return
            start = time.monotonic_ns()
            end = time.monotonic_ns()
            self.records.append(
                {"key": key, "start": start, "end": end, "fence": lease.fence, "id": rid}
            )
            lease.release()
        except BackendError:
            self.errors += 1


# -- one run ----------------------------------------------------------------------------------


@dataclass
class Plan:
    """The shape of one run."""

    scenario: str
    fault: str = "kill"  # "kill" (SIGKILL) or "pause" (SIGSTOP until promoted, then SIGCONT)
    hold_keys: int = 3  # keys the holder keeps across the fault
    hammer_workers: int = 0
    hammer_keys: int = 8
    ttl: float = 3.0
    hammer_ttl: float = 3.0
    max_hold_ms: float = 5.0
    before: float = 1.0  # seconds of load before the fault
    after: float = 2.0  # seconds of load after the promotion (after the demotion: pause)
    replicated_first: bool = True  # wait for the replica to catch up before the fault
    kill_on_grant: bool = False  # the holder starts late; the fault as soon as it holds


def run_fault(topology: Topology, plan: Plan, replicas: int, directory: Path) -> Measure:
    """One run of ``plan`` on ``topology``; the topology is healed (old master a replica)
    at the end."""
    prefix = f"cex-fo-{uuid.uuid4().hex[:8]}"
    url = store_url(topology.url, replicas)
    measure = Measure(plan.scenario, replicas, rounds=1)
    if isinstance(topology, OnSentinel):  # the relay again, should the Sentinels have cut it
        topology.group.reroute(topology.group.replica())
    seed_key = "hold-0"
    victim = topology.victim(seed_key)
    names = [f"{kind}-{i}" for kind in ("hold", "ham") for i in range(400)]
    # The prober's fresh keys, each taken once: enough on the victim for every probe of a run
    names += [f"fresh-{i}" for i in range(6000)]
    mine = topology.on_victim(victim, names)
    hold_keys = [n for n in mine if n.startswith("hold-")][: plan.hold_keys]
    hammer_keys = [n for n in mine if n.startswith("ham-")][: plan.hammer_keys]
    fresh = [n for n in mine if n.startswith("fresh-")]
    out = directory / f"hammer-{prefix}.jsonl"
    holder_records: list[Record] = []
    got: dict[str, tuple[int, int]] = {}
    with workers(directory) as started:

        def start_holder() -> Worker:
            holder = spawn(
                started,
                directory,
                url,
                prefix,
                "hold",
                "--keys",
                ",".join(hold_keys),
                "--ttl",
                str(plan.ttl),
            )
            for _ in hold_keys:
                key, fence, at = holder.expect("ACQUIRED", 30).split()
                got[key] = (int(fence), int(at))
            return holder

        holder = start_holder() if hold_keys and not plan.kill_on_grant else None
        hammers = [
            spawn(
                started,
                directory,
                url,
                prefix,
                "hammer",
                "--keys",
                ",".join(hammer_keys),
                "--ttl",
                str(plan.hammer_ttl),
                "--max-hold-ms",
                str(plan.max_hold_ms),
                "--out",
                str(out),
                "--seed",
                str(i),
                "--timeout",
                "2",
            )
            for i in range(plan.hammer_workers)
        ]
        for worker in hammers:
            worker.expect("READY", 30)
        for worker in hammers:
            worker.send("GO")
        with Prober(url, prefix, hold_keys, fresh) as prober:
            time.sleep(plan.before)  # the load runs before the fault (a duration, not a wait)
            replica = topology.replica_of(victim)
            if isinstance(topology, OnSentinel) and topology.group.lag_ms:
                assert topology.group.lagging(replica), "the replica bypasses its relay"
            if plan.kill_on_grant:
                holder = start_holder()  # the fault comes as soon as it says it holds them
            elif plan.replicated_first:
                wait_replicated(victim, replica)
            _strike(victim, plan.fault)
            # After the signal landed (a killed master reaped): anything asked for from now on
            # was asked of a dead or frozen master.
            fault = time.monotonic_ns()
            try:
                topology.wait_promoted(victim, seed_key)
            finally:
                if plan.fault == "pause":
                    _strike(victim, "resume")
            measure.failover_ms.append((time.monotonic_ns() - fault) / 1e6)
            # The old master back as a replica: by the Sentinels (paused), else restarted now
            # (under replicas=1 with one replica, nothing is granted until it is back).
            topology.restore(victim)
            wait_until(
                lambda: prober.fresh_grants and prober.fresh_grants[-1][0] > fault,
                30,
                "a fresh grant after the fault",
            )
            time.sleep(plan.after)  # load and probes after the failover (a duration)
            for worker in hammers:
                worker.send("STOP")
            for worker in hammers:
                _holds, errors = worker.expect("DONE", 30).split()
                measure.errors += int(errors)
            if holder is not None:
                holder.expect("HOLDING", 10)
                holder_records = _finish_holder(holder, got, measure)
        measure.errors += prober.errors
        # The first grant asked for after the fault (one asked before may be answered after)
        after = [granted for asked, granted in prober.fresh_grants if asked > fault]
        measure.usable_ms.append((after[0] - fault) / 1e6)
        records = prober.records + holder_records
    if out.exists():
        records += [json.loads(line) for line in out.read_text().splitlines() if line]
    analyse(measure, records, fault)
    return measure


def _strike(victim: RedisServer, how: str) -> None:
    """SIGKILL (``kill``), SIGSTOP (``pause``) or SIGCONT (``resume``) the victim."""
    assert victim.proc is not None
    if how == "kill":
        victim.proc.kill()
        victim.proc.wait(10)
    else:
        victim.proc.send_signal(signal.SIGSTOP if how == "pause" else signal.SIGCONT)


def _finish_holder(
    holder: Worker, got: dict[str, tuple[int, int]], measure: Measure
) -> list[Record]:
    """Ask the holder what it holds, release, and turn its lines into records."""
    holder.send("STATUS")
    held = {}
    for _ in got:
        key, value = holder.expect("HELD", 10).split()
        held[key] = value == "True"
    holder.expect("STATUS_DONE", 10)
    holder.send("RELEASE")
    released = {}
    for _ in got:
        key, _result, at = holder.expect("RELEASED", 20).split()
        released[key] = int(at)
    lost_at: dict[str, int] = {}
    for line in holder.seen:
        word, *rest = line.split(" ", 3)
        if word in ("LOST", "NOT_HELD"):
            when = int(rest[1])
            lost_at[rest[0]] = min(lost_at.get(rest[0], when), when)
    measure.kept += sum(held.values())
    records = []
    for key, (fence, start) in got.items():
        end = lost_at.get(key, released[key])
        records.append(
            {
                "key": key,
                "start": start,
                "end": end,
                "fence": fence,
                "id": f"holder:{key}",
                "lost_at": lost_at.get(key),
            }
        )
    return records


# -- a partition ------------------------------------------------------------------------------


def run_partition(
    redis_server: RedisServer, netns: Netns, how: str, ttl: float, directory: Path
) -> Measure:
    """A holder in ``netns`` holds a key on ``redis_server`` (bound to ``netns.host_ip``),
    then is cut off (``how``: "down" or "loss"); the prober here takes the key once it is
    free; then the link heals and the holder must find its lease gone and take it again."""
    measure = Measure(f"partition ({how})", rounds=1)
    prefix = f"cex-part-{uuid.uuid4().hex[:8]}"
    inside = store_url(f"redis://{netns.host_ip}:{redis_server.port}/0")
    here = store_url(redis_server.url)
    with workers(directory) as started:
        holder = spawn(
            started,
            directory,
            inside,
            prefix,
            "hold",
            "--keys",
            "job",
            "--ttl",
            str(ttl),
            netns=netns,
        )
        _key, fence, at = holder.expect("ACQUIRED", 30).split()
        holder.expect("HOLDING", 10)
        records: list[Record] = []
        store = connect(here, prefix=prefix)
        try:
            rival = store.lease("job", ttl=30)
            assert not rival.acquire(), "the key was free while the holder held it"
            netns.cut(how)
            cut = time.monotonic_ns()
            measure.notes.append(netns.cut_how or how)
            wait_until(rival.acquire, 3 * ttl + 10, "the rival to get the key", step=0.005)
            granted = time.monotonic_ns()
            lost_line = holder.expect("LOST", 10)
            lost = int(lost_line.split()[1])
            records.append(
                {
                    "key": "job",
                    "start": int(at),
                    "end": lost,
                    "fence": int(fence),
                    "id": "partitioned",
                    "lost_at": lost,
                }
            )
            measure.usable_ms.append((granted - cut) / 1e6)
            netns.heal()
            holder.send("STATUS")
            measure.kept += holder.expect("HELD", 20).split()[1] == "True"
            holder.send("RELEASE")
            measure.notes.append("release after heal: " + holder.expect("RELEASED", 20).split()[1])
            end = time.monotonic_ns()
            records.append(
                {"key": "job", "start": granted, "end": end, "fence": rival.fence, "id": "rival"}
            )
            assert rival.held, f"the rival lost the key: {rival.lost_reason}"
            rival.release()
            holder.send("ACQUIRE")
            again = holder.expect("ACQUIRE", 20).split()
            measure.notes.append(f"holder takes it again after heal: {again[1]}")
            if again[1] == "True":
                records.append(
                    {
                        "key": "job",
                        "start": time.monotonic_ns(),
                        "end": time.monotonic_ns(),
                        "fence": int(again[2]),
                        "id": "again",
                    }
                )
        finally:
            store.close()
        holder.send("EXIT")
    analyse(measure, records, cut)
    return measure


# -- the table --------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> str:
    """``median (min-max)`` of ``values`` in whole ms, or ``-``."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


COLUMNS = (
    "scenario",
    "replicas",
    "runs",
    "holds",
    "grants <100 ms before",
    "double holders",
    "repeated fences",
    "kept / lost",
    "told of loss (ms)",
    "failover (ms)",
    "usable again (ms)",
)


def table(measures: Sequence[Measure]) -> str:
    """A markdown table of ``measures`` (times: median (min-max) over the runs)."""
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for m in measures:
        doubles = str(m.double_holders)
        if m.double_holders:
            doubles += f" (max {m.max_overlap_ms:.0f} ms)"
        cells = [
            m.scenario,
            str(m.replicas) if m.replicas else "off",
            str(m.rounds),
            str(m.holds),
            str(m.grants_just_before),
            doubles,
            str(m.repeated_fences),
            f"{m.kept} / {m.lost}",
            summary(m.learned_ms),
            summary(m.failover_ms),
            summary(m.usable_ms),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
