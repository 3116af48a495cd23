"""The Redis backend's fast path: script calls written straight to connections it keeps.

Each check is a way that path could go wrong where redis-py's usual path would not: a script
cache the server lost, connections the server closed, an error reply, a forked child using the
parent's sockets, connections piling up. All on a private redis-server of this module's own
(it flushes scripts and kills clients).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from celery_exclusive import connect
from celery_exclusive.exceptions import BackendError
from celery_exclusive.store import Store

from ..servers import RedisServer


@pytest.fixture(scope="module")
def server(own_redis: RedisServer) -> RedisServer:
    return own_redis


@pytest.fixture
def store(server: RedisServer) -> Iterator[Store]:
    s = connect(server.url, prefix="fast")
    try:
        yield s
    finally:
        s.close()


def cycle(store: Store, key: str) -> None:
    """Acquire, check the grant is visible to a second owner, release: every reply checked."""
    lease = store.lease(key, ttl=30, auto_renew=False)
    assert lease.acquire()
    other = store.lease(key, ttl=30, auto_renew=False)
    assert not other.acquire()
    assert other.holder is not None and other.holder.token == lease.token
    assert lease.release()
    assert not lease.release()  # a second release finds nothing


def test_scripts_the_server_forgot_are_loaded_again(store: Store, server: RedisServer) -> None:
    cycle(store, "a")
    server.client().script_flush()
    cycle(store, "a")
    assert store.holders("a") == []


def test_connections_the_server_closed_are_replaced(store: Store, server: RedisServer) -> None:
    for key in "abc":
        cycle(store, key)
    admin = server.client()
    killed = admin.client_kill_filter(_type="normal", skipme=True)
    assert killed >= 1
    for key in "abc":
        cycle(store, key)


def test_an_error_reply_is_a_backend_error_and_the_connection_stays_usable(
    store: Store, server: RedisServer
) -> None:
    server.client().set("fast:{broken}:lease", "not a hash")
    for _ in range(3):
        with pytest.raises(BackendError, match="WRONGTYPE"):
            store.lease("broken", ttl=30, auto_renew=False).acquire()
        cycle(store, "fine")
    server.client().delete("fast:{broken}:lease")


def test_sequential_calls_use_one_connection(store: Store, server: RedisServer) -> None:
    def ours() -> int:
        clients: list[dict[str, Any]] = server.client().client_list(_type="normal")
        return len(clients) - 1  # the admin client itself

    cycle(store, "warm")
    before = ours()
    for i in range(200):
        cycle(store, f"k{i}")
    assert ours() == before


def test_a_forked_child_never_uses_the_parents_connections(
    store: Store, server: RedisServer
) -> None:
    # The parent keeps a connection, then forks; both then run acquire/release concurrently.
    # Sharing one socket would mix up their replies (wrong answers or protocol errors).
    cycle(store, "before-fork")
    assert store.backend._idle  # type: ignore[attr-defined]
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    children = [
        ctx.Process(target=_child_with_parent_store, args=(store, 300, errors)) for _ in range(2)
    ]
    for proc in children:
        proc.start()
    for i in range(300):
        cycle(store, f"parent{i % 5}")
    for proc in children:
        proc.join(60)
        assert proc.exitcode == 0, errors.get(timeout=1) if not errors.empty() else proc.exitcode


def _child_with_parent_store(store: Store, rounds: int, errors: Any) -> None:
    """A forked child using the store object it inherited (as a Celery prefork child does)."""
    try:
        for i in range(rounds):
            cycle(store, f"child{i % 5}-{os.getpid()}")
    except BaseException as exc:
        errors.put(repr(exc))
        raise


def test_a_client_pinned_to_one_connection_takes_the_usual_path(server: RedisServer) -> None:
    client = redis.Redis(host="127.0.0.1", port=server.port, single_connection_client=True)
    store = connect(client, prefix="fast")
    try:
        cycle(store, "single")  # a client pinned to one connection takes the usual path
    finally:
        store.close()


def test_script_calls_take_the_fast_path(store: Store) -> None:
    # Each call falls back to redis-py's usual path on any failure to send, so a fast path
    # that never worked would pass every other test here: count the calls that went the usual
    # way, in a second round (in the first, each script is loaded the usual way).
    backend: Any = store.backend
    scripts = dict(backend._scripts)
    usual: list[str] = []

    def counting(name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            usual.append(name)
            return scripts[name](*args, **kwargs)

        return call

    backend._scripts = {name: counting(name) for name in scripts}
    for _ in range(2):
        usual.clear()
        leases = [store.lease(f"fast{i}", ttl=30, auto_renew=False) for i in range(3)]
        for lease in leases:
            assert lease.acquire()
            assert lease.renew()
        assert sorted(info.key for info in store.leases("fast*")) == ["fast0", "fast1", "fast2"]
        for lease in leases:
            assert lease.release()
        cycle(store, "after")
    assert usual == []
