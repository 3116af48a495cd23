"""ExclusiveTask on real workers with RabbitMQ as the broker (results and leases on Redis).

Runs only when ``CELERY_EXCLUSIVE_TEST_AMQP_URL`` names a broker, e.g.
``amqp://guest:guest@127.0.0.1:5672//``; set but unreachable is a failure in CI. The test
publishes to a queue (and its direct exchange) of its own, which it deletes at the end; it
never touches a queue it did not create. CELERY_EXCLUSIVE_SLOW=1 also runs the long burst.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import cast

import pytest
from kombu.connection import Connection  # where kombu defines them: its root re-exports lazily
from kombu.entity import Exchange, Queue

from celery_exclusive.celery import is_skipped
from celery_exclusive.celery.config import store_for

from .. import celery_app as ca
from ..conftest import SLOW, SLOW_ONLY, expected_skip, unavailable
from ..history import check_history
from ..servers import RedisServer, wait_until
from ..workers import CeleryEnv, Worker, celery_env_on, wait_for

pytestmark = pytest.mark.timeout(120)

AMQP_ENV = "CELERY_EXCLUSIVE_TEST_AMQP_URL"


def _delete_own_queue(url: str, name: str) -> None:
    """Delete the queue and exchange this module created (and nothing else)."""
    # (kombu leaves Connection, Exchange, Queue and their methods unannotated)
    try:
        with Connection(url, connect_timeout=5) as conn:  # type: ignore[no-untyped-call]
            channel = conn.channel()
            Queue(name, Exchange(name, "direct"), name, channel=channel).delete()  # type: ignore[no-untyped-call]
            Exchange(name, "direct", channel=channel).delete()  # type: ignore[no-untyped-call]
    except Exception as exc:  # cleanup must not hide the test's own outcome
        print(f"could not delete queue {name!r}: {exc!r}")


@pytest.fixture(scope="module")
def amqp_env(request: pytest.FixtureRequest) -> Iterator[CeleryEnv]:
    """RabbitMQ as the broker; results and leases on this module's private Redis."""
    url = os.environ.get(AMQP_ENV)
    if not url:
        # Not a server the suite can start: .ci/run names one when the machine runs RabbitMQ.
        expected_skip(f"set {AMQP_ENV}=amqp://user:password@host:5672// to run")
    assert url is not None
    probe = Connection(url, connect_timeout=5)  # type: ignore[no-untyped-call]  # kombu's
    shown = probe.as_uri()  # the password masked
    try:
        with probe:
            probe.ensure_connection(max_retries=1)  # type: ignore[no-untyped-call]  # kombu's
    except Exception as exc:
        unavailable(f"{AMQP_ENV}={shown} is not reachable: {exc!r}")
    own_redis: RedisServer = request.getfixturevalue("own_redis")
    with celery_env_on(own_redis, broker=url) as env:
        try:
            yield env
        finally:
            _delete_own_queue(url, env.env["CEX_QUEUE"])


@pytest.mark.parametrize(
    ("workers", "concurrency", "rounds", "duplicates", "customers"),
    [
        pytest.param(2, 2, 2, 6, 2, id="2x2"),
        pytest.param(
            3,
            4,
            5,
            20,
            4,
            id="3x4-slow",
            marks=[pytest.mark.slow, pytest.mark.skipif(not SLOW, reason=SLOW_ONLY)],
        ),
    ],
)
def test_bursts_over_amqp_never_overlap(
    amqp_env: CeleryEnv,
    workers: int,
    concurrency: int,
    rounds: int,
    duplicates: int,
    customers: int,
) -> None:
    tag = amqp_env.tag()
    queue = amqp_env.env["CEX_QUEUE"]
    started: list[Worker] = []
    try:
        # Given several prefork workers consuming one RabbitMQ queue
        for _ in range(workers):
            started.append(Worker(amqp_env.env, concurrency=concurrency).start())
        ids = [random.randrange(10**6, 10**7) for _ in range(customers)]

        # When bursts of duplicates are published for a few customers
        began = time.monotonic()
        results = []
        for _ in range(rounds):
            for _ in range(duplicates):
                results += [
                    ca.sync_customer.apply_async((c,), {"tag": tag, "duration": 0.1}, queue=queue)
                    for c in ids
                ]
            values = wait_for(results, timeout=60)
        elapsed = time.monotonic() - began

        # Then every call either ran or was skipped, and nothing ran twice
        assert all(is_skipped(v) or isinstance(v, int) for v in values), values
        history = ca.read_history(tag)
        ran = [r.id for r, v in zip(results, values, strict=True) if not is_skipped(v)]
        skipped = sum(1 for v in values if is_skipped(v))
        assert len(history) + skipped == len(results), (len(history), skipped, len(results))
        assert sorted(h["id"] for h in history) == sorted(ran)
        # a client without decode_responses: its replies are bytes
        raw = cast(list[bytes], ca.history_client().lrange(ca.history_key(tag) + ":started", 0, -1))
        assert not [i for i, n in Counter(x.decode() for x in raw).items() if n > 1]
        # no two runs of one key overlapped, fences rose in start order
        check_history(history)
        assert skipped > 0, "the bursts never produced a conflict"
        assert {h["key"] for h in history} == {f"sync:{c}" for c in ids}
        wait_until(lambda: list(store_for(ca.app).leases()) == [], 10, "every lease to be freed")
        print(
            f"amqp: {len(results)} published, {len(history)} ran on "
            f"{len({h['pid'] for h in history})} processes, {skipped} skipped, {elapsed:.1f} s"
        )
    finally:
        for worker in started:
            worker.stop(timeout=10)
            print(f"--- {worker.name}\n{worker.output()[-6000:]}")
