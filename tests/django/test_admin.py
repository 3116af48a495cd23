"""The admin page of held leases, through Django's test client (the browser test is separate)."""

from __future__ import annotations

from typing import Any

from django.contrib.admin.models import DELETION, LogEntry
from django.test import Client, override_settings
from django.urls import reverse

from celery_exclusive import Store

KEY = "myapp.sync_customer:customer_id=42"
LIST_URL = "/admin/celery_exclusive/heldlease/"
RELEASE_URL = "/admin/celery_exclusive/heldlease/release/"


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def hold(store: Store, key: str = KEY) -> Any:
    lease = store.lease(
        key,
        meta={"task_id": "t-42", "task_name": "myapp.sync_customer", "node": "celery@w1"},
    )
    assert lease.acquire()
    return lease


def test_urls_are_named_like_the_admins() -> None:
    assert reverse("admin:celery_exclusive_heldlease_changelist") == LIST_URL
    assert reverse("admin:celery_exclusive_heldlease_release") == RELEASE_URL


def test_superuser_sees_the_lease_and_a_release_button(leases: Store, superuser: Any) -> None:
    lease = hold(leases)
    page = client_for(superuser).get(LIST_URL).content.decode()
    for text in (KEY, "t-42", "myapp.sync_customer", "celery@w1", str(lease.fence)):
        assert text in page
    assert 'name="release"' in page
    lease.release()


def test_release_frees_the_key_and_writes_the_admin_log(leases: Store, superuser: Any) -> None:
    lease = hold(leases)
    response = client_for(superuser).post(
        RELEASE_URL, {"key": KEY, "token": lease.token, "q": "sync"}
    )
    assert response.status_code == 302
    assert response["Location"] == f"{LIST_URL}?q=sync"
    assert leases.holders(KEY) == []
    entry = LogEntry.objects.filter(object_id=KEY, user=superuser).get()
    assert entry.action_flag == DELETION
    assert entry.object_repr == KEY
    assert lease.token in entry.change_message and "t-42" in entry.change_message
    assert lease.renew() is False


def test_viewer_sees_the_list_without_release_and_a_forged_post_is_refused(
    leases: Store, viewer: Any
) -> None:
    lease = hold(leases)
    client = client_for(viewer)
    page = client.get(LIST_URL).content.decode()
    assert KEY in page
    assert 'name="release"' not in page and RELEASE_URL not in page
    response = client.post(RELEASE_URL, {"key": KEY, "token": lease.token})
    assert response.status_code == 403
    assert [h.token for h in leases.holders(KEY)] == [lease.token]
    assert not LogEntry.objects.filter(object_id=KEY, user=viewer).exists()
    lease.release()


def test_staff_without_the_view_permission_sees_nothing(leases: Store, viewer: Any) -> None:
    viewer.user_permissions.clear()
    assert client_for(viewer).get(LIST_URL).status_code == 403


def test_release_is_post_only(superuser: Any) -> None:
    assert client_for(superuser).get(RELEASE_URL).status_code == 405


def test_the_filter_takes_text_or_a_glob(leases: Store, superuser: Any) -> None:
    a, b = hold(leases, "report:daily"), hold(leases, "sync:customer=7")
    client = client_for(superuser)
    assert "sync:customer=7" not in client.get(LIST_URL, {"q": "report"}).content.decode()
    page = client.get(LIST_URL, {"q": "sync:*"}).content.decode()
    assert "sync:customer=7" in page and "report:daily" not in page
    assert "No lease is held" in client.get(LIST_URL, {"q": "nothing*"}).content.decode()
    a.release()
    b.release()


def test_a_store_that_cannot_be_reached_shows_an_error_not_a_500(superuser: Any) -> None:
    url = "redis://127.0.0.1:1/0?socket_timeout=0.5"
    with override_settings(CELERY_EXCLUSIVE_CACHE=None, CELERY_EXCLUSIVE_URL=url):
        response = client_for(superuser).get(LIST_URL)
    assert response.status_code == 200
    assert "Could not read the leases" in response.content.decode()
