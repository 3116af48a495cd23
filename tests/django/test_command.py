"""``manage.py exclusive list|show|release`` on a real store (the database cache, and Redis)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings

from celery_exclusive import Store, connect

KEY = "myapp.sync_customer:customer_id=42"


@pytest.fixture
def store(configured_store: Store) -> Store:
    return configured_store


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("exclusive", *args, stdout=out)
    return out.getvalue()


def test_list_shows_held_leases_as_json(store: Store) -> None:
    lease = store.lease(KEY, meta={"task_id": "t-42", "task_name": "myapp.sync_customer"})
    assert lease.acquire()
    rows = json.loads(run("list", "--json"))
    assert [(r["key"], r["task_id"], r["token"]) for r in rows] == [(KEY, "t-42", lease.token)]
    assert json.loads(run("list", "--json", "--match", "other:*")) == []
    assert KEY in run("list")
    lease.release()
    assert "no leases held" in run("list")


def test_show_prints_the_holders_and_fails_on_a_free_key(store: Store) -> None:
    lease = store.lease(KEY, meta={"task_id": "t-42"})
    lease.acquire()
    (holder,) = json.loads(run("show", KEY, "--json"))
    assert holder["token"] == lease.token and holder["fence"] == lease.fence
    lease.release()
    with pytest.raises(CommandError) as info:
        run("show", KEY)
    assert info.value.returncode == 1


def test_release_frees_the_key_and_the_holder_finds_it_lost(store: Store) -> None:
    lease = store.lease(KEY, ttl=30)
    lease.acquire()
    other = store.lease(KEY)
    assert not other.acquire()
    assert json.loads(run("release", KEY, "--token", lease.token, "--json")) == {
        "key": KEY,
        "released": 1,
    }
    assert store.holders(KEY) == []
    assert other.acquire()
    assert lease.renew() is False  # the released holder learns it at its next renewal
    with pytest.raises(CommandError) as info:
        run("release", KEY, "--token", lease.token)
    assert info.value.returncode == 1
    other.release()


def test_a_store_error_is_a_command_error() -> None:
    with (
        override_settings(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL="nosuch://x"),
        pytest.raises(CommandError, match="unknown store scheme"),
    ):
        run("list")


def test_the_store_urls_own_prefix_applies_when_no_prefix_is_set(tmp_path: Path) -> None:
    # Given a lease held under the prefix that the store URL itself names
    url = f"sqlite:///{tmp_path}/leases.db?prefix=from-url"
    holder = connect(url)
    lease = holder.lease(KEY)
    assert lease.acquire()
    # When the command lists the store of settings that name that URL and no prefix
    with override_settings(
        CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL=url, CELERY_EXCLUSIVE_PREFIX=None
    ):
        rows = json.loads(run("list", "--json"))
    # Then it finds the lease: no default prefix was passed over the URL's
    assert [r["key"] for r in rows] == [KEY]
    lease.release()
    holder.close()
