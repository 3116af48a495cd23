"""URLs of the test project: the admin, and the app's metrics view."""

from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("celery-exclusive/", include("celery_exclusive.contrib.django.urls")),
]
