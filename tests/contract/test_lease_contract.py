"""What every backend must do; each test runs on every store (see conftest.py)."""

from __future__ import annotations

import threading
import time

import pytest

from celery_exclusive import AlreadyHeld, ConfigurationError, LeaseLost, Store, Timeout, events
from celery_exclusive.backends.base import Backend
from celery_exclusive.renewal import Renewer

from ..servers import wait_until


def test_first_acquire_is_granted_with_a_fence(store: Store) -> None:
    lease = store.lease("job")
    assert lease.acquire()
    assert lease.held
    assert isinstance(lease.fence, int) and lease.fence > 0
    assert lease.release()
    assert not lease.held


def test_second_owner_is_refused_and_told_who_holds(store: Store) -> None:
    first = store.lease("job", meta={"task_id": "abc"})
    assert first.acquire()
    second = store.lease("job")
    assert not second.acquire()
    assert second.holder is not None
    assert second.holder["task_id"] == "abc"
    assert second.holder["token"] == first.token
    assert second.holder["fence"] == first.fence
    assert 0 < second.holder["expires_in"] <= first.ttl
    first.release()


def test_fences_rise_with_every_grant(store: Store) -> None:
    fences = []
    for _ in range(5):
        lease = store.lease("job")
        assert lease.acquire()
        fences.append(lease.fence)
        lease.release()
    assert fences == sorted(fences) and len(set(fences)) == 5


def test_double_release_is_a_noop(store: Store) -> None:
    lease = store.lease("job")
    lease.acquire()
    assert lease.release() is True
    assert lease.release() is False
    # and the key is really free
    assert store.lease("job").acquire()


def test_release_never_frees_another_owners_lease(store: Store) -> None:
    owner = store.lease("job")
    owner.acquire()
    stranger = store.lease("job")
    assert not stranger.acquire()
    assert stranger.release() is False
    assert store.backend.release("job", "not-the-owner") is False
    assert store.holders("job")[0].token == owner.token
    owner.release()


def test_late_release_after_expiry_does_not_free_the_new_holder(store: Store) -> None:
    # Given a lease that expired (no renewal) and was taken by someone else
    old = store.lease("job", ttl=0.2, auto_renew=False)
    old.acquire()
    new = store.lease("job", ttl=30)
    wait_until(new.acquire, 5, "the old lease to expire")
    # When the old holder releases late
    assert old.release() is False
    # Then the new holder still holds, with a higher fence
    assert [h.token for h in store.holders("job")] == [new.token]
    assert new.fence is not None and old.fence is not None and new.fence > old.fence
    new.release()


def test_same_token_asking_again_keeps_its_fence(store: Store) -> None:
    lease = store.lease("job", token="task-1")
    lease.acquire()
    again = store.lease("job", token="task-1")
    assert again.acquire()
    assert again.fence == lease.fence
    lease.release()


def test_semaphore_admits_limit_holders(store: Store) -> None:
    leases = [store.lease("pool", limit=3) for _ in range(4)]
    assert [lease.acquire() for lease in leases] == [True, True, True, False]
    assert len(leases[3].holders) == 3
    assert len({lease.fence for lease in leases[:3]}) == 3
    leases[0].release()
    assert leases[3].acquire()
    for lease in leases[1:]:
        lease.release()


def test_expired_lease_frees_the_key(store: Store) -> None:
    lease = store.lease("job", ttl=0.2, auto_renew=False)
    lease.acquire()
    other = store.lease("job")
    assert not other.acquire()
    wait_until(other.acquire, 5, "expiry")
    assert not lease.held
    other.release()


def test_renewal_keeps_a_short_lease_alive(store: Store) -> None:
    lease = store.lease("job", ttl=0.3)
    lease.acquire()
    other = store.lease("job")
    deadline = time.monotonic() + 1.2  # four times the ttl
    while time.monotonic() < deadline:
        assert not other.acquire()
        assert lease.held
        time.sleep(0.05)
    lease.release()


def test_renew_after_release_returns_false_and_resurrects_nothing(store: Store) -> None:
    lease = store.lease("job", auto_renew=False)
    lease.acquire()
    lease.release()
    assert lease.renew() is False
    from celery_exclusive.backends.base import RenewRequest

    assert store.backend.renew([RenewRequest("job", lease.token, 30.0)]) == [False]
    assert store.holders("job") == []


def test_force_release_is_reported_as_lost(store: Store) -> None:
    lost: list[str] = []
    lease = store.lease("job", ttl=0.3, on_lost=lambda _lease, reason: lost.append(reason))
    lease.acquire()
    assert store.force_release("job") == 1
    wait_until(lambda: lost, 5, "the renewer to notice")
    assert not lease.held
    with pytest.raises(LeaseLost) as info:
        lease.ensure_held()
    assert info.value.key == "job"
    assert lease.release() is False


def test_lost_hook_fires(store: Store) -> None:
    seen: list[str] = []

    def receiver(lease: object, reason: str, **_: object) -> None:
        seen.append(reason)

    events.lease_lost.connect(receiver)
    try:
        lease = store.lease("job", ttl=0.3)
        lease.acquire()
        store.force_release("job", lease.token)
        wait_until(lambda: seen, 5, "lease_lost")
    finally:
        events.lease_lost.disconnect(receiver)


def test_blocking_acquire_is_woken_by_the_release(store: Store) -> None:
    # Given a holder with a long ttl, so only the release itself can wake the waiter quickly
    holder = store.lease("job", ttl=30)
    holder.acquire()
    waiter = store.lease("job")
    got: list[float] = []

    def wait() -> None:
        if waiter.acquire(blocking=True, timeout=20):
            got.append(time.monotonic())

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)  # let the waiter block (the assertion below does not depend on it)
    released_at = time.monotonic()
    holder.release()
    thread.join(20)
    assert got, "waiter never acquired"
    assert got[0] - released_at < 5, "woken by expiry re-check, not by the release"
    waiter.release()


def test_blocking_acquire_notices_a_holder_that_died(store: Store) -> None:
    dead = store.lease("job", ttl=0.3, auto_renew=False)  # never released: a crashed holder
    dead.acquire()
    waiter = store.lease("job")
    assert waiter.acquire(blocking=True, timeout=10)
    waiter.release()


def test_blocking_acquire_times_out(store: Store) -> None:
    holder = store.lease("job")
    holder.acquire()
    started = time.monotonic()
    assert store.lease("job").acquire(timeout=0.3) is False
    assert time.monotonic() - started >= 0.3
    with pytest.raises(Timeout) as info, store.lease("job", blocking=True, timeout=0.1):
        pass
    assert info.value.timeout == 0.1
    holder.release()


def test_context_manager_raises_already_held(store: Store) -> None:
    with store.lease("nightly-sync", meta={"who": "first"}):
        with pytest.raises(AlreadyHeld) as info, store.lease("nightly-sync"):
            pass
        assert info.value.key == "nightly-sync"
        assert info.value.holder["who"] == "first"
    with store.lease("nightly-sync") as lease:
        assert lease.held


def test_listing_shows_held_keys_with_their_holders(store: Store) -> None:
    a = store.lease("report:a", meta={"task_name": "report"})
    b = store.lease("report:b")
    a.acquire()
    b.acquire()
    found = {info.key: info for info in store.leases()}
    assert set(found) == {"report:a", "report:b"}
    assert found["report:a"].holders[0].meta["task_name"] == "report"
    assert {i.key for i in store.leases("report:a*")} == {"report:a"}
    b.release()
    assert {i.key for i in store.leases()} == {"report:a"}
    assert store.force_release("report:a") == 1
    assert list(store.leases()) == []


def test_listing_shows_every_held_key_while_they_are_renewed(store: Store) -> None:
    # Memcached's own walk of its items missed 18-31 of 50 renewed keys in 26 of 60 listings.
    held = [store.lease(f"busy:{n}", ttl=1.0) for n in range(50)]
    for lease in held:
        assert lease.acquire()
    try:
        for _ in range(30):
            assert {info.key for info in store.leases("busy:*")} == {lease.key for lease in held}
    finally:
        for lease in held:
            lease.release()


def test_done_marks_are_per_task_id_expire_and_are_no_leases(store: Store) -> None:
    backend = store.backend
    assert not backend.is_done("job", "task-1")
    backend.mark_done("job", "task-1", ttl=1.0)
    backend.mark_done("job", "task-3", ttl=60.0)
    assert backend.is_done("job", "task-1") and backend.is_done("job", "task-3")
    assert not backend.is_done("job", "task-2") and not backend.is_done("other", "task-1")
    # Nobody holds the key, and nothing is listed
    assert store.holders("job") == [] and list(store.leases()) == []
    with store.lease("job", limit=1):
        pass
    wait_until(lambda: not backend.is_done("job", "task-1"), 5, "the done mark to expire")
    assert backend.is_done("job", "task-3")


def test_one_round_trip_renews_many_leases(store: Store) -> None:
    # Given 200 leases held by one process, acquired at different moments
    renewer = Renewer()
    store = Store(store.backend, renewer=renewer)
    leases = []
    for i in range(200):
        lease = store.lease(f"bulk:{i}", ttl=0.9)
        assert lease.acquire()
        leases.append(lease)
    # When three renewal intervals (0.3 s each) pass
    start = renewer.round_trips
    time.sleep(1.0)
    trips = renewer.round_trips - start
    # Then renewal took about one round trip per interval, not one per lease
    assert 1 <= trips <= 8, trips
    assert all(lease.held for lease in leases)
    for lease in leases:
        lease.release()


def test_a_stale_renewal_reply_does_not_mark_a_newer_grant_lost(store: Store) -> None:
    # Given a renewal sent for the first grant of a lease object
    lost: list[str] = []
    lease = store.lease("job", ttl=30, auto_renew=False, on_lost=lambda _l, r: lost.append(r))
    lease.acquire()
    stale_generation = lease.generation
    # When the owner releases and acquires again before the (refused) reply is applied
    lease.release()
    lease.acquire()
    lease.mark_lost("renewal refused: the store no longer had it", stale_generation)
    # Then the new grant is untouched
    assert lost == []
    assert lease.held
    lease.release()


def test_update_meta_and_take_hand_a_lease_over(store: Store) -> None:
    if type(store.backend).update_meta is Backend.update_meta:
        # A store that cannot do it atomically says so, rather than faking it.
        with pytest.raises(ConfigurationError, match="cannot update a holder"):
            store.backend.update_meta("pending", "t", "{}")
        with pytest.raises(ConfigurationError, match="cannot hand a lease over"):
            store.backend.take("pending", "t")
        return
    lease = store.lease("pending", meta={"call": 1})
    lease.acquire()
    assert store.backend.update_meta("pending", lease.token, '{"call":2}') is True
    assert store.holders("pending")[0].meta == {"call": 2}
    assert store.backend.update_meta("pending", "someone-else", "{}") is False
    assert store.backend.take("pending", lease.token) == '{"call":2}'
    assert store.holders("pending") == []
    assert store.backend.take("pending", lease.token) is None
    assert store.backend.update_meta("pending", lease.token, "{}") is False


def test_max_hold_stops_renewal_so_a_stuck_holder_lets_go(store: Store) -> None:
    # Given a holder that renews (ttl 0.3 s) but may hold for at most 0.6 s
    stuck = store.lease("job", ttl=0.3, max_hold=0.6)
    stuck.acquire()
    other = store.lease("job")
    started = time.monotonic()
    # Then renewal keeps it past its ttl, stops at max_hold, and the key comes free after
    wait_until(other.acquire, 10, "max_hold + ttl to pass")
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 5, elapsed
    assert not stuck.held
    other.release()


def test_hand_over_moves_a_live_grant_keeping_its_fence(store: Store) -> None:
    if type(store.backend).hand_over is Backend.hand_over:
        # A store that cannot do it atomically says so, rather than faking it.
        with pytest.raises(ConfigurationError, match="cannot hand a lease over"):
            store.backend.hand_over("job", "task-1", "task-1/run-a", 30.0)
        return
    # Given a grant owned by a task id (an enqueue lease)
    queued = store.lease("job", token="task-1")
    queued.acquire()
    # When a run takes it over under its own token
    assert store.backend.hand_over("job", "task-1", "task-1/run-a", 30.0) is True
    # Then the run holds it with the same fence, and the old token holds nothing
    (holder,) = store.holders("job")
    assert holder.token == "task-1/run-a" and holder.fence == queued.fence
    assert store.backend.hand_over("job", "task-1", "task-1/run-b", 30.0) is False
    assert not store.lease("job", token="someone").acquire()
    # and it can be handed back (a retry) and released by its owner
    assert store.backend.hand_over("job", "task-1/run-a", "task-1", 30.0) is True
    assert store.backend.release("job", "task-1") is True
    assert store.holders("job") == []


def test_hand_over_can_give_the_new_owner_its_own_metadata(store: Store) -> None:
    if type(store.backend).hand_over is Backend.hand_over:
        return  # refused with a clear error: see the test above
    # Given a queued message's grant, described by the producer
    queued = store.lease("job", token="task-1", meta={"state": "queued", "host": "web-1"})
    queued.acquire()
    # When the worker that runs it takes it over with its own description
    run = '{"state":"running","node":"worker@a"}'
    assert store.backend.hand_over("job", "task-1", "task-1/run", 30.0, meta=run) is True
    # Then listings show the worker; a hand-over without meta keeps what is there
    (holder,) = store.holders("job")
    assert holder.meta == {"state": "running", "node": "worker@a"}
    assert holder.fence == queued.fence
    assert store.backend.hand_over("job", "task-1/run", "task-1", 30.0) is True
    assert store.holders("job")[0].meta == {"state": "running", "node": "worker@a"}
