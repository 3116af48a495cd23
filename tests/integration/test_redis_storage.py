"""What a lease leaves in Redis: after the last holder's release, only the fence counter, small."""

from __future__ import annotations

import redis

from celery_exclusive.backends.base import Conflict
from celery_exclusive.store import Store


def test_a_released_key_keeps_only_its_fence_counter_in_a_small_hash(
    redis_store: Store, redis_url: str, prefix: str
) -> None:
    admin = redis.Redis.from_url(redis_url)
    name = f"{prefix}:{{job}}:lease"
    # Given a lease whose holder value is longer than Redis's compact-hash limit (64 bytes)
    lease = redis_store.lease("job", ttl=30, meta={"note": "x" * 200}, auto_renew=False)
    assert lease.acquire()
    assert admin.object("encoding", name) == b"hashtable"
    # When it is released
    assert lease.release()
    # Then the key holds the fence counter only, in the compact encoding, and still expires
    assert admin.hgetall(name) == {b"#f": str(lease.fence).encode()}
    assert admin.object("encoding", name) in (b"listpack", b"ziplist")
    assert 0 < admin.pttl(name) <= 7 * 24 * 3600 * 1000
    # and fences keep rising from it
    again = redis_store.lease("job", ttl=30, auto_renew=False)
    assert again.acquire()
    assert again.fence > lease.fence  # type: ignore[operator]
    again.release()


def test_a_waiters_mark_survives_the_clean_up(
    redis_store: Store, redis_url: str, prefix: str
) -> None:
    admin = redis.Redis.from_url(redis_url)
    name = f"{prefix}:{{job}}:lease"
    holder = redis_store.lease("job", ttl=30, meta={"note": "x" * 200}, auto_renew=False)
    assert holder.acquire()
    # a refused caller that says it will wait 20 s leaves "#w"
    refused = redis_store.backend.acquire("job", "waiter", ttl=30, limit=1, meta="{}", wait=20)
    assert isinstance(refused, Conflict)
    assert holder.release()
    assert set(admin.hgetall(name)) == {b"#f", b"#w"}
