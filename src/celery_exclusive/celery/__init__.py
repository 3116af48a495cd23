"""Celery integration: ``ExclusiveTask``, the ``@exclusive`` decorator, and signals.

::

    from celery import shared_task
    from celery_exclusive.celery import ExclusiveTask

    @shared_task(base=ExclusiveTask, exclusive={"key": []})           # one run_report at a time
    def run_report(): ...

    @shared_task(
        base=ExclusiveTask, exclusive={"key": ["customer_id"], "hold": "queued_and_running"}
    )
    def sync_customer(customer_id): ...  # one at a time per customer, at most one more waiting

App-wide defaults: ``app.conf.exclusive_url``, ``exclusive_ttl``, ``exclusive_on_conflict``,
... (``CELERY_EXCLUSIVE_*`` in Django settings); ``exclusive_enabled = False`` turns every lock
off (for test suites that want none).
"""

from __future__ import annotations

from . import handlers as _handlers  # noqa: F401  (connects the worker signal handlers)
from . import metrics as _metrics  # noqa: F401  (feeds the Prometheus metrics; after handlers)
from . import startup as _startup  # noqa: F401  (checks the configuration at worker start)
from .decorator import exclusive
from .task import ExclusiveTask, is_skipped

__all__ = ["ExclusiveTask", "exclusive", "is_skipped"]
