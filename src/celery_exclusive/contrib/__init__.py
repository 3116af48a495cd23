"""Integrations with frameworks other than Celery, each in its own sub-package.

:mod:`celery_exclusive.contrib.django`: the Django app (settings, system checks, the
``exclusive`` management command and an admin page of held leases).
"""
