"""ExclusiveTask in the calling process: eager runs, bad input, round trips, signals.

These use an app of their own (in-memory broker) and the private Redis as the store.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.signals import before_task_publish

from celery_exclusive import (
    AlreadyQueued,
    AlreadyRunning,
    ConfigurationError,
    KeyArgumentError,
    connect,
)
from celery_exclusive.celery import ExclusiveTask, exclusive, is_skipped
from celery_exclusive.celery import signals as cex_signals
from celery_exclusive.celery.config import reset, store_for


class CountingConnection(redis.Connection):
    """Counts requests sent: one per command, one per pipeline (a round trip each)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        # redis-py leaves Connection.send_packed_command unannotated
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    app = Celery(f"eager-{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://")
    pool = redis.ConnectionPool.from_url(redis_url, connection_class=CountingConnection)
    app.conf.exclusive_url = redis.Redis(connection_pool=pool)
    app.conf.exclusive_prefix = f"eager-{uuid.uuid4().hex[:8]}"
    app.conf.task_always_eager = True
    try:
        yield app
    finally:
        reset(app)


def make_tasks(app: Celery) -> Any:
    class T:
        @app.task(
            bind=True,
            base=ExclusiveTask,
            exclusive={"key": ["customer_id"]},
            lazy=False,
            shared=False,
        )
        def sync(self: ExclusiveTask, customer_id: int, nested: bool = False) -> Any:
            assert self.exclusive is not None and self.exclusive.held
            self.exclusive.ensure_held()
            if nested:
                return {"fence": self.exclusive.fence, "inner": sync.apply((customer_id,)).result}
            return customer_id

        @app.task(
            base=ExclusiveTask, exclusive={"key": ["n"], "hold": "queued"}, lazy=False, shared=False
        )
        def queued(n: int) -> int:
            return n

        @app.task(
            bind=True,
            base=ExclusiveTask,
            exclusive={"key": ["n"], "hold": "until_done"},
            lazy=False,
            shared=False,
        )
        def flaky(self: ExclusiveTask, n: int) -> int:
            if self.request.retries < 2:
                raise self.retry(countdown=0.01, max_retries=5)
            return int(self.request.retries)

    sync, queued, flaky = T.sync, T.queued, T.flaky
    return sync, queued, flaky


def test_eager_runs_follow_the_same_rules(app: Celery) -> None:
    sync, _, _ = make_tasks(app)
    # Given an eager run holding the key, when the same key is run inside it
    value = sync.delay(42, nested=True).get()
    # Then the inner run is skipped and names the outer run
    assert is_skipped(value["inner"])
    assert value["inner"]["holder"]["fence"] == value["fence"]
    # and nothing is left held
    assert list(store_for(app).leases()) == []
    assert sync.apply((42,)).get() == 42


def test_apply_never_frees_a_lease_it_does_not_own(app: Celery) -> None:
    _, queued, _ = make_tasks(app)
    app.conf.task_always_eager = False
    first = queued.delay(5)  # published to the in-memory broker; nobody consumes it
    # When the same call is run eagerly with .apply() (which bypasses apply_async)
    assert queued.apply((5,)).get() == 5
    # Then the queued copy's enqueue lease is untouched, and duplicates still find it
    holders = store_for(app).holders(queued.exclusive_key((5,)) + "@queued")
    assert [h.meta["task_id"] for h in holders] == [first.id]
    assert queued.delay(5).id == first.id


def test_until_done_is_kept_across_eager_retries_and_freed_at_the_end(app: Celery) -> None:
    _, _, flaky = make_tasks(app)
    assert flaky.delay(3).get() == 2
    assert list(store_for(app).leases()) == []


@pytest.mark.parametrize("on_conflict", ["raise", "wait"])
def test_an_eager_run_that_cannot_start_frees_its_enqueue_lease(
    app: Celery, on_conflict: str
) -> None:
    @app.task(
        base=ExclusiveTask,
        exclusive={"key": ["n"], "hold": "queued_and_running", "wait_timeout": 0.2},
        lazy=False,
        shared=False,
    )
    def both(n: int) -> int:
        return n

    key = both.exclusive_key((8,))
    # Given the run key held elsewhere (a worker running this customer)
    with store_for(app).lease(key, ttl=30):
        # When an eager call cannot start (it raises, or gives up waiting)
        result = both.apply_async((8,), exclusive={"on_conflict": on_conflict})
        if on_conflict == "raise":
            assert isinstance(result.result, AlreadyRunning), result.result
        # Then its enqueue lease is not left behind for queue_ttl
        assert store_for(app).holders(key + "@queued") == []


def test_a_switch_turns_locking_off(app: Celery) -> None:
    app.conf.exclusive_enabled = False
    app.conf.exclusive_url = "redis://127.0.0.1:1/0"  # would fail if it were contacted
    reset(app)
    _, queued, _ = make_tasks(app)

    @app.task(bind=True, base=ExclusiveTask, exclusive={"key": []}, lazy=False, shared=False)
    def plain(self: Any) -> bool:
        return self.exclusive is None

    assert plain.delay().get() is True
    assert plain.apply().get() is True
    app.conf.task_always_eager = False
    assert queued.delay(1).id != queued.delay(1).id


def test_unknown_option_or_argument_fails_at_decoration(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="unknown exclusive option"):

        @app.task(base=ExclusiveTask, exclusive={"kee": []}, lazy=False, shared=False)
        def a(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match="on_conflict"):

        @app.task(
            base=ExclusiveTask, exclusive={"on_conflict": "explode"}, lazy=False, shared=False
        )
        def b(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match="customer"):

        @app.task(base=ExclusiveTask, exclusive={"key": ["customer"]}, lazy=False, shared=False)
        def c(x: int) -> None: ...

    with pytest.raises(ConfigurationError, match="hold"):
        exclusive(hold="forever")


def test_an_argument_that_cannot_be_keyed_publishes_nothing(app: Celery) -> None:
    _, queued, _ = make_tasks(app)
    app.conf.task_always_eager = False
    published: list[str] = []

    def count(sender: Any = None, **_: Any) -> None:
        published.append(str(sender))

    before_task_publish.connect(count, weak=False)
    try:
        with pytest.raises(KeyArgumentError, match=r"'n'.*object"):
            queued.delay(object())
        with pytest.raises(ConfigurationError, match="per-call"):
            queued.apply_async((1,), exclusive={"key": lambda n: n})
        with pytest.raises(ConfigurationError, match="unknown exclusive option"):
            queued.apply_async((1,), exclusive={"hodl": "queued"})
    finally:
        before_task_publish.disconnect(count)
    assert published == []
    assert list(store_for(app).leases()) == []


def test_keys_stay_short_whatever_the_argument(app: Celery) -> None:
    _, queued, _ = make_tasks(app)
    key = queued.exclusive_key(("x" * 1_000_000,))
    assert len(key) <= 200


def test_no_store_configured_is_a_clear_error() -> None:
    app = Celery("nostore", broker="memory://")
    app.conf.task_always_eager = True

    @app.task(base=ExclusiveTask, exclusive={"key": []}, lazy=False, shared=False)
    def t() -> None: ...

    with pytest.raises(ConfigurationError, match="exclusive_url"):
        t.delay().get()


def test_round_trips_per_run_and_per_enqueue(app: Celery) -> None:
    sync, queued, _ = make_tasks(app)
    sync.delay(7).get()  # warm up: script loading happens once
    queued.delay(7)
    # A protected run: acquire + release
    before = CountingConnection.sent
    sync.delay(8).get()
    assert CountingConnection.sent - before == 2
    # An enqueue with a queued hold: one acquire (the worker side releases it: one more)
    app.conf.task_always_eager = False
    before = CountingConnection.sent
    queued.delay(8)
    assert CountingConnection.sent - before == 1


def test_signals_report_acquire_conflict_duplicate_and_release(app: Celery) -> None:
    sync, queued, _ = make_tasks(app)
    seen: list[str] = []

    def on(name: str) -> Any:
        def receiver(sender: Any = None, **kwargs: Any) -> None:
            seen.append(name)

        return receiver

    receivers = {
        cex_signals.exclusive_acquired: on("acquired"),
        cex_signals.exclusive_conflict: on("conflict"),
        cex_signals.exclusive_duplicate: on("duplicate"),
        cex_signals.exclusive_released: on("released"),
    }
    for signal, receiver in receivers.items():
        signal.connect(receiver, weak=False)
    try:
        sync.delay(9, nested=True).get()
        app.conf.task_always_eager = False
        queued.delay(9)
        queued.delay(9)
    finally:
        for signal, receiver in receivers.items():
            signal.disconnect(receiver)
    assert seen == ["acquired", "conflict", "released", "duplicate"]


def test_on_duplicate_raise_and_skip(app: Celery) -> None:
    _, queued, _ = make_tasks(app)
    app.conf.task_always_eager = False
    first = queued.delay(11)
    assert queued.apply_async((11,), exclusive={"on_duplicate": "skip"}) is None
    with pytest.raises(AlreadyQueued) as info:
        queued.apply_async((11,), exclusive={"on_duplicate": "raise"})
    assert info.value.holder["task_id"] == first.id


def test_store_may_be_given_as_a_client(app: Celery, redis_url: str) -> None:
    assert connect(redis.Redis.from_url(redis_url)).holders("nothing") == []


def test_a_decorated_task_looked_up_by_name_is_exclusive(redis_url: str) -> None:
    # Given @exclusive above @app.task on an app not yet finalized (the task is a proxy), and a
    # process that never touches that proxy: it finds the task by name, as a signature, a
    # chain or `app.tasks[name]` does
    app = Celery(f"byname-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.exclusive_url = redis_url
    app.conf.exclusive_prefix = f"byname-{uuid.uuid4().hex[:8]}"

    @exclusive(key=["n"], hold="queued_and_running")
    @app.task(name="byname.sync", shared=False)
    def sync(n: int) -> int:
        return n

    try:
        # When the app is finalized and the task looked up by name
        found = app.tasks["byname.sync"]
        # Then it is the exclusive task, enqueue hold and all
        assert isinstance(found, ExclusiveTask)
        first = app.signature("byname.sync", (1,)).delay()
        assert app.signature("byname.sync", (1,)).delay().id == first.id
        assert sync.delay(1).id == first.id  # and the proxy is the same task
    finally:
        reset(app)


def test_queue_ttl_bounds_how_long_a_queued_call_holds_its_key(redis_url: str) -> None:
    # Given a task whose queued calls hold their key 5 s (the app's default is an hour)
    app = Celery(f"qttl-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.exclusive_url = redis_url
    app.conf.exclusive_prefix = f"qttl-{uuid.uuid4().hex[:8]}"

    @app.task(
        base=ExclusiveTask, exclusive={"key": ["n"], "hold": "queued", "queue_ttl": 5}, shared=False
    )
    def job(n: int) -> int:
        return n

    store = store_for(app)
    try:
        # When calls are published (no worker takes them)
        job.delay(1)
        job.apply_async((2,), exclusive={"queue_ttl": 8})  # a call may say otherwise
        job.apply_async((3,), countdown=20)  # a countdown adds to it
        expires = {
            n: store.holders(job.exclusive_key((n,)) + "@queued")[0].expires_in for n in (1, 2, 3)
        }
        # Then each queued lease lives that long, not an hour
        assert 4 < expires[1] <= 5 and 7 < expires[2] <= 8 and 24 < expires[3] <= 25, expires
        with pytest.raises(ConfigurationError, match="queue_ttl"):
            job.apply_async((4,), exclusive={"queue_ttl": 0})
    finally:
        reset(app)
