"""Durable grants (``replicas=N``) and fences that never repeat, on a real master and replica.

A failover is played by hand, so that each step is certain: the replica is cut from its master
(``REPLICAOF NO ONE``: the moment a partition or a promotion leaves it behind), the master takes
what the replica will never see, then dies, and the replica serves as the new master. The
Sentinel- and Cluster-driven failovers are measured in ``tests/faults``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from redis.crc import key_slot

from celery_exclusive import BackendError, ConfigurationError, Store, connect
from celery_exclusive.backends.base import RenewRequest
from celery_exclusive.backends.redis import RedisBackend, parse_url
from celery_exclusive.renewal import Renewer

from ..conftest import started
from ..faults.conftest import LostLog
from ..servers import RedisServer, wait_until
from ..topologies import ReplicatedCluster


class Pair:
    """A master and its replica, both this test's own."""

    def __init__(self, master: RedisServer, replica: RedisServer) -> None:
        self.master = master
        self.replica = replica

    def in_step(self) -> None:
        """Wait until the replica has acknowledged every write the master has made (a replica
        fresh from its first copy acknowledges nothing until its first ``REPLCONF ACK``)."""
        with self.master.client(single_connection_client=True) as c:
            c.set("in-step", 1)  # a write on this connection: WAIT counts who has it
            wait_until(lambda: c.wait(1, 100) == 1, 15, "the replica to catch up")

    def cut(self) -> None:
        """The replica stops following its master: nothing the master takes now reaches it."""
        self.replica.client().replicaof("NO", "ONE")
        wait_until(
            lambda: self.master.client().info("replication")["connected_slaves"] == 0,
            15,
            "the master to see its replica gone",
        )

    def fail_over(self) -> None:
        """The master dies; the replica, promoted, is the new master."""
        self.master.kill()
        self.replica.client().replicaof("NO", "ONE")
        wait_until(
            lambda: self.replica.client().info("replication")["role"] == "master",
            15,
            "the replica to be promoted",
        )


@pytest.fixture
def pair() -> Iterator[Pair]:
    # the master sends its first full copy at once (by default it waits 5 s for more replicas)
    with started(lambda: RedisServer("--repl-diskless-sync-delay", "0")) as master:
        replica = RedisServer("--replicaof", "127.0.0.1", str(master.port))
        with started(lambda: replica):
            p = Pair(master, replica)
            p.in_step()
            yield p


def test_an_acknowledged_grant_survives_the_masters_death(pair: Pair, prefix: str) -> None:
    # Given a lease granted with replicas=1
    store = connect(pair.master.url, prefix=prefix, replicas=1)
    lease = store.lease("job", ttl=30, auto_renew=False)
    assert lease.acquire()
    # When the master dies at once, and its replica takes over
    pair.fail_over()
    # Then the new master knows the holder and refuses a rival
    new = connect(pair.replica.url, prefix=prefix)
    assert [h.token for h in new.holders("job")] == [lease.token]
    assert [h.fence for h in new.holders("job")] == [lease.fence]
    assert not new.lease("job", ttl=30, auto_renew=False).acquire()
    store.close()
    new.close()


def test_a_grant_no_replica_confirmed_is_not_held_and_is_given_back(
    pair: Pair, prefix: str
) -> None:
    store = connect(pair.master.url, prefix=prefix, replicas=1, replica_timeout=0.2)
    pair.cut()
    lease = store.lease("job", ttl=30, auto_renew=False)
    with pytest.raises(BackendError, match="replica"):
        lease.acquire()
    assert not lease.held
    # the master has no holder left: the unconfirmed grant was released
    assert store.holders("job") == []
    store.close()


def test_without_replicas_a_grant_the_replica_never_saw_is_lost_in_a_failover(
    pair: Pair, prefix: str
) -> None:
    """What ``replicas`` is for: the hazard, measured (two holders believe they hold it)."""
    store = connect(pair.master.url, prefix=prefix)
    pair.cut()
    first = store.lease("job", ttl=30, auto_renew=False)
    assert first.acquire()
    pair.fail_over()
    new = connect(pair.replica.url, prefix=prefix)
    second = new.lease("job", ttl=30, auto_renew=False)
    assert second.acquire()  # granted again: the first holder's grant is gone with its master
    assert first.held  # ... and the first still believes it holds it: its master is gone,
    with pytest.raises(BackendError):  # so it learns nothing until its lease's deadline
        first.renew()
    store.close()
    new.close()


def test_fences_never_repeat_across_a_failover(pair: Pair, prefix: str) -> None:
    # Given a key whose counter the replica has (earlier grants, replicated)
    store = connect(pair.master.url, prefix=prefix)
    for _ in range(3):
        lease = store.lease("job", ttl=30, auto_renew=False)
        assert lease.acquire()
        assert lease.release()
    pair.in_step()
    # When the master grants more after the replica was left behind, then dies
    pair.cut()
    given = []
    for _ in range(3):
        lease = store.lease("job", ttl=30, auto_renew=False)
        assert lease.acquire()
        given.append(lease.fence)
        assert lease.release()
    pair.fail_over()
    # Then the new master's next fence is above every fence the old one gave
    new = connect(pair.replica.url, prefix=prefix)
    after = new.lease("job", ttl=30, auto_renew=False)
    assert after.acquire()
    assert after.fence is not None
    assert after.fence > max(f for f in given if f is not None)
    store.close()
    new.close()


def test_a_renewal_no_replica_confirmed_is_an_error_not_a_loss(pair: Pair, prefix: str) -> None:
    backend = RedisBackend.from_url(pair.master.url, prefix=prefix, replicas=1, replica_timeout=0.5)
    store = connect(backend)
    lease = store.lease("job", ttl=30, auto_renew=False)
    assert lease.acquire()
    request = RenewRequest(key="job", token=lease.token, ttl=30.0)
    assert backend.renew([request]) == [True]
    pair.cut()
    # Not confirmed: the renewer retries until the lease's deadline; it is not told "lost"
    with pytest.raises(BackendError, match="replica"):
        backend.renew([request])
    store.close()


def test_replicas_on_a_redis_without_replicas_refuses_every_grant(
    redis_url: str, prefix: str
) -> None:
    store = connect(redis_url, prefix=prefix, replicas=1, replica_timeout=0.05)
    with pytest.raises(BackendError, match="replica"):
        store.lease("job", ttl=5, auto_renew=False).acquire()
    assert store.holders("job") == []
    store.close()


def test_a_grant_refused_because_held_needs_no_replica(redis_url: str, prefix: str) -> None:
    plain = connect(redis_url, prefix=prefix)
    holder = plain.lease("job", ttl=30, auto_renew=False)
    assert holder.acquire()
    durable = connect(redis_url, prefix=prefix, replicas=1, replica_timeout=0.05)
    assert not durable.lease("job", ttl=30, auto_renew=False).acquire()  # refused, no error
    holder.release()
    plain.close()
    durable.close()


@pytest.mark.parametrize(
    ("url", "options", "replicas", "timeout"),
    [
        ("redis://h:6379/0", {}, 0, 1.0),
        ("redis://h:6379/0?socket_timeout=0.5", {}, 0, 1.0),  # no replicas: no WAIT to fit
        ("redis://h:6379/0?replicas=2&replica_timeout=0.5", {}, 2, 0.5),
        ("redis://h:6379/0?replicas=2", {"replicas": 1}, 1, 1.0),
        ("redis+sentinel://h:26379/mymaster/0?replicas=1", {}, 1, 1.0),
        ("redis+cluster://h:7000?replicas=1&replica_timeout=2", {}, 1, 2.0),
    ],
)
def test_replicas_in_the_url_and_as_a_keyword(
    url: str, options: dict[str, object], replicas: int, timeout: float
) -> None:
    parsed = parse_url(url, **options)
    assert (parsed.replicas, parsed.replica_timeout) == (replicas, timeout)


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:6379/0?replicas=-1",
        "redis://h:6379/0?replicas=one",
        "redis://h:6379/0?replicas=1&replica_timeout=0",
        "redis://h:6379/0?replicas=1&replica_timeout=20",  # longer than the socket timeout
    ],
)
def test_bad_replica_options_are_refused_before_connecting(url: str) -> None:
    with pytest.raises(ConfigurationError, match="replica"):
        parse_url(url)


def test_a_client_given_to_connect_takes_replicas_too(pair: Pair, prefix: str) -> None:
    store = connect(redis.Redis(port=pair.master.port), prefix=prefix, replicas=1)
    assert store.lease("job", ttl=5, auto_renew=False).acquire()
    with pytest.raises(ConfigurationError, match="replicas"):
        connect(redis.Redis(port=pair.master.port), replicas=True)
    quick = redis.Redis(port=pair.master.port, socket_timeout=0.5)
    connect(quick).close()  # no replicas: the socket timeout has no WAIT to fit
    with pytest.raises(ConfigurationError, match="replica_timeout"):
        connect(quick, replicas=1)
    store.close()


def test_a_lease_whose_renewals_no_replica_confirms_is_lost_before_its_deadline(
    pair: Pair, prefix: str
) -> None:
    # Given a renewed lease confirmed by the replica (ttl 2 s)
    renewer = Renewer()
    store = Store(
        connect(pair.master.url, prefix=prefix, replicas=1, replica_timeout=0.3).backend,
        renewer=renewer,
    )
    lost = LostLog()
    lease = store.lease("job", ttl=2, on_lost=lost)
    assert lease.acquire()
    wait_until(lambda: renewer.round_trips >= 1, 10, "a first confirmed renewal")
    # When the replica stops confirming (the master still renews the key)
    cut_at = time.monotonic()
    pair.cut()
    # Then the lease is reported lost within its ttl of the cut: a promoted replica, which
    # has only the confirmed expiry, could free the key no earlier than that
    wait_until(lost.event.is_set, 10, "the lease to be reported lost")
    assert lost.at[0] - cut_at < 2.0
    assert not lease.held
    assert store.holders("job"), "the master still holds it: only unconfirmed"
    lease.detach()
    store.close()


def test_a_cluster_store_with_replicas_follows_a_failover(prefix: str) -> None:
    """Grants confirmed by replicas go to each node's own client: after a shard's failover
    the store must learn the new slot map, as redis-py's usual path does."""
    cluster = ReplicatedCluster()
    with started(lambda: cluster):
        store = connect(cluster.url, prefix=prefix, replicas=1, replica_timeout=0.5)
        key = "shard-key"
        first = store.lease(key, ttl=30, auto_renew=False)
        assert first.acquire()
        assert first.release()
        # When the master of the key's shard dies, its replica takes over, and the old master
        # comes back as the new master's replica (so one replica can confirm again)
        slot = key_slot(f"{prefix}:{{{key}}}:lease".encode())
        old = cluster.owner(slot)
        cluster.kill(old)
        cluster.wait_promoted(slot, old)
        cluster.restart_as_replica(old)
        # Then the same store grants the key again, confirmed, on the new master

        def granted() -> bool:
            lease = store.lease(key, ttl=30, auto_renew=False)
            try:
                return lease.acquire() and lease.release()
            except BackendError:
                return False

        wait_until(granted, 30, "a confirmed grant on the shard's new master")
        store.close()
