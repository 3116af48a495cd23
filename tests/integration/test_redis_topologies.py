"""The Redis backend on Cluster (keys spread over nodes) and behind Sentinel."""

from __future__ import annotations

import threading
import time

import pytest

from celery_exclusive import BackendError, Store, connect
from celery_exclusive.backends.base import RenewRequest
from celery_exclusive.backends.redis import RedisBackend
from celery_exclusive.renewal import Renewer

from ..servers import RedisCluster, RedisSentinel


def test_cluster_leases_on_many_slots(cluster: RedisCluster, prefix: str) -> None:
    # Given a store on a three-node cluster and keys that land on every node
    renewer = Renewer()
    store = Store(connect(cluster.url, prefix=prefix).backend, renewer=renewer)
    leases = [store.lease(f"customer:{i}", ttl=0.6) for i in range(30)]
    assert all(lease.acquire() for lease in leases)
    # Then a second owner is refused on each, and renewal keeps all of them across nodes
    assert not any(store.lease(f"customer:{i}").acquire() for i in range(30))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert all(lease.held for lease in leases)
        time.sleep(0.1)
    assert renewer.round_trips >= 2
    assert {info.key for info in store.leases()} == {f"customer:{i}" for i in range(30)}
    fences = [lease.fence for lease in leases]
    assert all(lease.release() for lease in leases)
    again = [store.lease(f"customer:{i}") for i in range(30)]
    assert all(lease.acquire() for lease in again)
    assert all(b.fence > a for a, b in zip(fences, again, strict=True))  # type: ignore[operator]
    for lease in again:
        lease.release()
    store.close()


def test_cluster_waiter_is_woken_by_release(cluster: RedisCluster, prefix: str) -> None:
    store = connect(cluster.url, prefix=prefix)
    holder = store.lease("job", ttl=30)
    holder.acquire()
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(store.lease("job").acquire(timeout=10)))
    waiter.start()
    time.sleep(0.1)
    holder.release()
    waiter.join(15)
    assert got == [True]
    store.force_release("job")
    store.close()


def test_sentinel_url_finds_the_master(sentinel: RedisSentinel, prefix: str) -> None:
    store = connect(sentinel.url, prefix=prefix)
    with store.lease("nightly-sync") as lease:
        assert lease.held
        assert not store.lease("nightly-sync").acquire()
        assert [h.token for h in store.holders("nightly-sync")] == [lease.token]
    assert store.holders("nightly-sync") == []
    store.close()


def test_replicas_on_a_cluster_with_none_refuses_grants_and_renewals(
    cluster: RedisCluster, prefix: str
) -> None:
    # Given leases on keys spread over the three nodes, taken without replicas
    plain = connect(cluster.url, prefix=prefix)
    keys = [f"spread-{i}" for i in range(12)]
    leases = [plain.lease(k, ttl=30, auto_renew=False) for k in keys]
    assert all(lease.acquire() for lease in leases)
    # When a store asking for one replica's confirmation renews them, or takes a new key
    durable = RedisBackend.from_url(cluster.url, prefix=prefix, replicas=1, replica_timeout=0.05)
    requests = [RenewRequest(key=lease.key, token=lease.token, ttl=30.0) for lease in leases]
    # Then each step is refused as unconfirmed (the cluster has no replica), per node
    with pytest.raises(BackendError, match="replica"):
        durable.renew(requests)
    with pytest.raises(BackendError, match="replica"):
        connect(durable).lease("new-key", ttl=30, auto_renew=False).acquire()
    assert plain.holders("new-key") == []
    assert all(lease.release() for lease in leases)
    durable.close()
    plain.close()


def test_replicas_behind_sentinel_with_none_refuses_a_grant(
    sentinel: RedisSentinel, prefix: str
) -> None:
    store = connect(sentinel.url, prefix=prefix, replicas=1, replica_timeout=0.05)
    with pytest.raises(BackendError, match="replica"):
        store.lease("job", ttl=30, auto_renew=False).acquire()
    assert store.holders("job") == []
    store.close()
