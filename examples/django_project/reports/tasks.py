"""Two tasks that must not overlap.

``run_report``: one at a time, globally (``key: []``). A second call while one runs is
skipped: it ends SUCCESS with a record naming the holder.

``sync_customer(customer_id)``: one at a time per customer (``key: ["customer_id"]``), and
no pile-up: with ``hold="queued_and_running"`` at most one copy per customer waits in the
queue while one runs; ``delay()`` of a customer already queued returns the queued copy's
AsyncResult instead of publishing again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task

from celery_exclusive.celery import ExclusiveTask

logger = logging.getLogger(__name__)


@shared_task(bind=True, base=ExclusiveTask, exclusive={"key": []})
def run_report(self: Any, seconds: float = 10.0) -> dict[str, Any]:
    """Build the report (here: sleep), never twice at once."""
    lease = self.exclusive
    logger.info("report started, fence %s", lease.fence)
    time.sleep(seconds)
    lease.ensure_held()  # raises LeaseLost if the lease was lost meanwhile
    return {"report": "done", "fence": lease.fence}


@shared_task(
    bind=True,
    base=ExclusiveTask,
    exclusive={"key": ["customer_id"], "hold": "queued_and_running"},
)
def sync_customer(self: Any, customer_id: int, seconds: float = 5.0) -> dict[str, Any]:
    """Sync one customer (here: sleep); other customers run in parallel."""
    fence = self.exclusive.fence
    logger.info("sync of customer %s started, fence %s", customer_id, fence)
    time.sleep(seconds)
    # Pass the fence to what you write, so a holder that was paused past its lease is refused:
    # UPDATE customer SET ..., last_fence = %(fence)s WHERE id = %(id)s AND last_fence < %(fence)s
    return {"customer_id": customer_id, "fence": fence}
