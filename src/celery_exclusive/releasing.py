"""Releases that nobody waits for, and releases sent again, with one background thread.

Two kinds of release go through here:

* **A release sent, its answer not yet read** (:func:`release_soon`, used at the end of every
  worker run). The request is written to the store by the task's own thread, before Celery
  stores the task's result, and the connection goes back to the store's kept ones at once. Its
  next user (mostly this process's next command) reads the answer before it sends its own;
  the background thread reads those left unread after ``READ_AFTER``. So the task does not
  wait a round trip for it, and nothing changes for anyone else::

      t=0      the body ends; release written to the store    (the key is freed by the
               store as it runs the script, as before: never before the body ended)
      t=0+     Celery stores the result                       (sent after the release: a
                                                               caller that sees the result and
                                                               calls again finds the key free)
      t=0+rtt  the answer is read ("released"), by the next   -> signals, metrics; a failure
               command on that connection or by the thread       is sent again (below)

  A waiter is woken by the release script itself, whoever reads its answer. An acquire in this
  process of a key whose release answer is still unread reads it first (:func:`settle`), so a
  process never finds itself in its own way.

* **A release that failed** (the store did not answer; :func:`release_later`). A lease whose
  release failed in a store blip stays held until its ttl runs out, and for an enqueue lease
  that is ``queue_ttl`` (an hour), during which every call of the key is answered with the old
  task. So it is sent again until it succeeds or the lease has expired::

      t=0     release fails (store unreachable)      -> queued here, until the lease's expiry
      t=0.2   tried again, fails                     -> next try after 0.4 s, then 0.8 s, ... 5 s
      t=3     the store answers: released            -> a waiter on the key is woken as usual
      t>=exp  never answered until the expiry        -> dropped: the store has freed it anyway

The same thread sends the other writes that must not hold up their caller and may be tried a
few times (:meth:`Releaser.send_later`, used to count lost leases for ``stats``).
:meth:`Releaser.cancel` forgets a queued retry when its owner takes the key again (a task's
retry takes its enqueue lease again with the same task id). At worker (and pool child)
shutdown and at interpreter exit, :meth:`Releaser.flush` reads every answer still due and tries
each queued release once more. A process killed before that (SIGKILL) leaves its last lease to
expire within ``ttl``, as a run killed mid-body always did. In a forked child the queue starts
empty (it is the parent's).
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import forking
from .exceptions import BackendError

if TYPE_CHECKING:
    from .backends.base import Backend

__all__ = ["Releaser", "get_releaser", "release_later", "release_soon", "settle"]

logger = logging.getLogger(__name__)

#: How long a release's answer may stay unread (when nothing else of this process uses its
#: connection) before the background thread reads it.
READ_AFTER = 0.05
#: The thread does what falls due this soon in the same wake-up.
GRACE = READ_AFTER / 2
#: First and longest pause between two tries of one release.
FIRST_RETRY = 0.2
MAX_RETRY = 5.0


@dataclass
class _Pending:
    send: Callable[[], object]  # the write; done unless it raises
    what: str  # for the log
    until: float  # monotonic: given up by then (a lease has expired: nothing left to release)
    at: float  # monotonic: next try
    pause: float = FIRST_RETRY
    claimed: bool = False  # being tried now (by the thread, or by flush)


class Releaser:
    """Tries queued writes again, and reads release answers nobody read, from one daemon
    thread (started on first use)."""

    def __init__(self) -> None:
        self._reset_after_fork()
        forking.call_after_fork(self, Releaser._reset_after_fork)

    def _reset_after_fork(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[object, _Pending] = {}
        # (backend, key) -> collect() of this process's last release of it still unread
        self._collects: dict[tuple[int, str], Callable[[], None]] = {}
        self._thread: threading.Thread | None = None
        self._wake_at = 0.0  # when the thread next looks at the queue by itself (monotonic)

    def release_later(
        self,
        backend: Backend,
        key: str,
        token: str,
        expires_in: float,
        then: Callable[[bool], object] | None = None,
    ) -> None:
        """Send ``release(key, token)`` again until it succeeds or ``expires_in`` s passed;
        then call ``then(released)`` (from the background thread)."""

        def release() -> None:
            released = backend.release(key, token)
            logger.info(
                "released %r, whose release had failed%s",
                key,
                "" if released else " (it had expired meanwhile)",
            )
            if then is not None:
                then(released)

        self.send_later(
            release,
            f"releasing {key!r}",
            expires_in=expires_in,
            first_try=FIRST_RETRY,
            ident=(id(backend), key, token),
        )

    def collect_later(self, backend: Backend, key: str, collect: Callable[[], None]) -> None:
        """Call ``collect()`` (read a release's answer, if nobody has) in ``READ_AFTER`` s
        from the background thread, or earlier from :meth:`settle`."""
        name = (id(backend), key)

        def run() -> None:
            collect()
            with self._cond:
                if self._collects.get(name) is collect:
                    del self._collects[name]

        with self._cond:
            self._collects[name] = collect
        self.send_later(
            run,
            f"reading the answer of the release of {key!r}",
            expires_in=60.0,
            first_try=READ_AFTER,
        )

    def send_later(
        self,
        send: Callable[[], object],
        what: str,
        *,
        expires_in: float,
        first_try: float = 0.0,
        ident: object = None,
    ) -> None:
        """Call ``send()`` from the background thread in ``first_try`` s, and again with
        backoff while it raises, for at most ``expires_in`` s. A later call with the same
        ``ident`` replaces it (a release is named by its lease, which :meth:`cancel` uses)."""
        now = time.monotonic()
        entry = _Pending(send, what, until=now + expires_in, at=now + first_try)
        with self._cond:
            ident = object() if ident is None else ident
            replaced = self._pending.get(ident)
            if replaced is not None and replaced.claimed:
                ident = object()  # being tried now: both run (a release is safe to repeat)
            self._pending[ident] = entry
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="celery-exclusive-releaser", daemon=True
                )
                self._thread.start()
            elif entry.at < self._wake_at:  # else it looks in time anyway: no wake-up
                self._cond.notify_all()

    def cancel(self, backend: Backend, key: str, token: str) -> None:
        """Forget a queued retry of the release of ``key`` by ``token`` (its owner holds the
        key again)."""
        if self._pending:  # the common case costs one attribute read
            with self._cond:
                ident = (id(backend), key, token)
                entry = self._pending.get(ident)
                if entry is not None and not entry.claimed:
                    del self._pending[ident]

    def settle(self, backend: Backend, key: str) -> None:
        """Read the answer of this process's last release of ``key`` if nobody has yet: the
        store has the release, but maybe not yet run it."""
        with self._cond:
            collect = self._collects.pop((id(backend), key), None)
        if collect is not None:
            collect()

    def __len__(self) -> int:
        return len(self._pending)

    def flush(self, timeout: float = 10.0) -> None:
        """Read every answer still due and try every queued write once, now (at shutdown);
        forget them. Waits at most ``timeout`` s for those the thread is trying."""
        deadline = time.monotonic() + timeout
        with self._cond:
            mine = [e for e in self._pending.values() if not e.claimed]
            for entry in mine:
                entry.claimed = True
            # Forgotten after this one try; the thread's own (claimed before) finish theirs.
            ours = {id(e) for e in mine}
            self._pending = {i: e for i, e in self._pending.items() if id(e) not in ours}
        for entry in mine:
            self._try(entry)
        with self._cond:
            while any(e.claimed for e in self._pending.values()):
                if time.monotonic() >= deadline:
                    break
                self._cond.wait(deadline - time.monotonic())
            self._pending = {}

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                # Whatever falls due within GRACE is done in this wake-up too: one wake-up
                # reads the answers of many releases, not one each.
                soon = now + GRACE
                due = [(i, e) for i, e in self._pending.items() if e.at <= soon and not e.claimed]
                if not due:
                    if not self._pending:
                        self._wake_at = now + 60.0
                        self._cond.wait(60.0)
                        self._wake_at = 0.0
                        if not self._pending:
                            self._thread = None
                            return
                        continue
                    waits = [e.at for e in self._pending.values() if not e.claimed]
                    self._wake_at = min(waits) if waits else now + 1.0
                    self._cond.wait(self._wake_at - now)
                    self._wake_at = 0.0
                    continue
                for _, entry in due:
                    entry.claimed = True
            for ident, entry in due:
                done = self._try(entry)
                with self._cond:
                    entry.claimed = False
                    if self._pending.get(ident) is not entry:
                        continue  # flushed or replaced meanwhile
                    now = time.monotonic()
                    if done or now >= entry.until:
                        del self._pending[ident]
                    else:
                        entry.pause = min(entry.pause * 2, MAX_RETRY)
                        entry.at = min(now + entry.pause, entry.until)
                    self._cond.notify_all()

    @staticmethod
    def _try(entry: _Pending) -> bool:
        try:
            entry.send()
        except BackendError as exc:
            logger.debug("%s failed again: %s", entry.what, exc)
            return False
        except Exception:  # the thread must survive anything a backend does
            logger.exception("%s failed", entry.what)
            return False
        return True


_releaser: Releaser | None = None
_releaser_lock = threading.Lock()


def get_releaser() -> Releaser:
    """Return this process's releaser, creating it on first use."""
    global _releaser
    with _releaser_lock:
        if _releaser is None:
            _releaser = Releaser()
            atexit.register(_releaser.flush)
        return _releaser


def release_later(
    backend: Backend,
    key: str,
    token: str,
    expires_in: float,
    then: Callable[[bool], object] | None = None,
) -> None:
    """Queue ``release(key, token)`` on this process's :class:`Releaser`."""
    get_releaser().release_later(backend, key, token, expires_in, then)


def release_soon(
    backend: Backend,
    key: str,
    token: str,
    expires_in: float,
    then: Callable[[bool], object] | None = None,
) -> None:
    """Send ``release(key, token)`` now without waiting for its answer, and call
    ``then(released)`` once it is read (see the module docs); on a store that cannot, release
    here. A release that fails is sent again until it succeeds or ``expires_in`` s passed.
    Never raises for a store error."""
    releaser = get_releaser()

    def done(result: bool | BackendError) -> None:
        if isinstance(result, BackendError):
            logger.warning("releasing %r failed (%s): trying again in the background", key, result)
            releaser.release_later(backend, key, token, expires_in, then)
        elif then is not None:
            then(result)

    try:
        collect = backend.send_release(key, token, done)
        if collect is None:
            done(backend.release(key, token))
            return
    except BackendError as exc:
        done(exc)
        return
    releaser.collect_later(backend, key, collect)


def settle(backend: Backend, key: str) -> None:
    """Read the answer of this process's last release of ``key`` if nobody has yet (see
    Releaser.settle); costs one attribute read when there is none."""
    releaser = _releaser
    if releaser is not None and releaser._collects:
        releaser.settle(backend, key)


forking.replace_after_fork(sys.modules[__name__], "_releaser_lock", threading.Lock)
