"""What a protected task's message carries, and what the library reads from it.

The ``exclusive`` header (the call's key, its per-call options, how often the library sent it
back to the queue), the enqueue lease's key, and the facts of a call that decide how long a
lease lives or whether a redelivery may follow: one place for each, read by the enqueue side
(``enqueue``), the worker side (``run``) and the signal handlers (``handlers``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from ..exceptions import ConfigurationError
from ..options import TaskOptions

__all__ = [
    "HEADER",
    "PERIOD_SUFFIX",
    "QUEUED_SUFFIX",
    "call_record",
    "delay",
    "enqueue_key",
    "in_canvas",
    "may_have_run",
    "read_header",
    "time_limit",
]

#: The message header carrying the key and per-call options to the worker (copied on retries).
HEADER = "exclusive"
QUEUED_SUFFIX = "@queued"
PERIOD_SUFFIX = "@period"


def read_header(request: Any) -> dict[str, Any]:
    """A copy of this library's message header (key, per-call options, ``requeued``)."""
    value = (getattr(request, "headers", None) or {}).get(HEADER)
    if value is None:
        value = getattr(request, HEADER, None)
    return dict(value) if isinstance(value, dict) else {}


def enqueue_key(key: str, opts: TaskOptions) -> str:
    """The key of a call's enqueue lease (``until_done``: one lease from enqueue to the end
    of the run, on the plain key)."""
    if opts.hold == "until_done":
        return key
    return key + (PERIOD_SUFFIX if opts.hold == "period" else QUEUED_SUFFIX)


def may_have_run(request: Any) -> bool:
    """Whether another copy of this task id may have run to its end before this one.

    A redelivered message, a retry, the library's own requeue; and any message with an ETA or
    countdown: the worker holds it unacked until it is due, so the broker may have handed it
    to another worker too after ``visibility_timeout`` (not always flagged as redelivered).
    """
    redelivered = (getattr(request, "delivery_info", None) or {}).get("redelivered")
    return bool(
        redelivered or request.retries or request.eta or read_header(request).get("requeued")
    )


def delay(options: Mapping[str, Any]) -> float:
    """Seconds until a call published with ``options`` is due (its countdown or ETA)."""
    countdown = options.get("countdown")
    if countdown:
        return max(float(countdown), 0.0)
    eta = options.get("eta")
    if isinstance(eta, datetime):
        now = datetime.now(eta.tzinfo or timezone.utc) if eta.tzinfo else datetime.now()
        return max((eta - now).total_seconds(), 0.0)
    return 0.0


def in_canvas(options: Mapping[str, Any], link: Any, link_error: Any) -> bool:
    """Whether the call is part of a group, chord or chain (or has callbacks)."""
    return bool(
        options.get("group_id")
        or options.get("chord")
        or options.get("chain")
        or link
        or link_error
    )


def call_record(name: str, args: Any, kwargs: Any) -> dict[str, Any]:
    """The arguments keep_last hands to the pending copy, checked to survive JSON."""
    call = {"args": list(args or ()), "kwargs": dict(kwargs or {})}
    try:
        json.dumps(call)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"{name}: on_duplicate='keep_last' keeps the newest arguments in the store as JSON, "
            f"and these are not JSON: {exc}"
        ) from exc
    return call


def time_limit(task: Any, request: Any) -> float | None:
    """The hard time limit of this run of ``task`` (None when it has none)."""
    limits = getattr(request, "timelimit", None) or (None, None)
    hard = limits[0] if limits and limits[0] else getattr(task, "time_limit", None)
    if hard is None:
        hard = task.app.conf.get("task_time_limit")
    return float(hard) if hard else None
