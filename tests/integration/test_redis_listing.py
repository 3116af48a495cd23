"""Listing many leases on Redis: more keys than one SCAN batch, standalone and on Cluster.

``RedisBackend.scan`` reads the holders of a whole SCAN batch in one pipeline (as ``renew``
sends its scripts); these tests check that no key is dropped, repeated or paired with another
key's holders on the way, and that the pipeline copes with a server that lost its scripts.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Generator, Iterator
from typing import cast

import pytest

from celery_exclusive import Store, connect
from celery_exclusive.backends.base import LeaseInfo, RenewRequest
from celery_exclusive.backends.redis import SCAN_BATCH
from celery_exclusive.renewal import Renewer

from ..servers import RedisServer, wait_until

HELD = 500  # more than two SCAN batches
SEMAPHORES = 40  # keys with two holders (limit=2)
EXPIRED = 60  # keys whose only holder expired
HALF_EXPIRED = 20  # semaphores with one live and one expired holder


@pytest.fixture(params=["standalone", "cluster"])
def store(request: pytest.FixtureRequest, prefix: str) -> Iterator[Store]:
    if request.param == "cluster":
        url = request.getfixturevalue("cluster").url
    else:
        url = request.getfixturevalue("redis_url")
    # A private renewer that is never started: every lease here has auto_renew=False.
    s = Store(connect(url, prefix=prefix).backend, renewer=Renewer())
    try:
        yield s
    finally:
        s.close()


def test_listing_more_keys_than_a_scan_batch(store: Store) -> None:
    assert SCAN_BATCH * 2 < HELD
    # Given keys held once, semaphores held twice, and keys whose holders (some) expired
    expected: dict[str, set[str]] = {}

    def hold(key: str, ttl: float, limit: int = 1) -> str:
        lease = store.lease(key, ttl=ttl, limit=limit, auto_renew=False, meta={"for": key})
        assert lease.acquire(), key
        return lease.token

    short = []
    for i in range(EXPIRED):
        short.append(hold(f"gone:{i}", 0.3))
    for i in range(HALF_EXPIRED):
        short.append(hold(f"half:{i}", 0.3, limit=2))
        expected[f"half:{i}"] = {hold(f"half:{i}", 60, limit=2)}
    for i in range(HELD):
        expected[f"job:{i}"] = {hold(f"job:{i}", 60)}
    for i in range(SEMAPHORES):
        expected[f"sem:{i}"] = {hold(f"sem:{i}", 60, limit=2), hold(f"sem:{i}", 60, limit=2)}
    store.backend.mark_done("job:1", "task-1", ttl=60)  # a done mark is no lease
    last = f"half:{HALF_EXPIRED - 1}"  # the short holder taken last expires last
    wait_until(lambda: len(store.holders(last)) == 1, 5, "the short holders to expire")

    # When every key is listed, Then each held key comes once, with its own holders only
    listed = list(store.leases())
    assert sorted(info.key for info in listed) == sorted(expected)
    for info in listed:
        assert {h.token for h in info.holders} == expected[info.key], info.key
        assert all(h.meta["for"] == info.key for h in info.holders), info.key
        assert all(h.expires_in > 0 for h in info.holders), info.key

    # And a pattern lists exactly the keys it matches
    for pattern in ("job:1*", "sem:*", "half:1?", "gone:*"):
        want = sorted(k for k in expected if fnmatch.fnmatchcase(k, pattern))
        assert sorted(info.key for info in store.leases(pattern)) == want, pattern

    # And a listing stopped early reads the step on its way: its connection is kept for reuse
    kept = len(store.backend._idle)  # type: ignore[attr-defined]
    # Store.leases promises an Iterator; on Redis it is RedisBackend.scan's generator
    first = cast(Generator[LeaseInfo, None, None], store.leases())
    next(first)
    first.close()
    assert len(store.backend._idle) == kept  # type: ignore[attr-defined]
    assert sorted(info.key for info in store.leases()) == sorted(expected)

    for key in expected:
        store.force_release(key)
    assert list(store.leases()) == []


def test_pipelined_scripts_survive_a_script_flush_and_send_no_script_exists(
    private_redis: RedisServer, prefix: str
) -> None:
    # Given a private server (its script cache is flushed) and leases held on it
    server = private_redis
    store = Store(connect(server.url, prefix=prefix).backend, renewer=Renewer())
    leases = [store.lease(f"job:{i}", ttl=60, auto_renew=False) for i in range(30)]
    assert all(lease.acquire() for lease in leases)
    requests = [RenewRequest(le.key, le.token, le.ttl) for le in leases]
    with server.client() as admin:
        # When the server forgets its scripts, Then listing and renewal load them again
        admin.script_flush()
        assert {info.key for info in store.leases()} == {le.key for le in leases}
        admin.script_flush()
        assert store.backend.renew(requests) == [True] * len(leases)
        # And, both scripts loaded, a pipelined call is EVALSHA alone: no SCRIPT EXISTS
        # round trip each time
        assert len(list(store.leases())) == len(leases)
        admin.config_resetstat()
        store.backend.renew(requests)
        assert len(list(store.leases())) == len(leases)
        stats = admin.info("commandstats")
        assert not [name for name in stats if name.startswith("cmdstat_script")], stats
        # one renew script, and one listing step (30 keys: one SCAN step covers them)
        assert stats["cmdstat_evalsha"]["calls"] == 2
    store.close()


def test_listing_keys_and_metadata_of_any_characters(store: Store) -> None:
    # The listing's reply is JSON made by the server's Lua: quotes, backslashes, slashes and
    # characters outside ASCII in keys, tokens and metadata come back as they went in.
    odd = ['q"uote', "back\\slash", "sl/ash", "caf\u00e9", "\u2603:\U0001f600", "a|b|c"]
    held = {}
    for key in odd:
        token = "t/" + key.replace("|", "-") + '\\"'  # a token holds no "|"
        lease = store.lease(key, ttl=60, auto_renew=False, token=token, meta={"k": key})
        assert lease.acquire(), key
        held[key] = lease
    listed = {info.key: info.holders for info in store.leases()}
    assert sorted(listed) == sorted(odd)
    for key, holders in listed.items():
        (holder,) = holders
        assert holder.token == held[key].token
        assert holder.meta["k"] == key
        assert holder.fence == held[key].fence
    for lease in held.values():
        assert lease.release()
