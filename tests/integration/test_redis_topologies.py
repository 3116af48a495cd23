"""The Redis backend on Cluster (keys spread over nodes) and behind Sentinel."""

from __future__ import annotations

import threading
import time

from celery_exclusive import Store, connect
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
