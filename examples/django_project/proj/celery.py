"""The Celery app: every ``CELERY_*`` Django setting is its configuration.

``CELERY_EXCLUSIVE_URL`` (or ``CELERY_EXCLUSIVE_CACHE``, which the Django app turns into it)
becomes ``exclusive_url``: the store of the tasks' leases.
"""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
