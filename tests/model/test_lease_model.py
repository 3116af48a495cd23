"""A stateful model-based test of the lease rules (docs/guarantees.md) on every store.

Hypothesis drives 4 owners on 3 keys (two locks and a semaphore of 2) through acquires
(non-blocking, blocking from threads, ``with`` and a timeout, by the same token again),
releases, explicit renewals, force-releases, time passing, faults between the library and the
store, a Redis restart and ``fork()``; the real renewal thread runs all along.

The model never predicts the implementation's steps. It follows what the store did, seen by a
wrapper backend (``faulty.py``) that reports every call and the store's real answer, including
answers a fault then hid from the caller, and keeps for every (key, token) an *envelope*:

* **certainly live** until ``ttl`` after the last confirmed grant/renewal was *sent* (the
  store's expiry counts from when it received it), unless a removal may have come after;
* **possibly live** until ``ttl`` after the last call that may have extended it *ended*,
  unless a removal surely came after, or while such a call is in flight.

A removal is anything after which the token surely is not live: a release (either answer),
a refused renewal, a refused acquire by that token, a force-release, a server restart.

Checked after every step (and by the wrapper at every grant):

* at most ``limit`` holders per key; every holder possibly live; every certainly live token
  present, with the fence of its grant (so a release or renewal never removed or extended
  another token, and nothing came back from the dead);
* fences rise strictly per key in real time; a re-entry by a live token keeps its fence;
* ``lease.held`` implies the token is in the store (allowing for a lease at its local
  deadline), and a lease whose token the store dropped (force-release, restart) lets go
  within its ``ttl``;
* every loss is reported (``on_lost``), and no loss is reported while the library's own
  confirmed renewal says the grant lasts (a stale reply must not hit a newer grant);
* a blocking waiter never gives up before its timeout, and is woken within ``WAKE_BOUND`` of
  the release that freed a slot for it;
* a lease on another, healthy store keeps being renewed while this store's renewals hang;
* in a forked child, the parent's leases are not held, not released, not renewed, and the
  child can take leases of its own.

A failed check that matches a known bug raises that bug's ``KnownBug`` subclass (bug numbers
from the issue, listed below). ``CELERY_EXCLUSIVE_MODEL_IGNORE=1,3`` turns the named bugs'
checks into log lines, to look for other failures on a build that still has them.
``CELERY_EXCLUSIVE_MODEL_MISMATCH=1`` adds callers with another ``limit`` on a key even where
``LimitMismatch`` does not exist (bug 5).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from celery_exclusive import Store, connect, exceptions
from celery_exclusive.backends.base import Conflict, Grant
from celery_exclusive.backends.django_cache import DjangoCacheBackend
from celery_exclusive.exceptions import AlreadyHeld, BackendError, ConfigurationError, Timeout
from celery_exclusive.lease import Lease

from ..conftest import IN_CI, SLOW
from ..forks import run_forked
from ..servers import wait_until
from .conftest import KINDS, ModelStore
from .faulty import DELAY, FAIL_BEFORE, LOSE_REPLY, Call, FaultyBackend, InjectedError

logger = logging.getLogger(__name__)

# -- the world the machine plays in ------------------------------------------------------------

#: Key name suffix -> limit. Two locks and a semaphore of 2.
KEYS = {"a": 1, "b": 1, "s": 2}
#: One ttl per owner (renewal every ttl / 3): short, so that expiry happens within a run.
OWNER_TTLS = (0.4, 0.6, 1.0, 2.0)
#: A blocking waiter must have the key within this long of the release that freed a slot.
WAKE_BOUND = 1.0
#: Slack for the store's clock against ours (wall against monotonic) and for scheduling.
MARGIN = 0.06
#: How long a forked child may take before it counts as hung.
CHILD_DEADLINE = 15.0

EXAMPLES = Path(__file__).with_name("examples")
#: CELERY_EXCLUSIVE_MODEL_SAVE=1 lets a local run store the failing examples it finds.
SAVE_EXAMPLES = bool(os.environ.get("CELERY_EXCLUSIVE_MODEL_SAVE"))
MISMATCH = hasattr(exceptions, "LimitMismatch") or bool(
    os.environ.get("CELERY_EXCLUSIVE_MODEL_MISMATCH")
)
IGNORED_BUGS = {
    int(n) for n in os.environ.get("CELERY_EXCLUSIVE_MODEL_IGNORE", "").split(",") if n.strip()
}

# -- known bugs: each check that matches one raises its own error ------------------------------


class KnownBug(AssertionError):
    number = 0


class Bug1OtherStoreStalled(KnownBug):
    """One slow store stops renewals for all stores (single renewal thread)."""

    number = 1


class Bug2Fork(KnownBug):
    """Leases made before fork() are held/renewed/released by the child, or the child hangs."""

    number = 2


class Bug3WaiterNotWoken(KnownBug):
    """A waiter is not woken by the release (e.g. a short waiter overwrote the waiter mark)."""

    number = 3


class Bug4TimeoutIgnored(KnownBug):
    """``with store.lease(key, timeout=...)`` does not wait."""

    number = 4


class Bug5LimitMismatch(KnownBug):
    """Callers with different limits on one key are both granted."""

    number = 5


class Bug6ForceRelease(KnownBug):
    """force_release counts expired holders, or accepts a token that is no holder's ('#f')."""

    number = 6


def symptom(kind: type[KnownBug], message: str) -> None:
    if kind.number in IGNORED_BUGS:
        logger.warning("known bug %s (ignored): %s", kind.number, message)
        return
    raise kind(f"[known bug {kind.number}] {message}")


# -- the model: what the store may and must hold, from what it answered ------------------------


@dataclass
class Track:
    """What the store's answers say about one token's hold on one key."""

    ttl: float = 0.0
    confirmed_sent: float = -math.inf  # last grant/renewal the store confirmed: when sent
    delivered_sent: float = -math.inf  # ... of those, the last one whose answer got through
    extend_end: float = -math.inf  # last call that may have extended it: when it ended
    removed_sent: float = -math.inf  # last sure removal: when it was sent
    removal_end: float = -math.inf  # last removal that may have happened: when it ended
    forced_sent: float = -math.inf  # last force-release or restart that surely dropped it
    forced_end: float = -math.inf  # last force-release or restart that may have dropped it
    extending: int = 0  # calls in flight that may extend it
    acquiring: int = 0  # ... of those, acquires (which may change its fence)
    acquires: int = 0  # acquires of it ever begun (to tell which ones overlapped)
    removing: int = 0  # calls in flight that may remove it
    fence: int | None = None  # fence of its grant (None: unknown)

    def certain_until(self) -> float:
        """Until when it is surely live (as judged now); -inf if not surely live."""
        if self.removing or self.removal_end > self.confirmed_sent:
            return -math.inf
        return self.confirmed_sent + self.ttl - MARGIN

    def possible(self, now: float) -> bool:
        if self.extending:
            return True
        if self.removed_sent > self.extend_end:
            return False
        return self.extend_end + self.ttl + MARGIN > now


class Model:
    """The envelope of every (key, token), fed by the wrapper backend's reports."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits = limits
        self.lock = threading.RLock()
        self.tracks: dict[str, dict[str, Track]] = defaultdict(dict)
        # (end, fence, token) of every grant
        self.grants: dict[str, list[tuple[float, int, str]]] = defaultdict(list)
        self.key_removing: dict[str, int] = defaultdict(int)
        self.violations: list[str] = []
        self.refused_renewals: list[Call] = []
        self._foreign = threading.local()

    @contextlib.contextmanager
    def foreign(self) -> Any:
        """Calls in this block come from another ``Lease`` object than the owner's own (same
        token): the store's answer extends the hold, not the owner's local deadline (rule 3
        counts from *its* last confirmed renewal), so it is not the library's own word."""
        self._foreign.on = True
        try:
            yield
        finally:
            self._foreign.on = False

    def track(self, key: str, token: str) -> Track:
        return self.tracks[key].setdefault(token, Track())

    # -- queries ---------------------------------------------------------------------------

    def certain(self, key: str, token: str, at: float) -> bool:
        with self.lock:
            if self.key_removing[key]:
                return False
            t = self.tracks[key].get(token)
            return t is not None and t.certain_until() > at

    def possible(self, key: str, token: str, at: float) -> bool:
        with self.lock:
            t = self.tracks[key].get(token)
            return t is not None and t.possible(at)

    def possible_tokens(self, key: str, at: float) -> set[str]:
        with self.lock:
            return {tok for tok, t in self.tracks[key].items() if t.possible(at)}

    def certain_tokens(self, key: str, at: float) -> set[str]:
        with self.lock:
            return {tok for tok in self.tracks[key] if self.certain(key, tok, at)}

    def fences(self, key: str) -> dict[str, int | None]:
        """Each token's known fence; None while unknown or while an acquire of it is in flight."""
        with self.lock:
            return {tok: None if t.acquiring else t.fence for tok, t in self.tracks[key].items()}

    # -- the wrapper's reports -------------------------------------------------------------

    def begin(self, call: Call) -> None:
        with self.lock:
            if call.op == "acquire":
                (key,), (token,) = call.keys, call.tokens
                t = self.track(key, token)
                t.ttl = call.ttls[0]
                call.possible_before = t.possible(call.sent)  # type: ignore[attr-defined]
                call.fence_before = t.fence  # type: ignore[attr-defined]
                # Another acquire by the same token in flight (a waiter and another Lease
                # with its token): its grant may come back after ours, so ``fence_before``
                # may not know the fence our re-entry keeps.
                call.overlapped = t.acquiring > 0  # type: ignore[attr-defined]
                t.extending += 1
                t.acquiring += 1
                t.acquires += 1
                call.acquires = t.acquires  # type: ignore[attr-defined]
            elif call.op == "renew":
                for key, token, ttl in zip(call.keys, call.tokens, call.ttls, strict=True):
                    t = self.track(key, token)
                    t.ttl = ttl
                    t.extending += 1
            elif call.op == "release":
                self.track(call.keys[0], call.tokens[0]).removing += 1
            elif call.op == "force_release":
                (key,) = call.keys
                if call.tokens:
                    self.track(key, call.tokens[0]).removing += 1
                else:
                    self.key_removing[key] += 1

    def end(self, call: Call) -> None:
        assert call.end is not None
        with self.lock:
            if call.op == "acquire":
                self._acquired(call)
            elif call.op == "renew":
                self._renewed(call)
            elif call.op == "release":
                t = self.track(call.keys[0], call.tokens[0])
                t.removing -= 1
                self._removed(t, call, forced=False)
            elif call.op == "force_release":
                (key,) = call.keys
                if call.tokens:
                    t = self.track(key, call.tokens[0])
                    t.removing -= 1
                    self._removed(t, call, forced=True)
                else:
                    self.key_removing[key] -= 1
                    for t in self.tracks[key].values():
                        self._removed(t, call, forced=True)

    def delivered(self, call: Call) -> None:
        if getattr(self._foreign, "on", False):
            return
        with self.lock:
            if call.op == "acquire" and isinstance(call.result, Grant):
                t = self.track(call.keys[0], call.tokens[0])
                t.delivered_sent = max(t.delivered_sent, call.sent)
            elif call.op == "renew":
                for key, token, ok in zip(call.keys, call.tokens, call.result, strict=True):
                    if ok:
                        t = self.track(key, token)
                        t.delivered_sent = max(t.delivered_sent, call.sent)

    def _removed(self, t: Track, call: Call, *, forced: bool) -> None:
        assert call.end is not None
        if isinstance(call.error, ConfigurationError):
            return  # refused before touching the store
        t.removal_end = max(t.removal_end, call.end)
        if forced:
            t.forced_end = max(t.forced_end, call.end)
        if call.error is None:
            t.removed_sent = max(t.removed_sent, call.sent)
            if forced:
                t.forced_sent = max(t.forced_sent, call.sent)

    def restarted(self, sent: float, end: float) -> None:
        """The store lost everything somewhere in [sent, end]."""
        with self.lock:
            for tracks in self.tracks.values():
                for t in tracks.values():
                    t.removal_end = max(t.removal_end, end)
                    t.forced_end = max(t.forced_end, end)
                    t.forced_sent = max(t.forced_sent, sent)
                    t.removed_sent = max(t.removed_sent, sent)

    def _acquired(self, call: Call) -> None:
        assert call.end is not None
        (key,), (token,) = call.keys, call.tokens
        t = self.track(key, token)
        # Surely live through the whole call, by what the store said before it?
        was_certain = not self.key_removing[key] and t.certain_until() > call.end
        t.extending -= 1
        t.acquiring -= 1
        if call.error is not None:
            if not isinstance(call.error, ConfigurationError):
                t.extend_end = max(t.extend_end, call.end)  # it may have been granted
                if not was_certain:
                    # Granted anew (unknown fence) or not at all. A token surely live all
                    # through the call keeps its fence either way (a re-entry keeps it), and
                    # the store's fence is checked against it after every step.
                    t.fence = None
            return
        result = call.result
        if isinstance(result, Conflict):
            t.removed_sent = max(t.removed_sent, call.sent)  # a live token is let back in
            t.removal_end = max(t.removal_end, call.end)
            if was_certain:
                self.violations.append(
                    f"acquire by {token} on {key} was refused while its own grant was surely "
                    f"live (fence {t.fence}): a holder must be let back in"
                )
            return
        assert isinstance(result, Grant), result
        fence = result.fence
        earlier = [f for end, f, _ in self.grants[key] if end < call.sent]
        reentry = call.possible_before and fence == call.fence_before  # type: ignore[attr-defined]
        overlapped = call.overlapped or t.acquires != call.acquires  # type: ignore[attr-defined]
        if overlapped and not reentry:
            # A re-entry into the grant a concurrent acquire of this token got: its fence
            # was handed to no other token.
            reentry = all(tok == token for _, f, tok in self.grants[key] if f == fence)
        fence_before = call.fence_before  # type: ignore[attr-defined]
        if was_certain:
            # A re-entry: it must keep its fence (unknown after a store error: learnt here).
            if fence_before is not None and fence != fence_before:
                self.violations.append(
                    f"re-acquire by {token} on {key} while surely live changed its fence "
                    f"{fence_before} -> {fence}"
                )
        elif not reentry and earlier and fence <= max(earlier):
            self.violations.append(
                f"fence did not rise on {key}: {token} got {fence} after {max(earlier)} "
                f"had been handed out"
            )
        self.grants[key].append((call.end, fence, token))
        t.fence = fence
        t.confirmed_sent = max(t.confirmed_sent, call.sent)
        t.extend_end = max(t.extend_end, call.end)

    def _renewed(self, call: Call) -> None:
        assert call.end is not None
        for i, (key, token) in enumerate(zip(call.keys, call.tokens, strict=True)):
            t = self.track(key, token)
            t.extending -= 1
            if call.error is not None:
                t.extend_end = max(t.extend_end, call.end)
            elif call.result[i]:
                t.confirmed_sent = max(t.confirmed_sent, call.sent)
                t.extend_end = max(t.extend_end, call.end)
            else:
                t.removed_sent = max(t.removed_sent, call.sent)
                t.removal_end = max(t.removal_end, call.end)


# -- the machine ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Owned:
    """One Lease object of the machine and what its owner did with it."""

    lease: Lease
    owner: int
    key: str
    state: str = "idle"  # "granted" (by an acquire of ours) or "released" (release/detach)
    generation: int = -1  # the lease's generation at our last grant
    granted_sent: float = 0.0  # when that acquire was called
    granted_end: float = 0.0  # ... and when it returned
    busy: bool = False  # a waiter thread is using it
    lost: list[tuple[int, float, str]] = field(default_factory=list)  # (generation, when, why)
    unheld_since: float | None = None


@dataclass(eq=False)
class Waiter:
    owned: Owned
    timeout: float
    started: float
    thread: threading.Thread | None = None
    ended: float | None = None
    result: bool | None = None
    error: BaseException | None = None
    checked: bool = False


class LeaseModel(RuleBasedStateMachine):
    env: ModelStore  # set by the test, per store

    def __init__(self) -> None:
        super().__init__()
        run = uuid.uuid4().hex[:8]
        self.keys = {name: f"m{run}-{name}" for name in KEYS}
        self.limits = {self.keys[name]: limit for name, limit in KEYS.items()}
        self.model = Model(self.limits)
        self.backend = FaultyBackend(self.env.store.backend, self.model)
        self.store = Store(self.backend)
        self.tokens = [f"m{run}-o{i}" for i in range(len(OWNER_TTLS))]
        self.owned: dict[tuple[int, str], Owned] = {}
        for owner, ttl in enumerate(OWNER_TTLS):
            for name, key in self.keys.items():
                rec = Owned(lease=None, owner=owner, key=key)  # type: ignore[arg-type]

                # (a def, not a lambda: mypy cannot type a lambda's default argument)
                def on_lost(lease: Lease, reason: str, rec: Owned = rec) -> None:
                    self._lost(rec, reason)

                rec.lease = self.store.lease(
                    key,
                    ttl=ttl,
                    limit=KEYS[name],
                    token=self.tokens[owner],
                    on_lost=on_lost,
                )
                self.owned[owner, name] = rec
        self.waiters: list[Waiter] = []
        self.stalled = False
        self.restarts: list[tuple[float, float]] = []
        # A lease on another, healthy store: its renewals must not wait for this store's.
        self.bystander = connect("memory://").lease(f"m{run}-bystander", ttl=2.0)
        self.spurious: list[str] = []

    # -- helpers ---------------------------------------------------------------------------

    def _lost(self, rec: Owned, reason: str) -> None:
        now = time.monotonic()
        lease = rec.lease
        rec.lost.append((lease._generation, now, reason))
        key, token = lease.key, lease.token
        with self.model.lock:
            t = self.model.tracks[key].get(token)
            if t is None or self.model.key_removing[key] or t.removing:
                return
            # The library's own last confirmed grant/renewal (an answer it received) says the
            # grant lasts until ``delivered_sent + ttl``: a watchdog may report a little early
            # (min(ttl / 10, 0.5) s), nothing else may, unless the store dropped the token.
            early = min(lease.ttl / 10, 0.5) + 2 * MARGIN
            if (
                t.removal_end <= t.delivered_sent
                and now < t.delivered_sent + lease.ttl - early
                and rec.state == "granted"
            ):
                self.spurious.append(
                    f"{key} of owner {rec.owner} reported lost ({reason!r}) at "
                    f"{now - t.delivered_sent:.3f} s after its last confirmed renewal was "
                    f"sent, with ttl {lease.ttl} and the store still holding it"
                )

    def _granted(self, rec: Owned, sent: float) -> None:
        rec.state = "granted"
        rec.generation = rec.lease._generation
        rec.granted_sent = sent
        rec.granted_end = time.monotonic()
        rec.unheld_since = None

    def _active_waiters(self, key: str | None = None) -> list[Waiter]:
        return [w for w in self.waiters if w.ended is None and (key is None or w.owned.key == key)]

    def _restarting_recently(self, since: float) -> bool:
        return any(end > since - 2.0 for _sent, end in self.restarts)

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the library; a store error right after a restart is allowed (redis-py
        finds its connections dead one call later)."""
        try:
            return fn(*args, **kwargs)
        except BackendError:
            if self._restarting_recently(time.monotonic()):
                return BackendError
            raise

    # -- rules: acquire --------------------------------------------------------------------

    @initialize()
    def start_bystander(self) -> None:
        assert self.bystander.acquire()

    @rule(
        owner=st.integers(0, len(OWNER_TTLS) - 1),
        name=st.sampled_from(sorted(KEYS)),
        fault=st.sampled_from([None, None, None, FAIL_BEFORE, LOSE_REPLY]),
    )
    def acquire(self, owner: int, name: str, fault: str | None) -> None:
        rec = self.owned[owner, name]
        if rec.busy:
            return
        lease, key, token = rec.lease, rec.key, rec.lease.token
        limit = self.limits[key]
        alone = not self._active_waiters(key)  # nobody else may take a slot meanwhile
        sent = time.monotonic()
        possible_others = self.model.possible_tokens(key, sent) - {token}
        fence_before = self.model.track(key, token).fence
        surely_until = self.model.track(key, token).certain_until()
        if fault:
            self.backend.arm("acquire", fault, token)
        try:
            got = self._call(lease.acquire)
        except BackendError:
            assert fault, "acquire failed with no fault injected and no restart"
            return
        finally:
            self.backend.disarm("acquire", token)
        if got is BackendError:  # the store's own error, just after a restart
            return
        assert not fault, f"an injected {fault} did not reach the caller"
        end = time.monotonic()
        certain_self = surely_until > end
        if got:
            self._granted(rec, sent)
            if certain_self and fence_before is not None:
                assert lease.fence == fence_before, "a holder's re-acquire changed its fence"
        elif alone and len(possible_others) < limit:
            raise AssertionError(
                f"acquire on {name} (limit {limit}) refused with at most "
                f"{len(possible_others)} other holder(s) possibly live"
            )

    @rule(
        owner=st.integers(0, len(OWNER_TTLS) - 1),
        name=st.sampled_from(sorted(KEYS)),
        timeout=st.sampled_from([0.3, 2.5]),
    )
    def start_waiter(self, owner: int, name: str, timeout: float) -> None:
        rec = self.owned[owner, name]
        if rec.busy or rec.lease.held or len(self._active_waiters()) >= 3:
            return
        rec.busy = True
        waiter = Waiter(rec, timeout, time.monotonic())

        def run() -> None:
            try:
                waiter.result = rec.lease.acquire(timeout=timeout)
                if waiter.result:
                    self._granted(rec, waiter.started)
            except BaseException as exc:  # checked by the machine
                waiter.error = exc
            finally:
                waiter.ended = time.monotonic()
                rec.busy = False

        waiter.thread = threading.Thread(target=run, name=f"model-waiter-{owner}-{name}")
        self.waiters.append(waiter)
        waiter.thread.start()

    @rule(owner=st.integers(0, len(OWNER_TTLS) - 1), name=st.sampled_from(sorted(KEYS)))
    def acquire_again_with_same_token(self, owner: int, name: str) -> None:
        """Another Lease object with a live holder's token is the same owner: same fence."""
        rec = self.owned[owner, name]
        key, token = rec.key, rec.lease.token
        other = self.store.lease(
            key, ttl=rec.lease.ttl, limit=self.limits[key], token=token, auto_renew=False
        )
        fence = self.model.track(key, token).fence
        surely_until = self.model.track(key, token).certain_until()
        with self.model.foreign():
            got = self._call(other.acquire)
        end = time.monotonic()
        if got is BackendError:
            return
        if surely_until > end:
            assert got, f"{token} holds {key} yet another Lease with its token was refused"
            assert fence is None or other.fence == fence, (
                f"same token, new fence {fence} -> {other.fence}"
            )
        other.detach()  # it is the same grant: leave it to its owner

    @rule(name=st.sampled_from(sorted(KEYS)), timeout=st.sampled_from([0.25, 0.4]))
    def with_a_timeout_waits(self, name: str, timeout: float) -> None:
        """``with store.lease(key, timeout=T)`` on a key that stays full waits T, then raises."""
        # (Conditions that depend on threads' timing are checked here, not in preconditions:
        # Hypothesis needs the same rules enabled when it replays an example.)
        if self._active_waiters():
            return
        key = self.keys[name]
        started = time.monotonic()
        full = [tok for tok in self.model.certain_tokens(key, started + timeout + 0.1)]
        try:
            with self.store.lease(key, ttl=0.5, limit=self.limits[key], timeout=timeout):
                pass
        except (AlreadyHeld, Timeout) as exc:
            waited = time.monotonic() - started
            if waited < timeout - 0.02:
                symptom(
                    Bug4TimeoutIgnored,
                    f"'with store.lease({name!r}, timeout={timeout})' raised "
                    f"{type(exc).__name__} after {waited:.3f} s",
                )
        except BackendError:
            if not self._restarting_recently(started):
                raise
        else:
            assert len(full) < self.limits[key], (
                f"'with' was granted {name} while {len(full)} holders surely held it"
            )

    @precondition(lambda self: MISMATCH)
    @rule(name=st.sampled_from(sorted(KEYS)))
    def acquire_with_another_limit(self, name: str) -> None:
        if self._active_waiters():
            return
        key = self.keys[name]
        limit = self.limits[key]
        other_limit = 2 if limit == 1 else 1
        started = time.monotonic()
        certain = self.model.certain_tokens(key, started + 0.2)
        if not certain:
            return
        lease = self.store.lease(key, ttl=0.5, limit=other_limit, auto_renew=False)
        try:
            got = self._call(lease.acquire)
        except ConfigurationError as exc:
            assert type(exc).__name__ == "LimitMismatch", exc
            return
        if got is True:
            lease.release()
            symptom(
                Bug5LimitMismatch,
                f"a caller with limit {other_limit} was granted {name} (limit {limit}) while "
                f"{len(certain)} holder(s) held it",
            )

    # -- rules: release, renew, force ------------------------------------------------------

    @rule(
        owner=st.integers(0, len(OWNER_TTLS) - 1),
        name=st.sampled_from(sorted(KEYS)),
        fault=st.sampled_from([None, None, FAIL_BEFORE, LOSE_REPLY]),
    )
    def release(self, owner: int, name: str, fault: str | None) -> None:
        rec = self.owned[owner, name]
        if rec.busy:
            return
        lease, key, token = rec.lease, rec.key, rec.lease.token
        sent = time.monotonic()
        possible = self.model.possible(key, token, sent)
        surely_until = self.model.track(key, token).certain_until()
        was_granted = rec.state == "granted"
        if fault:
            self.backend.arm("release", fault, token)
        try:
            released = self._call(lease.release)
        except BackendError:
            assert fault, "release failed with no fault injected and no restart"
            released = None
        finally:
            self.backend.disarm("release", token)
        end = time.monotonic()
        if was_granted:
            rec.state = "released"
        assert not lease.held, "held after its own release"
        if released is True:
            assert possible, f"release of {name} returned True for a token surely not live"
        elif released is False and was_granted and surely_until > end:
            raise AssertionError(f"release of {name} returned False while surely held")
        self._check_wakeup(key, end)

    @rule(owner=st.integers(0, len(OWNER_TTLS) - 1), name=st.sampled_from(sorted(KEYS)))
    def renew(self, owner: int, name: str) -> None:
        rec = self.owned[owner, name]
        if rec.busy or rec.state != "granted":
            return
        if self.backend.armed("renew", DELAY):
            return  # the stall is meant for the renewal thread, not for the machine itself
        key, token = rec.key, rec.lease.token
        sent = time.monotonic()
        possible = self.model.possible(key, token, sent)
        try:
            ok = self._call(rec.lease.renew)
        except InjectedError:
            return  # fail_next_renewal arms the next renewal, whoever sends it: maybe us
        if ok is BackendError:
            return
        if ok:
            assert possible, f"renewal of {name} succeeded for a token surely not live"

    @rule(
        name=st.sampled_from(sorted(KEYS)),
        which=st.sampled_from(["all", "all", 0, 1, 2, 3, "#f", "stranger"]),
    )
    def force_release(self, name: str, which: str | int) -> None:
        key = self.keys[name]
        sent = time.monotonic()
        token = (
            None
            if which == "all"
            else self.tokens[which]
            if isinstance(which, int)
            else which
            if which == "#f"
            else "never-a-holder"
        )
        possible = self.model.possible_tokens(key, sent)
        surely = {tok: self.model.track(key, tok).certain_until() for tok in possible}
        try:
            n = self._call(self.store.force_release, key, token)
        except ConfigurationError:
            assert which == "#f", f"force_release({name!r}, {token!r}) refused"
            return
        end = time.monotonic()
        if n is BackendError:
            return
        certain = {tok for tok, until in surely.items() if until > end}
        if token is None:
            low, high = len(certain), len(possible)
        elif which in ("#f", "stranger"):
            low = high = 0
        else:
            low, high = int(token in certain), int(token in possible)
        if not low <= n <= high:
            symptom(
                Bug6ForceRelease,
                f"force_release({name!r}, {token!r}) returned {n}; the store held between "
                f"{low} and {high} live matching holder(s)",
            )
        self._check_wakeup(key, end)

    # -- rules: time and faults -------------------------------------------------------------

    @rule(seconds=st.sampled_from([0.05, 0.15, 0.4]))
    def let_time_pass(self, seconds: float) -> None:
        time.sleep(seconds)

    @rule(fault=st.sampled_from([FAIL_BEFORE, LOSE_REPLY]))
    def fail_next_renewal(self, fault: str) -> None:
        self.backend.arm("renew", fault)

    @precondition(lambda self: not self.stalled)
    @rule()
    def stall_renewals(self) -> None:
        """Hold the next renewal's reply back (the store applied it) until ``deliver``."""
        self.backend.arm("renew", DELAY)
        self.stalled = True
        if any(r.state == "granted" and r.lease.held for r in self.owned.values()):
            with contextlib.suppress(TimeoutError):
                wait_until(self.backend.delayed_waiting.is_set, 1.0, "a renewal to stall")

    @precondition(lambda self: self.stalled)
    @rule()
    def deliver(self) -> None:
        self.backend.deliver()
        self.stalled = False
        for rec in self.owned.values():
            rec.unheld_since = None  # the renewal thread was held up until now
        wait_until(lambda: not self.backend.delayed_waiting.is_set(), 2.0, "the reply to go")

    @precondition(lambda self: self.env.redis_server is not None and not self.restarts)
    @rule()
    def restart_redis(self) -> None:
        server = self.env.redis_server
        assert server is not None
        sent = time.monotonic()
        server.restart()
        end = time.monotonic()
        self.model.restarted(sent, end)
        self.restarts.append((sent, end))

    @precondition(lambda self: self.env.can_fork and not self.stalled)
    @rule()
    def fork(self) -> None:
        """A child forked while leases are held must leave them alone and work by itself."""
        if self._active_waiters():
            return
        parents = [r.lease for r in self.owned.values() if r.lease.held]
        child_key = f"{next(iter(self.keys.values()))}-child"
        status, message = run_forked(
            lambda: _in_child(self.store, self.backend, parents, child_key), CHILD_DEADLINE
        )
        if status is None:
            symptom(Bug2Fork, f"a child forked holding {len(parents)} lease(s) hung: {message}")
        elif status != 0:
            symptom(
                Bug2Fork,
                f"a child forked holding {len(parents)} lease(s) exited {status}: {message}",
            )

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def the_store_keeps_the_rules(self) -> None:
        assert not self.model.violations, self.model.violations
        assert not self.spurious, self.spurious
        for key, limit in self.limits.items():
            recs = [r for r in self.owned.values() if r.key == key]
            before = [(r.lease.held, r.lease._generation) for r in recs]
            # What the model knew before the read and what it knows after: other threads
            # (waiters, the renewal thread) may finish calls while the read is in flight, and
            # the read may have seen the store before or after such a call.
            start = time.monotonic()
            possible_before = self.model.possible_tokens(key, start)
            certain_before = self.model.certain_tokens(key, start)
            fences_before = self.model.fences(key)
            try:
                holders = self.backend.inner.holders(key)
            except BackendError:
                if self._restarting_recently(start):
                    continue
                raise
            end = time.monotonic()
            possible_after = self.model.possible_tokens(key, start)
            fences_after = self.model.fences(key)
            after = [(r.lease.held, r.lease._generation) for r in recs]
            tokens = {h.token: h for h in holders}
            assert len(holders) <= limit, (
                f"{len(holders)} holders of {key} (limit {limit}): {sorted(tokens)}"
            )
            for tok, holder in tokens.items():
                assert tok in possible_before | possible_after, (
                    f"{tok} holds {key} in the store but cannot be live: it was released, "
                    f"refused or expired (a release or renewal extended or revived it?)"
                )
                assert holder.expires_in <= self.model.track(key, tok).ttl + MARGIN
                fence = fences_before.get(tok)
                if fence is not None and fences_after.get(tok) == fence:
                    assert holder.fence == fence, (
                        f"{tok} holds {key} with fence {holder.fence}, granted {fence}"
                    )
            # Surely live before the read began and still, as far as the model knows now,
            # after it ended: a grant the model learnt of during the read may postdate it.
            for tok in certain_before & self.model.certain_tokens(key, end):
                assert tok in tokens, f"{tok} surely holds {key} but the store lost it"
            for rec, (held1, gen1), (held3, gen3) in zip(recs, before, after, strict=True):
                self._check_held(rec, held1 and held3 and gen1 == gen3, rec.lease.token in tokens)

    def _check_held(self, rec: Owned, held: bool, in_store: bool) -> None:
        lease = rec.lease
        track = self.model.track(rec.key, lease.token)
        now = time.monotonic()
        if (
            lease.held
            and track.forced_sent > rec.granted_end
            and track.confirmed_sent < track.forced_sent  # not put back (same-token acquire)
            and rec.state == "granted"
        ):
            assert now < track.forced_end + lease.ttl + 0.1, (
                f"{rec.key} of owner {rec.owner} still held {now - track.forced_end:.3f} s "
                f"after the store dropped it (ttl {lease.ttl})"
            )
        if held and not in_store and track.forced_end <= rec.granted_sent:
            # Allow for a lease just at its local deadline: held a moment later means the
            # deadline was not reached, so the store must have had it.
            generation = lease._generation
            time.sleep(MARGIN)
            assert not (lease.held and lease._generation == generation), (
                f"{rec.key} of owner {rec.owner} is held (fence {lease.fence}) but its token "
                "is not in the store"
            )

    @invariant()
    def every_loss_is_reported(self) -> None:
        now = time.monotonic()
        for rec in self.owned.values():
            if rec.state != "granted" or rec.busy:
                continue
            if rec.lease.held:
                rec.unheld_since = None
                continue
            if rec.unheld_since is None:
                rec.unheld_since = now
            reported = any(gen == rec.lease._generation for gen, _, _ in rec.lost)
            bound = rec.lease.ttl + 1.0
            if not reported and not self.stalled and now - rec.unheld_since > bound:
                raise AssertionError(
                    f"{rec.key} of owner {rec.owner} stopped being held {bound} s ago and its "
                    "loss was never reported"
                )

    @invariant()
    def waiters_keep_their_timeouts(self) -> None:
        for w in self.waiters:
            if w.ended is None or w.checked:
                continue
            w.checked = True
            waited = w.ended - w.started
            if w.error is not None:
                if isinstance(w.error, BackendError) and self._restarting_recently(w.ended):
                    continue
                raise AssertionError(f"a blocking acquire raised {w.error!r}")
            if not w.result:
                assert waited >= w.timeout - 0.02, (
                    f"a blocking acquire with timeout {w.timeout} gave up after {waited:.3f} s"
                )
            assert waited <= w.timeout + 1.0, (
                f"a blocking acquire with timeout {w.timeout} returned after {waited:.3f} s"
            )

    @invariant()
    def other_stores_keep_renewing(self) -> None:
        if not self.bystander.held:
            symptom(
                Bug1OtherStoreStalled,
                "a lease on a healthy memory store was lost while this store's renewals "
                f"{'hang' if self.stalled else 'were slow or failing'}",
            )
            self.bystander.release()
            self.bystander.acquire()

    def _check_wakeup(self, key: str, released_at: float) -> None:
        """A release that freed a slot wakes a waiter that still has time, within WAKE_BOUND."""
        waiting = [w for w in self._active_waiters(key) if w.started < released_at]
        if not waiting:
            return
        waiter_tokens = {w.owned.lease.token for w in waiting}
        others = self.model.possible_tokens(key, released_at) - waiter_tokens
        patient = [w for w in waiting if w.started + w.timeout > released_at + WAKE_BOUND + 0.2]
        if len(others) >= self.limits[key] or not patient:
            return
        deadline = released_at + WAKE_BOUND
        while time.monotonic() < deadline:
            if any(w.ended is not None for w in waiting):
                return
            time.sleep(0.01)
        symptom(
            Bug3WaiterNotWoken,
            f"{len(waiting)} waiter(s) on {key} (timeouts "
            f"{sorted(w.timeout for w in waiting)}) not woken within {WAKE_BOUND} s of the "
            f"release that left {len(others)} of {self.limits[key]} slot(s) possibly taken",
        )

    # -- the end of an example -------------------------------------------------------------

    def teardown(self) -> None:
        try:
            self._finish()
        finally:
            self.backend.disarm()
            self.backend.deliver()
            for rec in self.owned.values():
                with contextlib.suppress(Exception):
                    rec.lease.release()
            with contextlib.suppress(Exception):
                self.bystander.release()
            if isinstance(self.backend.inner, DjangoCacheBackend):
                # It keeps a connection per thread that ever used it, until closed, even once
                # the thread has ended (test_found_by_model.py): close this example's waiters'
                # connections, or a long run exhausts the database's. Reopened on demand.
                self.backend.inner.close()

    def _finish(self) -> None:
        self.backend.disarm()
        self.backend.deliver()
        self.stalled = False
        for w in self.waiters:
            assert w.thread is not None
            w.thread.join(w.timeout + 5.0)
            assert not w.thread.is_alive(), f"a waiter with timeout {w.timeout} never returned"
        self.waiters_keep_their_timeouts()
        for rec in self.owned.values():
            if rec.state != "granted" or rec.lease.held:
                continue

            def reported(rec: Owned = rec) -> bool:
                return rec.lease.held or any(g == rec.lease._generation for g, _, _ in rec.lost)

            try:
                wait_until(reported, rec.lease.ttl + 1.5, "the loss to be reported")
            except TimeoutError:
                raise AssertionError(
                    f"{rec.key} of owner {rec.owner} stopped being held and its loss was never "
                    "reported"
                ) from None
        assert not self.spurious, self.spurious
        assert not self.model.violations, self.model.violations


def _in_child(
    store: Store, backend: FaultyBackend, parents: list[Lease], child_key: str
) -> tuple[int, str]:
    """Runs in the forked child: exit code 0 and "ok", or a code and what went wrong."""
    signal.alarm(int(CHILD_DEADLINE))  # the parent kills us too; this is a second net
    held = [lease.key for lease in parents if lease.held]
    if held:
        return 10, f"the child sees the parent's leases as held: {held}"
    time.sleep(0.3)  # the parent's shortest lease wants renewing every 0.13 s
    mine = {lease.token for lease in parents}
    renewed = [c for c in backend.calls_in_this_process if c.op == "renew"]
    if any(set(c.tokens) & mine for c in renewed):
        return 11, "the child renewed the parent's leases"
    for lease in parents:
        if lease.release():
            return 12, f"release() of the parent's lease on {lease.key} returned True"
    touched = [c for c in backend.calls_in_this_process if set(c.tokens) & mine]
    if touched:
        return 13, f"the child sent the parent's tokens to the store: {[c.op for c in touched]}"
    own = store.lease(child_key, ttl=0.3)
    if not own.acquire():
        return 14, f"the child could not take a free key: {own.holders}"
    time.sleep(0.45)
    if not own.held:
        return 15, "the child's own lease was not renewed"
    if not own.release():
        return 16, "the child's own release returned False"
    return 0, "ok"


# -- the tests -------------------------------------------------------------------------------------


def _settings(kind: str) -> settings:
    database = DirectoryBasedExampleDatabase(EXAMPLES / kind.replace(":", "-"))
    return settings(
        max_examples=25 if SLOW else 4,
        stateful_step_count=40 if SLOW else 14,
        deadline=None,
        # Read-only unless asked: hypothesis prunes stored examples that pass on replay, and
        # the stored ones are kept in git as regression cases.
        database=database if SAVE_EXAMPLES and not IN_CI else ReadOnlyDatabase(database),
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
    )


@pytest.mark.timeout(900 if SLOW else 300)
@pytest.mark.parametrize("model_store", KINDS, indirect=True)
def test_lease_model(model_store: ModelStore) -> None:
    machine = type(
        f"LeaseModel_{model_store.kind.replace(':', '_').replace('-', '_')}",
        (LeaseModel,),
        {"env": model_store},
    )
    run_state_machine_as_test(machine, settings=_settings(model_store.kind))
