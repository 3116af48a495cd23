"""What only the etcd store does: its URLs, whole-second TTLs, member failover, batched renewal."""

from __future__ import annotations

import pytest

from celery_exclusive import ConfigurationError, connect
from celery_exclusive.backends.base import Grant, RenewRequest
from celery_exclusive.backends.etcd import EtcdBackend, lease_seconds, parse_url
from celery_exclusive.backends.etcd.gateway import KEEPALIVE_REQUESTS
from celery_exclusive.embedded import free_port
from celery_exclusive.store import validate_url


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
        sent: list[str] = []
        post = backend.gateway.post

        def counted(path: str, payload: bytes) -> bytes:
            sent.append(path)
            return post(path, payload)

        backend.gateway.post = counted  # type: ignore[method-assign]
        assert backend.renew(requests) == [True] * n
        assert set(sent) == {"lease/keepalive"}
        assert 1 <= len(sent) <= KEEPALIVE_REQUESTS
        # A released lease is reported gone in the same batch as live ones
        assert backend.release("bulk:0", "t0")
        assert backend.renew(requests[:3]) == [False, True, True]
    finally:
        store.close()
