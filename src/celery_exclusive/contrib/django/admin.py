"""The admin page of held leases: read live from the store, with a guarded release.

Who sees what::

    staff with celery_exclusive.view_heldlease     the list (filter by glob), no release button
    ... and celery_exclusive.release_lease         a Release button per holder
    anyone else posting to release/                403, nothing released

Every forced release is written to the admin's log (``LogEntry``, a deletion of a
``HeldLease`` with the key as its object id), so "Recent actions" and the log table say who
released what, and whose lease it was.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from ...backends.base import Holder, LeaseInfo
from ...exceptions import ExclusiveError
from ...store import validate_key
from .conf import get_store
from .models import HeldLease

__all__ = ["HeldLeaseAdmin"]

#: Rows shown at most; narrow the list with the filter beyond that.
MAX_LEASES = 500

#: Seconds between reloads when auto-refresh is on.
REFRESH_SECONDS = 5

_GLOB = set("*?[")


def to_glob(query: str) -> str | None:
    """Return the glob a filter text means: a glob as is, plain text as a substring."""
    query = query.strip()
    if not query:
        return None
    return query if _GLOB & set(query) else f"*{query}*"


def holder_row(info: LeaseInfo, holder: Holder) -> dict[str, Any]:
    """One table row: the facts the page shows about one holder of a key."""
    meta = dict(holder.meta)
    worker = meta.get("node") or ":".join(str(meta[k]) for k in ("host", "pid") if k in meta)
    return {
        "key": info.key,
        "token": holder.token,
        "fence": holder.fence,
        "task_id": meta.get("task_id", ""),
        "task_name": meta.get("task_name", ""),
        "state": meta.get("state", ""),
        "worker": worker,
        "acquired_at": datetime.fromtimestamp(holder.acquired_at, timezone.utc),
        "renewed_at": datetime.fromtimestamp(holder.renewed_at, timezone.utc),
        "expires_in": holder.expires_in,
    }


@admin.register(HeldLease)
class HeldLeaseAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Lists the leases of the configured store; releases one with ``release_lease``."""

    release_permission = "release_lease"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_release_permission(self, request: HttpRequest) -> bool:
        """Whether the user may force-release leases."""
        user: Any = request.user
        return bool(user.has_perm(f"{self.opts.app_label}.{self.release_permission}"))

    def get_urls(self) -> list[URLPattern]:
        info = (self.opts.app_label, self.opts.model_name)
        return [
            path(
                "",
                self.admin_site.admin_view(self.changelist_view),
                name="{}_{}_changelist".format(*info),
            ),
            path(
                "release/",
                self.admin_site.admin_view(self.release_view),
                name="{}_{}_release".format(*info),
            ),
        ]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        query = request.GET.get("q", "").strip()
        refresh = request.GET.get("refresh") == "1"
        rows: list[dict[str, Any]] = []
        error = ""
        store_name = ""
        truncated = False
        try:
            store = get_store()
            store_name = store.backend.describe()
            infos = list(itertools.islice(store.leases(to_glob(query)), MAX_LEASES + 1))
            truncated = len(infos) > MAX_LEASES
            for info in sorted(infos[:MAX_LEASES], key=lambda i: i.key):
                rows.extend(holder_row(info, h) for h in info.holders)
        except ExclusiveError as exc:
            error = f"Could not read the leases: {exc}"
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "app_label": self.opts.app_label,
            "title": "Held leases",
            "subtitle": None,
            "rows": rows,
            "query": query,
            "refresh": refresh,
            "refresh_seconds": REFRESH_SECONDS,
            "refresh_query": urlencode({"q": query, "refresh": "0" if refresh else "1"}),
            "can_release": self.has_release_permission(request),
            "error": error,
            "store": store_name,
            "truncated": truncated,
            "max_leases": MAX_LEASES,
            **(extra_context or {}),
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "celery_exclusive/admin/held_leases.html", context)

    def release_view(self, request: HttpRequest) -> HttpResponse:
        """Force-release one holder (``token``) or every holder of ``key``; POST only."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_release_permission(request):
            raise PermissionDenied
        key = request.POST.get("key", "")
        token = request.POST.get("token") or None
        back = reverse(
            f"{self.admin_site.name}:{self.opts.app_label}_{self.opts.model_name}_changelist"
        )
        query = request.POST.get("q", "")
        if query:
            back += "?" + urlencode({"q": query})
        try:
            validate_key(key)
            store = get_store()
            before = [h for h in store.holders(key) if token is None or h.token == token]
            removed = store.force_release(key, token)
        except ExclusiveError as exc:
            messages.error(request, f"Could not release {key!r}: {exc}")
            return HttpResponseRedirect(back)
        if not removed:
            messages.warning(request, f"{key!r} was no longer held: nothing was released.")
            return HttpResponseRedirect(back)
        self.log_release(request, key, before)
        messages.success(
            request,
            f"Released {removed} hold(s) on {key!r}. The holder finds its lease lost at its "
            "next renewal.",
        )
        return HttpResponseRedirect(back)

    def log_release(self, request: HttpRequest, key: str, holders: list[Holder]) -> LogEntry:
        """Write the forced release to the admin log: who released whose lease."""
        whose = "; ".join(
            "token {token}, fence {fence}, task {task} {name}, worker {worker}".format(
                token=h.token,
                fence=h.fence,
                task=h.meta.get("task_id", "-"),
                name=h.meta.get("task_name", ""),
                worker=holder_row(LeaseInfo(key, [h]), h)["worker"] or "-",
            )
            for h in holders
        )
        content_type = ContentType.objects.get_for_model(HeldLease, for_concrete_model=False)
        entry: LogEntry = LogEntry.objects.create(
            user_id=request.user.pk,
            content_type=content_type,
            object_id=key,
            object_repr=key[:200],
            action_flag=DELETION,
            change_message=f"Force-released lease {key!r} ({whose or 'holder unknown'}).",
        )
        return entry
