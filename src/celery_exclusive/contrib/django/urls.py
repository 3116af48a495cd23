"""URLs of the Django app, for your project's ``urls.py``::

    path("celery-exclusive/", include("celery_exclusive.contrib.django.urls"))

``<prefix>metrics``: the Prometheus metrics (see :mod:`celery_exclusive.contrib.django.views`).
"""

from __future__ import annotations

from django.urls import path

from . import views

app_name = "celery_exclusive"

urlpatterns = [path("metrics", views.metrics, name="metrics")]
