"""URLs: the admin, with its "Held leases" page under Celery exclusive."""

from __future__ import annotations

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
