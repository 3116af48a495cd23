"""Minimal reproductions of what the lifecycle matrix found (tests/matrix), beyond the bugs
already known when it was written. Each test failed on the code it was found on (429f474);
the first three pass since the fixes on main (ef2befd, 9e52920, 6a8561d) and stay as
regression tests; ``test_revoke_terminate_keeps_the_key_while_the_body_still_runs`` still
fails on main 6a8561d.

Each runs one real ``celery worker`` (the matrix app, tests/matrix/app.py) on private Redis
servers, records every body's start and end, and checks one behaviour.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from celery_exclusive.celery.config import store_for

from ..conftest import started
from ..servers import RedisServer, wait_until
from . import app as mapp
from .runner import MatrixWorker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def servers(private_redis: RedisServer) -> Iterator[tuple[RedisServer, RedisServer]]:
    """A broker and a lease store, each a private redis-server of the test's own."""
    with started(RedisServer) as store:
        yield private_redis, store


def env_for(broker: RedisServer, store: RedisServer, **extra: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:6]
    base = f"redis://127.0.0.1:{broker.port}"
    return {
        "CEXM_BROKER": f"{base}/0",
        "CEXM_RESULT": f"{base}/1",
        "CEXM_HISTORY": f"{base}/3",
        "CEXM_STORE": f"redis://127.0.0.1:{store.port}/0",
        "CEXM_PREFIX": f"f{tag}",
        "CEXM_QUEUE": f"q{tag}",
        "CEXM_ACKS_LATE": "0",
        "CEXM_VISIBILITY": "",
        **extra,
    }


def events(env: dict[str, str], case: str) -> list[dict[str, Any]]:
    raw = mapp.history(env["CEXM_HISTORY"]).lrange(f"h:{case}", 0, -1)
    return [json.loads(x) for x in raw]


def test_retry_keeps_the_per_call_exclusive_options(
    servers: tuple[RedisServer, RedisServer],
) -> None:
    # Given a task whose default hold is "running", called with a per-call hold="period"
    # (no lease while the body runs), whose body calls self.retry() once
    env = env_for(*servers)
    app = mapp.make_app(env)
    case = uuid.uuid4().hex[:8]
    with MatrixWorker(env, pool="solo", concurrency=1):
        result = app.tasks[mapp.JOB].apply_async(
            (case,), {"mode": "retry"}, queue=env["CEXM_QUEUE"], exclusive={"hold": "period"}
        )
        # When the retry has run
        assert result.get(timeout=30) == "a"
    starts = [e for e in events(env, case) if e["ev"] == "start"]
    assert [s["retries"] for s in starts] == [0, 1], starts
    # Then the retry ran under the same options as the first attempt: hold="period" takes no
    # run lease, so neither run has a fence. (Found: the retry message carries the task's
    # default options, so the retry took a run lease as hold="running".)
    assert starts[0]["fence"] is None
    assert starts[1]["fence"] is None, (
        "the retry ran with a run lease: self.retry() dropped the per-call exclusive "
        "options (hold='period') and republished with the task's defaults"
    )
    app.close()


def test_redelivered_eta_copy_does_not_run_again_after_success_without_acks_late(
    servers: tuple[RedisServer, RedisServer],
) -> None:
    # (Seen on the solo pool only; prefork and threads ack the message in time.)
    # Given a solo worker (acks_late off) on a Redis broker with a 2 s visibility timeout,
    # and a protected task sent with a 1 s countdown whose body runs 3 s
    env = env_for(*servers, CEXM_VISIBILITY="2")
    app = mapp.make_app(env)
    case = uuid.uuid4().hex[:8]
    with MatrixWorker(env, pool="solo", concurrency=1) as worker:
        result = app.tasks[mapp.JOB].apply_async(
            (case,), {"hold_s": 3.0}, queue=env["CEXM_QUEUE"], countdown=1
        )
        assert result.get(timeout=30) == "a"
        # When the transport has had time to hand the message out again: the history is
        # watched until it has not grown for 5 s (several restore sweeps)
        sizes: list[int] = []

        def quiet() -> bool:
            sizes.append(len(events(env, case)))
            return len(sizes) > 25 and sizes[-1] == sizes[-26]

        wait_until(quiet, 30, "the history to stop growing", step=0.2)
        log = worker.output()
    # Then the body ran once: a task id that reached SUCCESS never runs its body again (I4)
    starts = [e for e in events(env, case) if e["ev"] == "start"]
    assert len(starts) == 1, (
        f"the body of {result.id} ran {len(starts)} times: the broker redelivered the ETA "
        "message after the first copy succeeded, and no done mark stopped it (done marks are "
        f"written and checked only for acks_late tasks)\n{log[-3000:]}"
    )
    app.close()


def test_retry_while_the_store_is_down_is_not_lost(
    servers: tuple[RedisServer, RedisServer],
) -> None:
    # Given a task with hold="until_done" (a task option), running, whose body will call
    # self.retry() once it is let go
    broker, store = servers
    env = env_for(broker, store)
    app = mapp.make_app(env)
    case = uuid.uuid4().hex[:8]
    hist = mapp.history(env["CEXM_HISTORY"])
    with MatrixWorker(env, pool="solo", concurrency=1) as worker:
        result = app.tasks[mapp.JOB_UNTIL_DONE].apply_async(
            (case,), {"mode": "retry", "gate": True}, queue=env["CEXM_QUEUE"]
        )
        wait_until(lambda: events(env, case), 20, "the body to start")

        # When the lease store goes down, the body retries meanwhile, and the store comes back
        store.kill()
        hist.set(f"gate:{case}", 1)
        ended = tuple(f"[{result.id}] {word}" for word in ("retry", "reject", "raised"))
        wait_until(lambda: any(e in worker.output() for e in ended), 20, "the first run to end")
        store.start()

        # Then the retry runs once the store is back ("a retry is never dropped")
        try:
            wait_until(
                lambda: any(e["ev"] == "start" and e["retries"] == 1 for e in events(env, case)),
                20, "the retry to run",
            )  # fmt: skip
        except TimeoutError:
            raise AssertionError(
                "the retry was lost: apply_async of the retry raised BackendError (the "
                "enqueue lease could not be taken), and Celery turns a failed retry publish "
                f"into Reject(requeue=False)\n{worker.output()[-3000:]}"
            ) from None
    app.close()


def test_revoke_terminate_keeps_the_key_while_the_body_still_runs(
    servers: tuple[RedisServer, RedisServer],
) -> None:
    # Given an acks_late task on a prefork worker whose body runs past the broker's 2 s
    # visibility timeout, so that a redelivered copy of it waits in another pool child
    env = env_for(*servers, CEXM_ACKS_LATE="1", CEXM_VISIBILITY="2")
    app = mapp.make_app(env)
    case = uuid.uuid4().hex[:8]
    hist = mapp.history(env["CEXM_HISTORY"])
    job = app.tasks[mapp.JOB]
    key = job.exclusive_key((case,), {})
    store = store_for(app)
    with MatrixWorker(env, pool="prefork", concurrency=3) as worker:
        a = job.apply_async((case,), {"gate": True}, queue=env["CEXM_QUEUE"])
        wait_until(lambda: events(env, case), 20, "the body to start")
        wait_until(lambda: "was delivered again" in worker.output(), 20, "a redelivered copy")

        # When the task is revoked with terminate=True
        app.control.revoke(a.id, terminate=True)
        wait_until(lambda: f"Terminating {a.id}" in worker.output(), 20, "the terminate")
        freed = True
        try:  # watch the key for 3 s while the body's gate stays shut
            wait_until(lambda: not store.holders(key), 3, "the key to be freed")
        except TimeoutError:
            freed = False
        running = not any(e["ev"] == "end" for e in events(env, case))
        hist.set(f"gate:{case}", 1)  # let every body still running end
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: f"[{a.id}] succeeded" in worker.output(), 10, "an end")
        log = worker.output()
    # Then the key is not freed while a body of the task still runs. (Found: Celery
    # terminated the *waiting* redelivered copy, and task_revoked released the run lease of
    # every delivery of the id, the one whose body was running included: a duplicate could
    # then run beside it, as the matrix saw on 429f474 in case c358.)
    assert not (freed and running), (
        f"{key!r} was freed after revoke(terminate=True) while the body of {a.id} still ran "
        f"(Celery terminated another delivery of the id)\n{events(env, case)}\n"
        + "\n".join(ln for ln in log.splitlines() if a.id in ln)
    )
    app.close()
