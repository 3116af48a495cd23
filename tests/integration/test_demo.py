"""The README's first command: both demos run to "All checks passed" on an embedded Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import cast

import pytest
import redis

from ..servers import RedisServer, wait_until
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


def test_the_demos_killed_task_comes_back_even_if_its_worker_died_inside_kombus_restore_mutex(
    private_redis: RedisServer,
) -> None:
    """Found in CI: the demo waited 90 s for the killed runs' redelivery, which never came.

    Every worker takes kombu's ``unacked_mutex`` for each scan of unacknowledged messages
    (every second in the demo); a worker killed inside that scan leaves the mutex held for
    ``unacked_mutex_expire`` (kombu's default: 300 s), and no worker restores anything meanwhile.
    """
    from celery import Celery

    from celery_exclusive.demo import celery_demo, tasks

    prefix = "exclusive-demo-mutex"
    events = private_redis.client()
    with celery_demo._workers(private_redis.url, prefix, 2, 1) as procs:
        celery_demo._wait_ready(events, prefix, [f"{name}@{tasks.HOST}" for name, _, _ in procs])
        sender = Celery("sender", broker=private_redis.url)
        sender.send_task(tasks.sync_customer.name, (7,), {"seconds": 120}, queue=f"{prefix}-queue")
        wait_until(lambda: events.llen(f"{prefix}:started") == 1, 60, "the task to start")
        first = json.loads(events.lindex(f"{prefix}:started", 0))  # type: ignore[arg-type]
        # Its worker dies inside the restore scan: the mutex stays, as kombu took it.
        with tasks.app.connection_for_write(private_redis.url) as connection:
            channel = connection.default_channel
            mutex = events.lock(channel.unacked_mutex_key, timeout=channel.unacked_mutex_expire)
            assert mutex.acquire(blocking=False)
        victim = next(p for name, p, _ in procs if first["worker"].startswith(f"{name}@"))
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        # The other worker runs the redelivered copy within seconds (visibility timeout 6 s).
        wait_until(lambda: events.llen(f"{prefix}:started") == 2, 30, "the copy to run again")
        again = json.loads(events.lindex(f"{prefix}:started", 1))  # type: ignore[arg-type]
        assert again["id"] == first["id"]
        sender.close()
