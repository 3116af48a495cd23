"""The README's first command: both demos run to "All checks passed" on an embedded Redis."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import cast

import pytest
import redis

from ..servers import RedisServer
from ..workers import ROOT


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery_exclusive.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )


def test_celery_demo_passes_its_checks() -> None:
    result = run_demo("demo")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"overlapping runs of a key\s+0\n", out)
    assert re.search(r"killed run's lease free\s+after \d+\.\d+ s", out)
    assert "All checks passed." in out


def test_lease_demo_passes_its_checks() -> None:
    result = run_demo("demo-leases", "--duration", "3", "--ttl", "1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"overlapping holds\s+0\n", result.stdout)
    # It did contend (on a loaded machine the workers once started after the demo's window
    # had closed, and "no grant, no kill" passed), and it killed a holder.
    granted = re.search(r"leases granted\s+(\d+)\n", result.stdout)
    assert granted is not None and int(granted.group(1)) >= 2, result.stdout[-3000:]
    assert re.search(r"killed holder's key free\s+after \d+\.\d+ s", result.stdout)
    assert "All checks passed." in result.stdout


def _snapshot(client: redis.Redis) -> dict[bytes, object]:
    """Every key with its value (sets as sets, hashes as dicts...), to compare before and after."""
    read: dict[bytes, Callable[[bytes], object]] = {
        b"string": client.get,
        b"set": client.smembers,
        b"hash": client.hgetall,
        b"list": lambda k: client.lrange(k, 0, -1),
        b"zset": lambda k: client.zrange(k, 0, -1, withscores=True),
    }
    # the client has no decode_responses: it answers bytes
    return {key: read[cast(bytes, client.type(key))](key) for key in client.scan_iter(count=1000)}


@pytest.mark.parametrize("demo", ["demo", "demo-leases"])
def test_a_demo_on_the_users_redis_leaves_it_as_it_found_it(
    demo: str, private_redis: RedisServer
) -> None:
    # Given a user's Redis, with their own keys and a Celery of theirs bound to it
    client = private_redis.client()
    client.set("users:own-key", "kept")
    client.sadd("_kombu.binding.celery", b"celery\x06\x16\x06\x16celery")
    client.sadd("_kombu.binding.celery.pidbox", b"\x06\x16\x06\x16their-worker@host.celery.pidbox")
    before = _snapshot(client)
    # When a demo runs on it
    extra = ["--duration", "2", "--ttl", "1"] if demo == "demo-leases" else []
    result = run_demo(demo, "--redis", private_redis.url, *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Then every key it wrote is gone (results, leases, fence counters, queues, bindings)
    # and the user's keys are untouched
    after = _snapshot(client)
    left = sorted(set(after) - set(before))
    assert not left, f"{len(left)} keys left: {left}"
    changed = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    assert not changed, changed


def test_the_embedded_redis_moves_to_another_port_when_its_first_is_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from celery_exclusive import embedded

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        picks = iter([taken.getsockname()[1], embedded.free_port()])
        monkeypatch.setattr(embedded, "free_port", lambda: next(picks))
        with embedded.embedded_redis() as url, redis.Redis.from_url(url) as client:
            assert client.ping()
            assert url != f"redis://127.0.0.1:{taken.getsockname()[1]}/0"
