"""``ExclusiveTask``: a Celery task that holds a lease while it runs, or while it is queued.

::

    @shared_task(base=ExclusiveTask, exclusive={"key": ["customer_id"], "on_conflict": "skip"})
    def sync_customer(customer_id): ...

Where the leases are taken and given back, and why there:

* **At enqueue**, in ``apply_async`` (see :mod:`.enqueue`): the enqueue lease, owned by the
  task id, living ``queue_ttl`` plus the countdown/ETA; a duplicate call meets
  ``on_duplicate``. The worker releases it when the task starts (``queued``) or ends
  (``until_done``), and on revoke (see :mod:`.handlers`).
* **At the start of a run**, in ``__call__`` (see :mod:`.run`): the run lease, released in a
  ``finally`` around the body; a run that finds the key held meets ``on_conflict``, and a
  redelivered copy of a running task waits for it instead.

The message's header and the enqueue key are in :mod:`.message`; a task's options and key
builder in :mod:`.keying`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Task

from ..lease import Lease
from ..options import TaskOptions
from . import enqueue
from .config import settings_for
from .enqueue import Call
from .keying import build_key, key_builder
from .message import HEADER
from .run import Run, current_lease

__all__ = ["HEADER", "ExclusiveTask", "is_skipped"]


def is_skipped(result: object) -> bool:
    """Whether a task result is the record of a run skipped because the key was held."""
    return isinstance(result, Mapping) and result.get("exclusive") == "skipped"


class ExclusiveTask(Task):  # type: ignore[misc]  # Celery's Task is untyped
    """A task that runs at most ``limit`` (default 1) at a time per key.

    Options come from the ``exclusive`` task option (a dict; see
    :mod:`celery_exclusive.options`), over the app's ``exclusive_*`` settings, and may be
    overridden per call with ``apply_async(exclusive={...})``. Inside the task,
    ``self.exclusive`` is the :class:`~celery_exclusive.Lease` of the current run (or None)::

        @app.task(bind=True, base=ExclusiveTask, exclusive={"key": []})
        def nightly_sync(self):
            for batch in batches():
                self.exclusive.ensure_held()
                write(batch, fence=self.exclusive.fence)
    """

    abstract = True
    #: The options given at decoration, validated then (see ``__init_subclass__``).
    exclusive_options: Mapping[str, Any] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Celery turns task options into class attributes: take ours out of the way of the
        # ``exclusive`` property, and validate it now, at decoration, not at the first run.
        given = cls.__dict__.get("exclusive")
        if given is not None and not isinstance(given, property):
            options = TaskOptions.build(given)
            cls.exclusive_options = given
            delattr(cls, "exclusive")
            # Argument names are checked against the signature now, when the name is known.
            key_builder(cls, options.key, cls.__dict__.get("name"))

    @property
    def exclusive(self) -> Lease | None:
        """The lease of the current run (None outside a protected run)."""
        return current_lease(self.request)

    def exclusive_key(
        self, args: Any = None, kwargs: Any = None, overrides: Mapping[str, Any] | None = None
    ) -> str:
        """Return the lease key of a call with ``args`` and ``kwargs``."""
        return build_key(self, args, kwargs, overrides)

    def apply_async(
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        **options: Any,
    ) -> Any:
        """Publish the task, taking its enqueue lease first when ``hold`` asks for one.

        ``exclusive={...}`` overrides this call's options. On a duplicate:
        ``return_existing`` returns the AsyncResult of the copy already queued or running,
        ``skip`` returns None, ``raise`` raises :class:`AlreadyQueued`. The key is computed
        before anything is published, so a bad argument fails here with nothing sent.
        """
        call = Call(args, kwargs, task_id, producer, link, link_error, shadow, options)
        return enqueue.apply(self, call, self._publish)

    def _publish(self, call: Call) -> Any:
        """Publish ``call`` with Celery's own ``apply_async`` (the one place that does)."""
        return super().apply_async(
            call.args,
            call.kwargs,
            call.task_id,
            call.producer,
            call.link,
            call.link_error,
            call.shadow,
            **call.options,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task, holding its run lease when ``hold`` asks for one (see :mod:`.run`)."""
        request = self.request
        if request.called_directly or not settings_for(self.app).enabled:
            return super().__call__(*args, **kwargs)
        return Run(self, args, kwargs)(super().__call__, args, kwargs)
