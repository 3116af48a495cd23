"""A Backend that sits between the library and a real store: it injects faults and reports
every call it passes on, so the model can follow what the store really did.

Faults are armed per operation and taken by the next call of that operation, whichever thread
makes it (the renewal thread makes the renewals)::

    backend.arm("acquire", FAIL_BEFORE)   # raise BackendError, the store is never asked
    backend.arm("release", LOSE_REPLY)    # the store applies the call, the caller gets an error
    backend.arm("renew", DELAY)           # the store applies it now, the reply waits on an Event
    backend.deliver()                     # ... until this (or DELAY_CAP seconds) lets it go

Every call that reaches the store is reported to ``listener.begin(call)`` before it is sent and
``listener.end(call)`` after the store answered (``call.result``) or raised (``call.error``),
whether or not a fault then hides the answer from the caller.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from celery_exclusive.backends.base import Backend, Conflict, Grant, Holder, LeaseInfo, RenewRequest
from celery_exclusive.exceptions import BackendError

__all__ = [
    "DELAY",
    "DELAY_CAP",
    "FAIL_BEFORE",
    "LOSE_REPLY",
    "Call",
    "FaultyBackend",
    "InjectedError",
]

FAIL_BEFORE = "fail-before"
LOSE_REPLY = "lose-reply"
DELAY = "delay"

#: A delayed reply is handed back after at most this many seconds even if nobody delivers it,
#: so that no fault can hang a test.
DELAY_CAP = 4.0

_ids = itertools.count(1)

_T = TypeVar("_T")


class InjectedError(BackendError):
    """A store error this wrapper made up (``FAIL_BEFORE``, ``LOSE_REPLY``), never the store's."""


@dataclass
class Call:
    """One call that reached the store: what was asked, when, and what the store said."""

    op: str  # "acquire", "release", "renew", "force_release"
    keys: tuple[str, ...]  # one per token (renew: one per request); force_release(all): one
    tokens: tuple[str, ...]  # force_release of every holder: none
    ttls: tuple[float, ...] = ()
    limit: int = 1
    fault: str | None = None
    sent: float = field(default_factory=time.monotonic)
    end: float | None = None
    result: Any = None
    error: BaseException | None = None  # the store's (or backend's) own error, not injected
    delivered: bool = False  # the caller got ``result`` (no fault hid it)
    pid: int = field(default_factory=os.getpid)
    id: int = field(default_factory=lambda: next(_ids))


class Listener(Protocol):
    def begin(self, call: Call) -> None: ...

    def end(self, call: Call) -> None: ...

    def delivered(self, call: Call) -> None: ...


class _Nobody:
    def begin(self, call: Call) -> None:
        pass

    def end(self, call: Call) -> None:
        pass

    def delivered(self, call: Call) -> None:
        pass


_instances: weakref.WeakSet[FaultyBackend] = weakref.WeakSet()


class FaultyBackend(Backend):
    """Delegates to ``inner``; see the module docs for the faults."""

    def __init__(self, inner: Backend, listener: Listener | None = None) -> None:
        self.inner = inner
        self.scheme = inner.scheme
        self.listener: Listener = listener or _Nobody()
        self._lock = threading.Lock()
        self._armed: dict[str, list[tuple[str, str | None]]] = {}
        self._release_delayed = threading.Event()
        self.delayed_waiting = threading.Event()  # set while a delayed reply is held back
        self.calls_in_this_process: list[Call] = []
        _instances.add(self)

    # -- faults ------------------------------------------------------------------------------

    def arm(self, op: str, fault: str, token: str | None = None) -> None:
        """Give ``fault`` to the next ``op`` call (only one carrying ``token``, if given)."""
        with self._lock:
            if fault == DELAY:
                self._release_delayed.clear()
            self._armed.setdefault(op, []).append((fault, token))

    def disarm(self, op: str | None = None, token: str | None = None) -> None:
        """Forget armed faults: all, or those of ``op`` (and ``token``) nobody took."""
        with self._lock:
            if op is None:
                self._armed.clear()
            else:
                self._armed[op] = [f for f in self._armed.get(op, []) if f[1] != token]

    def armed(self, op: str, fault: str | None = None) -> bool:
        """Whether a fault (``fault``, if given) waits for the next ``op`` call."""
        with self._lock:
            return any(fault in (None, f) for f, _ in self._armed.get(op, []))

    def deliver(self) -> None:
        """Let every delayed reply go."""
        self._release_delayed.set()

    def _take(self, call: Call) -> str | None:
        with self._lock:
            faults = self._armed.get(call.op, [])
            for i, (fault, token) in enumerate(faults):
                if token is None or token in call.tokens:
                    del faults[i]
                    return fault
            return None

    def _run(self, call: Call, fn: Callable[[], _T]) -> _T:
        call.fault = self._take(call)
        if call.fault == FAIL_BEFORE:
            raise InjectedError(f"injected: {call.op} failed before it was sent")
        self.calls_in_this_process.append(call)
        self.listener.begin(call)
        try:
            result = fn()
            call.result = result
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            call.end = time.monotonic()
            self.listener.end(call)
        if call.fault == LOSE_REPLY:
            raise InjectedError(f"injected: the reply to {call.op} was lost")
        if call.fault == DELAY:
            self.delayed_waiting.set()
            try:
                self._release_delayed.wait(DELAY_CAP)
            finally:
                self.delayed_waiting.clear()
        call.delivered = True
        self.listener.delivered(call)
        return result

    # -- the Backend interface ---------------------------------------------------------------

    def acquire(
        self, key: str, token: str, *, ttl: float, limit: int, meta: str, wait: float = 0.0
    ) -> Grant | Conflict:
        call = Call("acquire", (key,), (token,), (ttl,), limit)
        return self._run(
            call,
            lambda: self.inner.acquire(key, token, ttl=ttl, limit=limit, meta=meta, wait=wait),
        )

    def release(self, key: str, token: str) -> bool:
        call = Call("release", (key,), (token,))
        return self._run(call, lambda: self.inner.release(key, token))

    def renew(self, requests: Sequence[RenewRequest]) -> list[bool]:
        if not requests:
            return self.inner.renew(requests)
        call = Call(
            "renew",
            tuple(r.key for r in requests),
            tuple(r.token for r in requests),
            tuple(r.ttl for r in requests),
        )
        return self._run(call, lambda: self.inner.renew(requests))

    def force_release(self, key: str, token: str | None = None) -> int:
        call = Call("force_release", (key,), () if token is None else (token,))
        return self._run(call, lambda: self.inner.force_release(key, token))

    def wait(self, key: str, timeout: float) -> bool:
        return self.inner.wait(key, timeout)

    def holders(self, key: str) -> list[Holder]:
        return self.inner.holders(key)

    def scan(self, match: str | None = None) -> Iterator[LeaseInfo]:
        return self.inner.scan(match)

    def mark_done(self, key: str, task_id: str, ttl: float) -> None:
        self.inner.mark_done(key, task_id, ttl)

    def is_done(self, key: str, task_id: str) -> bool:
        return self.inner.is_done(key, task_id)

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> str:
        return f"faulty({self.inner.describe()})"


def _reset_after_fork() -> None:
    # A lock another thread held at fork() would stay held in the child: the child's calls
    # must not hang on the test's own wrapper (that would be blamed on the library).
    for backend in list(_instances):
        backend._lock = threading.Lock()
        backend.calls_in_this_process = []
        backend.listener = _Nobody()
        backend._armed = {}
        backend._release_delayed = threading.Event()
        backend._release_delayed.set()


os.register_at_fork(after_in_child=_reset_after_fork)
