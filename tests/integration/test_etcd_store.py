"""What only the etcd store does: its URLs, whole-second TTLs, member failover, batched renewal."""

from __future__ import annotations

import pytest

from celery_exclusive import ConfigurationError, LimitMismatch, Store, connect
from celery_exclusive.backends.base import Conflict, Grant, RenewRequest
from celery_exclusive.backends.etcd import EtcdBackend, lease_seconds, parse_url
from celery_exclusive.backends.etcd.gateway import KEEPALIVE_REQUESTS
from celery_exclusive.embedded import free_port
from celery_exclusive.store import validate_url

from ..servers import wait_until


def test_urls_name_members_and_options_a_keyword_winning() -> None:
    parsed = parse_url("etcd://a:2380,b,[::1]:2400?prefix=q&socket_timeout=2", prefix="kw")
    assert parsed.members == (("a", 2380), ("b", 2379), ("::1", 2400))
    assert (parsed.prefix, parsed.socket_timeout, parsed.tls) == ("kw", 2.0, False)
    assert parsed.description == "etcd://a:2380,b:2379,[::1]:2400"
    tls = parse_url("etcd+https://h?ca_file=/x.pem")
    assert (tls.tls, tls.ca_file, tls.members) == (True, "/x.pem", (("h", 2379),))
    for bad in (
        "etcd://user:secret@h:2379",  # no etcd authentication
        "etcd://h:2379/path",
        "etcd://",
        "etcd://h?unknown=1",
        "etcd://h?socket_timeout=-1",
        "etcd://h?ca_file=/x.pem",  # TLS option on a plain URL
    ):
        with pytest.raises(ConfigurationError) as info:
            validate_url(bad)
        assert "secret" not in str(info.value)


def test_ttls_are_whole_seconds_rounded_up() -> None:
    assert [lease_seconds(t) for t in (0.01, 0.5, 1.0, 1.2, 30.0)] == [1, 1, 1, 2, 30]


def test_the_store_keeps_a_short_lease_at_least_as_long_as_its_holder_believes(
    etcd_url: str, prefix: str
) -> None:
    # Rule 3: etcd's expiry (whole seconds, at least its minimum) is never before the
    # holder's local deadline (ttl after the grant was sent).
    store = connect(etcd_url, prefix=prefix)
    try:
        lease = store.lease("short", ttl=0.5, auto_renew=False)
        assert lease.acquire()
        (holder,) = store.holders("short")
        assert holder.expires_in >= 0.5
        assert lease.release()
    finally:
        store.close()


def test_a_member_that_does_not_answer_is_passed_over(etcd_url: str, prefix: str) -> None:
    # Given a URL whose first member has nothing listening
    dead = f"127.0.0.1:{free_port()}"
    store = connect(etcd_url.replace("etcd://", f"etcd://{dead},"), prefix=prefix)
    try:
        # Then every operation goes to the member that answers
        lease = store.lease("failover")
        assert lease.acquire()
        assert [h.token for h in store.holders("failover")] == [lease.token]
        assert lease.release()
    finally:
        store.close()


def test_one_renewal_batch_renews_many_leases_in_a_few_requests(etcd_url: str, prefix: str) -> None:
    store = connect(etcd_url, prefix=prefix)
    backend = store.backend
    assert isinstance(backend, EtcdBackend)
    try:
        n = 300
        for i in range(n):
            grant = backend.acquire(f"bulk:{i}", f"t{i}", ttl=30, limit=1, meta="{}")
            assert isinstance(grant, Grant)
        requests = [RenewRequest(f"bulk:{i}", f"t{i}", 30.0) for i in range(n)]
        sent = _count_requests(backend)
        assert backend.renew(requests) == [True] * n
        # One keep-alive batch (resent in part when the gateway ends its answer early), then
        # one slot check per 128 leases
        assert set(sent) == {"lease/keepalive", "kv/txn"}
        assert 1 <= sent.count("lease/keepalive") <= KEEPALIVE_REQUESTS
        assert sent.count("kv/txn") == 3
        # A released lease is reported gone in the same batch as live ones
        assert backend.release("bulk:0", "t0")
        assert backend.renew(requests[:3]) == [False, True, True]
    finally:
        store.close()


# -- a renewal fails once the slot is no longer the renewer's ------------------------------------


def _backend(store: Store) -> EtcdBackend:
    backend = store.backend
    assert isinstance(backend, EtcdBackend)
    return backend


def _no_revoke_after_move(backend: EtcdBackend) -> None:
    """The step that revokes an old owner's etcd lease after a take or a hand-over fails
    (it is only logged): here it does nothing at all."""
    backend._revoke_moved = lambda lease: None  # type: ignore[method-assign]


@pytest.mark.parametrize("move", ["take", "hand_over", "force_release"])
def test_a_renewal_fails_once_the_slot_was_taken_moved_or_freed(
    etcd_url: str, prefix: str, move: str
) -> None:
    # Given an owner whose lease is renewed by the renewer (every ttl / 3 = 1 s)
    owner, other = connect(etcd_url, prefix=prefix), connect(etcd_url, prefix=prefix)
    try:
        lease = owner.lease("moved", ttl=3.0)
        assert lease.acquire()
        token = lease.token
        # When another process takes, moves or force-releases its slot, and (take, hand-over)
        # the revoke of the owner's etcd lease that follows the move is lost
        _no_revoke_after_move(_backend(other))
        if move == "take":
            assert _backend(other).take("moved", token) is not None
            assert other.holders("moved") == []
        elif move == "hand_over":
            assert _backend(other).hand_over("moved", token, "new-owner", 30.0)
            assert [h.token for h in other.holders("moved")] == ["new-owner"]
        else:
            assert other.force_release("moved") == 1
        # Then the owner's renewal is refused and the lease is reported lost
        wait_until(lambda: not lease.held, 10.0, "the owner's lease reported lost")
        request = RenewRequest("moved", token, 3.0)
        assert _backend(owner).renew([request]) == [False]
        if move == "hand_over":
            # ... while the new owner's renewal still succeeds
            assert _backend(owner).renew([RenewRequest("moved", "new-owner", 30.0)]) == [True]
            assert [h.token for h in owner.holders("moved")] == ["new-owner"]
    finally:
        owner.close()
        other.close()


def test_a_renewal_fails_after_expiry_even_when_the_key_was_granted_again(
    etcd_url: str, prefix: str
) -> None:
    owner, other = connect(etcd_url, prefix=prefix), connect(etcd_url, prefix=prefix)
    try:
        # Given a lease left to expire (etcd's minimum TTL: 2 s, reaped within 0.5 s)
        lease = owner.lease("expired", ttl=1.0, auto_renew=False)
        assert lease.acquire()
        wait_until(lambda: other.holders("expired") == [], 10.0, "the etcd lease expired")
        # When another token is granted the key
        again = other.lease("expired", ttl=30.0, auto_renew=False)
        assert again.acquire()
        # Then the first owner's renewal is refused, the second's succeeds
        backend = _backend(owner)
        assert backend.renew([RenewRequest("expired", lease.token, 1.0)]) == [False]
        assert not lease.renew()
        assert backend.renew([RenewRequest("expired", again.token, 30.0)]) == [True]
        assert again.release()
    finally:
        owner.close()
        other.close()


def test_renewal_checks_slots_in_transactions_of_at_most_128_reads(
    etcd_url: str, prefix: str
) -> None:
    # Given 300 grants, of which a few lost their slot without their etcd lease being revoked
    store = connect(etcd_url, prefix=prefix)
    other = connect(etcd_url, prefix=prefix)
    backend = _backend(store)
    _no_revoke_after_move(_backend(other))
    try:
        n = 300
        for i in range(n):
            grant = backend.acquire(f"many:{i}", f"t{i}", ttl=30, limit=1, meta="{}")
            assert isinstance(grant, Grant)
        moved = {7, 150, 299}
        for i in moved:
            assert _backend(other).take(f"many:{i}", f"t{i}") is not None
        requests = [RenewRequest(f"many:{i}", f"t{i}", 30.0) for i in range(n)]
        # Then exactly those renewals fail, checked in ceil(300 / 128) = 3 transactions
        sent = _count_requests(backend)
        assert backend.renew(requests) == [i not in moved for i in range(n)]
        assert sent.count("kv/txn") == 3
        assert set(sent) == {"lease/keepalive", "kv/txn"}
    finally:
        store.close()
        other.close()


def _count_requests(backend: EtcdBackend) -> list[str]:
    """Record the path of every request ``backend`` sends from now on (each is one round trip)."""
    sent: list[str] = []
    post = backend.gateway.post

    def counted(path: str, payload: bytes) -> bytes:
        sent.append(path)
        return post(path, payload)

    backend.gateway.post = counted  # type: ignore[method-assign]
    return sent


# -- what a refused acquire costs ----------------------------------------------------------------


def test_a_repeated_refusal_reads_the_key_and_grants_no_etcd_lease(
    etcd_url: str, prefix: str
) -> None:
    holding, calling = connect(etcd_url, prefix=prefix), connect(etcd_url, prefix=prefix)
    backend = _backend(calling)
    try:
        # Given a key held by another process
        held = holding.lease("busy", ttl=30.0, auto_renew=False)
        assert held.acquire()
        sent = _count_requests(backend)
        first = backend.acquire("busy", "caller", ttl=30, limit=1, meta="{}")
        assert isinstance(first, Conflict)
        assert len(sent) <= 4  # grant, txn, timetolive, revoke: this process had not seen it
        # When this process is refused again (a Celery duplicate skipped, a waiter woken early)
        for _ in range(3):
            sent.clear()
            again = backend.acquire("busy", "caller", ttl=30, limit=1, meta="{}")
            # Then a refusal is one read and the holder's time left, with no etcd lease granted
            assert isinstance(again, Conflict)
            assert [h.token for h in again.holders] == [held.token]
            assert 25.0 <= again.holders[0].expires_in <= 30.0
            assert sent == ["kv/range", "lease/timetolive"]
        # When the key is free again, the read that finds it free is the grant's first step
        assert held.release()
        sent.clear()
        granted = backend.acquire("busy", "caller", ttl=30, limit=1, meta="{}")
        assert isinstance(granted, Grant) and not granted.reentered
        assert sent == ["kv/range", "lease/grant", "kv/txn"]
        assert [h.token for h in holding.holders("busy")] == ["caller"]
        # And after a grant, the key is taken as before: grant and transaction
        assert backend.release("busy", "caller")
        sent.clear()
        assert isinstance(backend.acquire("busy", "caller", ttl=30, limit=1, meta="{}"), Grant)
        assert sent == ["lease/grant", "kv/txn"]
        assert backend.release("busy", "caller")
    finally:
        holding.close()
        calling.close()


def test_a_refusal_read_first_still_finds_a_free_slot_of_a_semaphore_and_a_limit_mismatch(
    etcd_url: str, prefix: str
) -> None:
    store = connect(etcd_url, prefix=prefix)
    backend = _backend(store)
    try:
        # Given a key of limit 2 full, and this process refused once
        for token in ("a", "b"):
            assert isinstance(backend.acquire("sem", token, ttl=30, limit=2, meta="{}"), Grant)
        assert isinstance(backend.acquire("sem", "c", ttl=30, limit=2, meta="{}"), Conflict)
        # Then a holder re-entering is answered from the read alone
        sent = _count_requests(backend)
        again = backend.acquire("sem", "a", ttl=30, limit=2, meta="{}")
        assert isinstance(again, Grant) and again.reentered
        assert "lease/grant" not in sent
        # and a mismatched limit is still refused as a configuration error
        with pytest.raises(LimitMismatch):
            backend.acquire("sem", "c", ttl=30, limit=3, meta="{}")
        # and the slot a release frees is granted from the read that found it
        assert backend.release("sem", "b")
        assert isinstance(backend.acquire("sem", "c", ttl=30, limit=2, meta="{}"), Grant)
        assert sorted(h.token for h in store.holders("sem")) == ["a", "c"]
    finally:
        store.close()
