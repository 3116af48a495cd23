"""The metrics view through Django's test client, after real (eager) tasks ran in this process."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse
from prometheus_client.parser import text_string_to_metric_families

TOKEN = "s3cret-scrape-token"


@pytest.fixture(scope="module")
def tasks() -> Any:
    """A throwaway app whose tasks run eagerly here, on a store of this process."""
    from celery import Celery

    from celery_exclusive.celery import ExclusiveTask

    app = Celery(f"cex_view_{uuid.uuid4().hex[:8]}", set_as_current=False)
    app.conf.update(
        task_always_eager=True,
        broker_url="memory://",
        exclusive_url=f"memory://view-{uuid.uuid4().hex[:8]}",
    )
    name = f"cex_view_{uuid.uuid4().hex[:8]}"

    @app.task(base=ExclusiveTask, exclusive={"key": []}, name=f"{name}.run", shared=False)
    def run() -> str:
        return "ran"

    @app.task(
        base=ExclusiveTask,
        exclusive={"key": [], "hold": "period", "ttl": 60, "on_duplicate": "skip"},
        name=f"{name}.throttled",
        shared=False,
    )
    def throttled() -> str:
        return "ran"

    return run, throttled


def scrape(client: Client, **headers: str) -> Any:
    return client.get(reverse("celery_exclusive:metrics"), headers=headers)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[s.name, frozenset(s.labels.items())] = s.value
    return found


@override_settings(CELERY_EXCLUSIVE_METRICS_TOKEN=TOKEN)
def test_the_view_serves_the_counts_of_this_process(tasks: Any) -> None:
    run, throttled = tasks
    # Given three runs of a task, and three calls of a throttled one (two of them duplicates)
    assert [run.delay().get() for _ in range(3)] == ["ran"] * 3
    published = [throttled.delay() for _ in range(3)]
    assert sum(p is not None for p in published) == 1
    # When Prometheus scrapes the view with its token
    reply = scrape(Client(), Authorization=f"Bearer {TOKEN}")
    # Then it gets the counts
    assert reply.status_code == 200
    assert reply["Content-Type"].startswith("text/plain")
    found = samples(reply.content.decode())
    assert found["celery_exclusive_acquisitions_total", frozenset({("task", run.name)})] == 3
    key = (
        "celery_exclusive_duplicates_total",
        frozenset({("task", throttled.name), ("action", "skip")}),
    )
    assert found[key] == 2
    assert found["celery_exclusive_hold_seconds_count", frozenset({("task", run.name)})] == 3


@override_settings(CELERY_EXCLUSIVE_METRICS_TOKEN=TOKEN)
def test_the_view_refuses_a_wrong_token_and_a_user_without_the_permission() -> None:
    from django.contrib.auth.models import User

    assert scrape(Client()).status_code == 403
    assert scrape(Client(), Authorization="Bearer wrong").status_code == 403
    client = Client()
    client.force_login(User.objects.create_user(f"u-{uuid.uuid4().hex[:8]}", is_staff=True))
    assert scrape(client).status_code == 403


def test_a_user_with_the_permission_may_read_it(viewer: Any) -> None:
    client = Client()
    client.force_login(viewer)
    reply = scrape(client)
    assert reply.status_code == 200
    assert scrape(Client()).status_code == 403  # no token set: only such users
