"""What every backend must do; each test runs on every store (see conftest.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import cast

import pytest

from celery_exclusive import (
    AlreadyHeld,
    ConfigurationError,
    Lease,
    LeaseLost,
    Store,
    Timeout,
    events,
)
from celery_exclusive.backends.base import Holder
from celery_exclusive.renewal import Renewer

from ..conftest import expected_skip, lacks, skip_unless_supported
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
    holder = second.holder
    assert holder is not None
    assert holder.meta["task_id"] == "abc"
    assert holder.token == first.token
    assert holder.fence == first.fence
    assert 0 < holder.expires_in <= first.ttl
    first.release()


def test_fences_rise_with_every_grant(store: Store) -> None:
    fences: list[int] = []
    for _ in range(5):
        lease = store.lease("job")
        assert lease.acquire()
        fences.append(cast(int, lease.fence))  # granted: not None
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


def test_holders_are_holder_objects_as_the_store_lists_them(store: Store) -> None:
    # Given a semaphore with two holders
    first = store.lease("pool", limit=3, meta={"task_id": "a"})
    second = store.lease("pool", limit=3, meta={"task_id": "b"})
    assert first.acquire() and second.acquire()
    # Then a holder sees itself as a Holder, as this process knows it
    mine = first.holder
    assert isinstance(mine, Holder)
    assert (mine.token, mine.fence, mine.meta["task_id"]) == (first.token, first.fence, "a")
    assert 0 < mine.expires_in <= first.ttl
    # And a refused caller sees the same Holder objects that Store.holders lists
    third = store.lease("pool", limit=3)
    assert third.acquire()
    fourth = store.lease("pool", limit=3)
    assert not fourth.acquire()
    assert all(isinstance(h, Holder) for h in fourth.holders)
    listed = {h.token: h.meta for h in store.holders("pool")}
    assert {h.token: h.meta for h in fourth.holders} == listed
    for lease in (first, second, third):
        lease.release()


def test_a_lease_keeps_the_token_it_was_made_with(store: Store) -> None:
    lease = store.lease("job", token="owner-1")
    with pytest.raises(AttributeError):
        lease.token = "owner-2"  # type: ignore[misc]
    assert lease.acquire()
    assert [h.token for h in store.holders("job")] == ["owner-1"]
    assert lease.release()


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
    # Given 200 leases held by one process, acquired at different moments, with a ttl long
    # enough for this store to renew 200 leases well inside a third of it (a store that
    # renews key by key, such as a database cache on a loaded machine, needs more than 0.9 s;
    # the claim here is the number of round trips, not the speed)
    renewer = Renewer()
    store = Store(store.backend, renewer=renewer)
    began = time.monotonic()
    for i in range(20):
        with store.lease(f"probe:{i}", ttl=30):
            pass
    per_lease = (time.monotonic() - began) / 20
    ttl = max(0.9, per_lease * 200 * 3)
    leases = []
    for i in range(200):
        lease = store.lease(f"bulk:{i}", ttl=ttl)
        assert lease.acquire()
        leases.append(lease)
    # When about three renewal intervals pass
    start = renewer.round_trips
    time.sleep(ttl * 1.1)
    trips = renewer.round_trips - start
    # Then renewal took about one round trip per interval, not one per lease
    assert 1 <= trips <= 8, (trips, ttl)
    assert all(lease.held for lease in leases), ttl
    for lease in leases:
        lease.release()


def test_a_stale_renewal_reply_does_not_mark_a_newer_grant_lost(store: Store) -> None:
    # Given a renewal sent for the first grant of a lease object
    lost: list[str] = []
    lease = store.lease("job", ttl=30, auto_renew=False, on_lost=lambda _l, r: lost.append(r))
    lease.acquire()
    stale_generation = lease._generation
    # When the owner releases and acquires again before the (refused) reply is applied
    lease.release()
    lease.acquire()
    lease._mark_lost("renewal refused: the store no longer had it", stale_generation)
    # Then the new grant is untouched
    assert lost == []
    assert lease.held
    lease.release()


def test_a_store_refuses_the_optional_steps_it_cannot_do_atomically(store: Store) -> None:
    missing = [m for m in ("update_meta", "take", "hand_over") if lacks(store, m)]
    if not missing:
        expected_skip(f"the {store.backend.describe()} store does every optional step")
    # A store that cannot do a step atomically says so, rather than faking it
    backend = store.backend
    refusals: dict[str, tuple[str, Callable[[], object]]] = {
        "update_meta": ("cannot update a holder", lambda: backend.update_meta("k", "t", "{}")),
        "take": ("cannot hand a lease over", lambda: backend.take("k", "t")),
        "hand_over": (
            "cannot hand a lease over",
            lambda: backend.hand_over("k", "task-1", "task-1/run-a", 30.0),
        ),
    }
    for method in missing:
        words, call = refusals[method]
        with pytest.raises(ConfigurationError, match=words):
            call()
    # ...and a lease's acquire that needs it (take_over) refuses before taking anything
    if "hand_over" in missing:
        run = store.lease("k", token="task-1/run", auto_renew=False)
        with pytest.raises(ConfigurationError, match="cannot hand a lease over"):
            run.acquire(take_over="task-1")
        assert store.holders("k") == []


def test_update_meta_and_take_hand_a_lease_over(store: Store) -> None:
    skip_unless_supported(store, "update_meta", "update a holder in place")
    skip_unless_supported(store, "take", "hand a lease over")
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
    skip_unless_supported(store, "hand_over", "hand a lease over")
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
    skip_unless_supported(store, "hand_over", "hand a lease over")
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


def test_take_over_moves_a_grant_into_a_lease_or_grants_anew(store: Store) -> None:
    skip_unless_supported(store, "hand_over", "hand a lease over")
    run = store.lease("job", token="task-1/run", meta={"state": "running"}, auto_renew=False)
    # Given a queued message's grant owned by its task id
    queued = store.lease("job", token="task-1", meta={"state": "queued"})
    queued.acquire()
    # When its run takes it over in one acquire
    assert run.acquire(take_over="task-1")
    # Then the run holds that grant (same fence) with its own metadata, and nobody else does
    (holder,) = store.holders("job")
    assert (holder.token, holder.fence) == ("task-1/run", queued.fence) == (run.token, run.fence)
    assert holder.meta["state"] == "running"
    assert not store.lease("job", token="task-2").acquire()
    assert run.release()
    # With nothing to take over (its grant expired, or was never taken) it is a plain acquire
    later = store.lease("job", token="task-3/run", auto_renew=False)
    assert later.acquire(take_over="task-3")
    assert later.fence is not None and later.fence > queued.fence  # type: ignore[operator]
    # and a key another owner holds is refused, that owner's grant untouched
    refused = store.lease("job", token="task-4/run", auto_renew=False)
    assert not refused.acquire(take_over="task-4")
    assert [h.token for h in store.holders("job")] == ["task-3/run"]
    later.release()


# -- regressions: wake-ups, blocking with, limits, force_release --------------------------------


def test_a_short_waiter_does_not_hide_a_long_waiter_from_the_release(store: Store) -> None:
    # Given a holder with a long ttl, so only the release itself can wake a waiter quickly
    holder = store.lease("job", ttl=20)
    assert holder.acquire()
    long_waiter = store.lease("job")
    asked = threading.Event()
    got: list[float] = []

    def on_conflict(lease: object, **_: object) -> None:
        if lease is long_waiter:
            asked.set()

    def wait() -> None:
        if long_waiter.acquire(timeout=30):
            got.append(time.monotonic())

    events.lease_conflict.connect(on_conflict)
    thread = threading.Thread(target=wait, name="long-waiter", daemon=True)
    try:
        thread.start()
        assert asked.wait(10), "the long waiter never asked for the key"
        # When a short waiter asks after it, is refused and gives up
        started = time.monotonic()
        assert store.lease("job").acquire(timeout=0.2) is False
        wait_until(lambda: time.monotonic() > started + 0.3, 2, "the short wait to be over")
        # ...and only then the holder releases
        released_at = time.monotonic()
        assert holder.release()
        thread.join(35)
    finally:
        events.lease_conflict.disconnect(on_conflict)
    # Then the long waiter is woken by that release, not by its next re-check
    assert got, "the long waiter never acquired"
    woken_after = got[0] - released_at
    assert woken_after < 2, f"the long waiter got the key {woken_after:.1f} s after the release"
    assert long_waiter.release()


def test_a_timeout_makes_the_with_statement_wait_for_the_key(store: Store) -> None:
    # Given a holder that releases 0.3 s from now
    holder = store.lease("job", ttl=30)
    assert holder.acquire()
    releaser = threading.Timer(0.3, holder.release)
    releaser.start()
    started = time.monotonic()
    try:
        # When a `with` asks for the key with a timeout (and nothing said about blocking)
        with store.lease("job", timeout=5) as lease:
            # Then it waits for the release and enters
            waited = time.monotonic() - started
            assert lease.held
            assert [h.token for h in store.holders("job")] == [lease.token]
    finally:
        releaser.cancel()
        releaser.join(5)
    assert 0.2 <= waited < 4, waited
    # ...and when the holder never lets go, it raises Timeout after about the timeout
    stuck = store.lease("job", ttl=30)
    assert stuck.acquire()
    started = time.monotonic()
    with pytest.raises(Timeout) as info, store.lease("job", timeout=0.5):
        pass
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 3, elapsed
    assert info.value.key == "job" and info.value.timeout == 0.5
    assert stuck.release()


def test_blocking_false_keeps_the_with_statement_non_blocking_despite_a_timeout(
    store: Store,
) -> None:
    holder = store.lease("job", ttl=30)
    assert holder.acquire()
    started = time.monotonic()
    with pytest.raises(AlreadyHeld), store.lease("job", blocking=False, timeout=5):
        pass
    assert time.monotonic() - started < 2, "blocking=False waited"
    assert holder.release()


def test_a_caller_with_another_limit_is_refused_while_the_key_is_held(store: Store) -> None:
    from celery_exclusive.exceptions import LimitMismatch

    # Given a key held as a lock (limit 1)
    lock = store.lease("pool", limit=1)
    assert lock.acquire()
    # When a caller asks for it as a semaphore of 3, it is refused with a clear error
    wider = store.lease("pool", limit=3)
    with pytest.raises(LimitMismatch) as info:
        wider.acquire()
    error = info.value
    assert isinstance(error, ConfigurationError)
    assert (error.key, error.limit, error.requested) == ("pool", 1, 3)
    assert "pool" in str(error) and "1" in str(error) and "3" in str(error), str(error)
    assert not wider.held
    assert [h.token for h in store.holders("pool")] == [lock.token]
    # ...at once, also when it would wait
    started = time.monotonic()
    with pytest.raises(LimitMismatch):
        store.lease("pool", limit=3).acquire(timeout=5)
    assert time.monotonic() - started < 2, "a blocking caller waited instead of being refused"
    # Once every holder released, a new limit is accepted, and then it is the key's limit
    assert lock.release()
    assert wider.acquire()
    with pytest.raises(LimitMismatch) as info:
        store.lease("pool", limit=1).acquire()
    assert (info.value.limit, info.value.requested) == (3, 1)
    assert wider.release()
    # ...and once every holder expired, too
    short = store.lease("pool", limit=2, ttl=0.3, auto_renew=False)
    assert short.acquire()
    later = store.lease("pool", limit=5)
    wait_until(later.acquire, 5, "the limit=2 holder to expire")
    assert later.release()


def test_force_release_refuses_a_token_no_lease_can_have(store: Store) -> None:
    lease = store.lease("job")
    assert lease.acquire()
    first_fence = lease.fence
    assert first_fence is not None
    for token in ["#f", "#w", "#l", "a|b", ""]:
        with pytest.raises(ConfigurationError):
            store.force_release("job", token)
    # Nothing was touched: the holder still holds, and fences still rise
    assert [h.token for h in store.holders("job")] == [lease.token]
    assert lease.release()
    again = store.lease("job")
    assert again.acquire()
    assert again.fence is not None and again.fence > first_fence
    assert again.release()


def test_force_release_counts_only_live_holders(store: Store) -> None:
    # Given two holders that expired (never renewed) beside one live holder
    expired = [store.lease("pool", limit=3, ttl=0.3, auto_renew=False) for _ in range(2)]
    for lease in expired:
        assert lease.acquire()
    live = store.lease("pool", limit=3, ttl=30)
    assert live.acquire()
    wait_until(
        lambda: [h.token for h in store.holders("pool")] == [live.token],
        5,
        "the short holders to expire",
    )
    # Then force-releasing an expired holder removes nothing live, and "all" removes one
    assert store.force_release("pool", expired[0].token) == 0
    assert store.force_release("pool") == 1
    assert store.holders("pool") == []


def test_force_release_of_every_holder_wakes_a_waiter_for_each(store: Store) -> None:
    # Given a semaphore of 3 fully held (long ttl: only a release wakes a waiter quickly)
    n = 3
    holders = [store.lease("pool", limit=n, ttl=30) for _ in range(n)]
    for lease in holders:
        assert lease.acquire()
    # ...and 3 waiters in this process, all refused and waiting
    waiters = [store.lease("pool", limit=n) for _ in range(n)]
    refused: set[int] = set()
    got: dict[int, float] = {}

    def on_conflict(lease: object, **_: object) -> None:
        if any(lease is w for w in waiters):
            refused.add(id(lease))

    def wait(waiter: Lease) -> None:
        if waiter.acquire(timeout=20):
            got[id(waiter)] = time.monotonic()

    events.lease_conflict.connect(on_conflict)
    threads = [threading.Thread(target=wait, args=(w,), daemon=True) for w in waiters]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(refused) == n, 10, "every waiter to be refused")
        # When an operator force-releases every holder
        released_at = time.monotonic()
        assert store.force_release("pool") == n
        for thread in threads:
            thread.join(25)
    finally:
        events.lease_conflict.disconnect(on_conflict)
    # Then every waiter is woken by it and gets a place
    delays = sorted(round(at - released_at, 1) for at in got.values())
    assert len(got) == n, f"only {len(got)} of {n} waiters acquired (after {delays} s)"
    assert delays[-1] < 2, f"waiters acquired {delays} s after the force_release"
    for waiter in waiters:
        assert waiter.release()
