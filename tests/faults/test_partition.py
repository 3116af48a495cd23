"""A holder cut off from its Redis by the network, then healed.

The holder runs in a network namespace of the test's own (``tests.topologies.Netns``), joined
to this host by a veth pair; the Redis listens on 127.0.0.1 and on the host's end of the veth.
The cut is either the link going down or every packet dropped (netem ``loss 100%``, else a
queue of length 0). Rule 3 (docs/guarantees.md): the holder is told it lost the lease before
anyone else is granted it. Needs root and iproute2: in CI a missing one fails the test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import started, unavailable
from ..servers import RedisServer
from ..topologies import Netns, netns_unavailable_reason
from .failover_runs import run_partition
from .failover_table import partition_table

pytestmark = pytest.mark.timeout(120)

TTL = 2.0


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A network namespace with a veth pair, removed at the end whatever happens."""
    reason = netns_unavailable_reason()
    if reason is not None:
        unavailable(reason)
    namespace = Netns()
    try:
        with namespace:
            yield namespace
    finally:
        assert not namespace.exists(), f"namespace {namespace.name} left behind"


@pytest.fixture
def reachable_redis(netns: Netns) -> Iterator[RedisServer]:
    """A Redis on 127.0.0.1 and on the host's end of the veth."""
    with started(netns.redis_server) as server:
        yield server


@pytest.mark.parametrize("how", ["down", "loss"])
def test_partitioned_holder_is_told_before_another_gets_the_key(
    netns: Netns, reachable_redis: RedisServer, tmp_path: Path, how: str
) -> None:
    # Given a holder in the namespace holding "job" (ttl 2 s), cut off from its Redis
    m = run_partition(reachable_redis, netns, how, TTL, tmp_path)
    print(partition_table([m], TTL), *m.notes, sep="\n")
    # Then it was told before the key went to the rival here (rule 3), by at least the
    # margin the renewal scheduler keeps (min(ttl / 10, 0.5) s) less scheduling noise
    assert m.lost == 1 and m.told_late == 0, m
    assert m.margin_ms[0] > 0, m
    assert m.double_holders == 0, m.notes
    # and the key came free by expiry: no sooner than the holder's last renewal + ttl could
    # allow, within ttl plus a loaded machine's slack
    assert 0 < m.usable_ms[0] < (TTL + 5) * 1000, m
    assert m.learned_ms[0] < m.usable_ms[0], m
    # After the heal its lease stays lost, its release frees nothing, and it can take the
    # key again once the rival let it go
    assert m.kept == 0, m
    assert "release after heal: False" in m.notes, m.notes
    assert "holder takes it again after heal: True" in m.notes, m.notes
