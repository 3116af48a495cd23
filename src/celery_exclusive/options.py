"""The options of a protected task, validated once (at decoration) into a frozen dataclass.

No Celery import here: the Celery integration reads these, and so can any other integration.

``hold``: when a lease is held (docs/celery.md, "When leases are held", says more):

    running             taken when the task starts, released when it ends (default)
    queued              taken at enqueue, released when the task starts
    queued_and_running  taken at enqueue; a second lease is taken at start; the first is
                        released at start, the second at the end
    until_done          taken at enqueue, released when the task ends (success, failure,
                        or its final retry); kept across retries
    period              taken at enqueue, freed only by expiry after ``ttl``: a throttle,
                        at most one run per period per key

What each hold promises (one line each; docs/celery.md says more)::

    running             one run at a time per key; a call made meanwhile is published, and
                        meets ``on_conflict`` when it starts
    queued              at most one copy per key waits in the queue; runs are NOT exclusive
                        (two may overlap: ``self.exclusive`` is None)
    queued_and_running  one running plus at most one pending per key: calls made while one is
                        pending return the pending one; the pending one waits for the running
                        one and then runs
    until_done          one copy per key from the call to the end of its run (retries
                        included): calls made meanwhile return it
    period              at most one run per key per ``ttl`` (a throttle)

``on_conflict`` (worker side, the key is held when the task starts): ``skip`` (the run ends
SUCCESS with a result saying it was skipped and who holds the key), ``raise``
(``AlreadyRunning``, the task fails), ``retry`` (re-queued with countdown and backoff, up to
``max_retries`` times), ``wait`` (block up to ``wait_timeout``, woken by the release; then
fail with ``AlreadyRunning``, except for a ``queued_and_running`` pending copy, which goes back
to the queue and keeps its place). The default is ``wait`` under ``queued_and_running`` (that
is what "pending" means) and ``skip`` otherwise.

``on_store_error`` (worker side, the store cannot be reached when a task starts): ``retry``
(default: the task goes back to the queue with ``retry_countdown`` and backoff, as often as it
takes; nothing is lost) or ``fail`` (the task fails with ``BackendError``).

``on_duplicate`` (enqueue side, a copy is already queued): ``return_existing`` (the caller gets
the AsyncResult of the queued or running copy), ``skip`` (``apply_async`` returns None),
``raise`` (``AlreadyQueued``), ``replace`` (revoke the queued copy and queue this one: the
latest call wins, a debounce), ``keep_last`` (at most one running and one pending per key; a
call while one is pending gives the pending one this call's arguments, and returns its result).

``queue_ttl``: how long a queued call's enqueue lease lives if its task never starts (a lost
message, a purged queue), plus any countdown or ETA; None (default) takes the app's
``exclusive_queue_ttl``, an hour. A started task's lease is renewed whatever this says.

``on_lock_lost`` (the lease of a running task is found gone): ``warn`` (log, signal, and
``ensure_held()`` raises) or ``abort`` (the task is interrupted with ``LeaseLost``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .exceptions import ConfigurationError
from .validate import optional_seconds, seconds

__all__ = ["HOLDS", "ON_CONFLICT", "ON_DUPLICATE", "TASK_OPTION_NAMES", "TaskOptions"]

HOLDS = ("running", "queued", "queued_and_running", "until_done", "period")
ON_CONFLICT = ("skip", "raise", "retry", "wait")
ON_DUPLICATE = ("return_existing", "skip", "raise", "replace", "keep_last")
ON_LOCK_LOST = ("warn", "abort")
ON_STORE_ERROR = ("retry", "fail")

#: Holds that take a lease at enqueue / at the start of the run.
ENQUEUE_HOLDS = frozenset({"queued", "queued_and_running", "until_done", "period"})
RUN_HOLDS = frozenset({"running", "queued_and_running"})


@dataclass(frozen=True)
class TaskOptions:
    """Validated options of one protected task (or one call of it)."""

    key: Sequence[str] | str | Callable[..., object] | None = None
    hold: str = "running"
    #: None: by ``hold`` (see :attr:`conflict`).
    on_conflict: str | None = None
    on_duplicate: str = "return_existing"
    on_lock_lost: str = "warn"
    on_store_error: str = "retry"
    ttl: float = 30.0
    limit: int = 1
    wait_timeout: float = 60.0
    max_hold: float | None = None
    retry_countdown: float = 5.0
    retry_backoff: float = 2.0
    retry_max_countdown: float = 300.0
    max_retries: int | None = 10
    #: Seconds a queued call's enqueue lease lives if its task never starts (plus any
    #: countdown or ETA). None: the app's ``exclusive_queue_ttl`` (an hour by default).
    queue_ttl: float | None = None

    def __post_init__(self) -> None:
        _choice("hold", self.hold, HOLDS)
        if self.on_conflict is not None:
            _choice("on_conflict", self.on_conflict, ON_CONFLICT)
        _choice("on_duplicate", self.on_duplicate, ON_DUPLICATE)
        _choice("on_lock_lost", self.on_lock_lost, ON_LOCK_LOST)
        _choice("on_store_error", self.on_store_error, ON_STORE_ERROR)
        if self.on_duplicate == "replace" and self.hold not in ("queued", "queued_and_running"):
            raise ConfigurationError(
                "exclusive option on_duplicate='replace' needs hold='queued' or "
                "'queued_and_running' (a copy that is still waiting to be replaced), "
                f"not {self.hold!r}"
            )
        if self.on_duplicate == "keep_last" and self.hold != "queued_and_running":
            raise ConfigurationError(
                "exclusive option on_duplicate='keep_last' needs hold='queued_and_running' "
                f"(one running plus one pending), not {self.hold!r}"
            )
        for name in ("ttl", "wait_timeout", "retry_countdown", "retry_max_countdown"):
            seconds(f"exclusive option {name}", getattr(self, name))
        for name in ("max_hold", "queue_ttl"):
            optional_seconds(f"exclusive option {name}", getattr(self, name))
        v = self.retry_backoff
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise ConfigurationError(f"exclusive option retry_backoff must be >= 1, not {v!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ConfigurationError(
                f"exclusive option limit must be an int >= 1, not {self.limit!r}"
            )
        if self.max_retries is not None and (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ConfigurationError(
                f"exclusive option max_retries must be an int >= 0 or None, "
                f"not {self.max_retries!r}"
            )

    @property
    def conflict(self) -> str:
        """The ``on_conflict`` in effect: as given, else ``wait`` for ``queued_and_running``
        (its second copy is the pending one) and ``skip`` for every other hold."""
        if self.on_conflict is not None:
            return self.on_conflict
        return "wait" if self.hold == "queued_and_running" else "skip"

    @property
    def pending_waits(self) -> bool:
        """Whether a run that finds the key held is the pending copy, which keeps its place."""
        return self.hold == "queued_and_running" and (
            self.conflict == "wait" or self.on_duplicate == "keep_last"
        )

    @property
    def has_run_lease(self) -> bool:
        """Whether a run holds a lease while it runs (``until_done``: the enqueue one)."""
        return self.hold in RUN_HOLDS or self.hold == "until_done"

    @property
    def locks_at_enqueue(self) -> bool:
        """Whether ``apply_async`` takes a lease."""
        return self.hold in ENQUEUE_HOLDS

    @classmethod
    def build(cls, *layers: Mapping[str, Any] | None) -> TaskOptions:
        """Merge option mappings (later layers win) and validate the result.

        An unknown name is an error that lists the known ones.
        """
        merged: dict[str, Any] = {}
        for layer in layers:
            if layer is None:
                continue
            if not isinstance(layer, Mapping):
                raise ConfigurationError(
                    f"exclusive options must be a dict, not {type(layer).__name__}"
                )
            unknown = sorted(set(layer) - set(TASK_OPTION_NAMES))
            if unknown:
                raise ConfigurationError(
                    f"unknown exclusive option(s) {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(TASK_OPTION_NAMES)}"
                )
            merged.update(layer)
        return cls(**merged)

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> TaskOptions:
        """Return a validated copy with per-call ``overrides`` applied."""
        if not overrides:
            return self
        checked = TaskOptions.build(overrides)  # validates names and values
        return replace(self, **{k: getattr(checked, k) for k in overrides})


def _choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigurationError(
            f"exclusive option {name} must be one of {', '.join(choices)}; not {value!r}"
        )


TASK_OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(TaskOptions))
