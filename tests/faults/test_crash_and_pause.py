"""A holder that dies (SIGKILL) or freezes (SIGSTOP) with a lease: real processes, real Redis.

The holder is ``holder.py`` in a subprocess with ttl 1 s, renewed by its own renewal thread.
"""

from __future__ import annotations

import signal
import time

import pytest

from celery_exclusive import Store

from .conftest import START_TIMEOUT, SpawnHolder

pytestmark = pytest.mark.timeout(60)

TTL = 1.0
#: Slack on top of the ttl for a loaded CI box: scheduling, round trips, the waiter's wake-up.
MARGIN = 2.0


def test_sigkilled_holder_frees_the_key_within_its_ttl(
    spawn_holder: SpawnHolder, store_url: str, prefix: str, store: Store
) -> None:
    # Given a holder process that took K and keeps renewing it
    child = spawn_holder(store_url, prefix, "hold", "--key", "K", "--ttl", str(TTL))
    fence_text, token = child.expect("ACQUIRED", START_TIMEOUT).split()
    dead_fence = int(fence_text)
    other = store.lease("K", ttl=5)
    # ...for longer than its ttl: nobody else gets it meanwhile (renewal works)
    held_until = time.monotonic() + 2 * TTL
    for _ in range(1000):
        if time.monotonic() >= held_until:
            break
        assert not other.acquire(), "the key was free while its holder lived"
        time.sleep(0.05)
    assert [h.token for h in store.holders("K")] == [token]

    # When the holder is SIGKILLed: no finally, no release
    killed_at = time.monotonic()
    child.signal(signal.SIGKILL)
    child.wait(10)

    # Then the key is free again within ttl (+ margin), for a higher fence
    waiter = store.lease("K", ttl=5)
    assert waiter.acquire(blocking=True, timeout=10), "the dead holder's key never freed"
    freed_after = time.monotonic() - killed_at
    assert freed_after <= TTL + MARGIN, f"key freed {freed_after:.2f} s after the kill"
    assert waiter.fence is not None and waiter.fence > dead_fence
    assert [h.token for h in store.holders("K")] == [waiter.token]
    assert waiter.release()


def test_paused_holder_loses_the_lease_and_cannot_free_the_new_one(
    spawn_holder: SpawnHolder, store_url: str, prefix: str, store: Store
) -> None:
    # Given a holder process that took K
    child = spawn_holder(store_url, prefix, "hold", "--key", "K", "--ttl", str(TTL))
    old_fence = int(child.expect("ACQUIRED", START_TIMEOUT).split()[0])

    # When it is frozen (SIGSTOP) past its ttl, we get K, with a higher fence
    stopped_at = time.monotonic()
    child.signal(signal.SIGSTOP)
    mine = store.lease("K", ttl=30)
    assert mine.acquire(blocking=True, timeout=10), "a frozen holder kept the key"
    assert time.monotonic() - stopped_at <= TTL + MARGIN
    assert mine.fence is not None and mine.fence > old_fence

    # ...and when it wakes up (SIGCONT), it learns it lost the lease
    child.signal(signal.SIGCONT)
    child.send("WAIT_LOST 10")
    word, reason = child.next_line(15)
    assert word == "LOST", f"on_lost never fired in the resumed holder: {child.describe()}"
    assert reason, "on_lost fired without a reason"
    child.send("STATUS")
    assert child.expect("HELD", 10) == "False"
    # ensure_held() raises LeaseLost and release() returns False, freeing nothing
    child.send("RELEASE")
    assert child.expect("ENSURE_HELD", 10).startswith("LeaseLost")
    assert child.expect("RELEASED", 10) == "False"
    child.send("EXIT")
    assert child.wait(10) == 0, child.describe()

    # Then we still hold K, in the store and locally
    assert [h.token for h in store.holders("K")] == [mine.token]
    assert store.holders("K")[0].fence == mine.fence
    assert mine.held
    mine.ensure_held()
    assert mine.release() is True
