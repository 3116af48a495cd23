"""Run the cases of one worker configuration (a *group*) on a real worker and judge them.

Servers: one private Redis for broker, results (db 1) and the history the bodies record
(db 3), never faulted; one private Redis for the lease store (AOF on, so a restart keeps its
data), stopped, started and killed by the store faults. A group starts its worker once; its
cases run in *phases*: the no-fault cases concurrently (each on its own key), then one phase
per fault kind in which the cases meet at named points (``Rendezvous``) where the fault is
applied once for all of them (the store stopped, the worker killed...). Every wait is a
condition with a deadline.

Judged per case, from the recorded history, the worker logs and the store:

* I1 no two bodies of the key overlap (holds with a run lease); for ``period``, no two task
  ids accepted within one ttl;
* I2 every call the policy says to run reaches its end (``EXPECTED`` in cases.py says which);
* I3 once settled, the key and its enqueue keys have no holder within ttl (+ margin), and a
  fresh call with the same options is accepted and runs;
* I4 a task id whose body returned never starts its body again;
* I5 a lease lost to a store outage is signalled (``exclusive_lost``) and logged, and
  ``on_lock_lost="abort"`` interrupts the body.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import psutil

from celery_exclusive.celery.config import store_for
from celery_exclusive.exceptions import AlreadyQueued, ExclusiveError

from ..history import check_history
from ..servers import GaveUp, RedisServer, wait_until
from ..workers import Worker
from . import app as mapp
from .cases import RUN_LEASE_HOLDS

#: Slack on top of a ttl for a loaded 2-core box.
MARGIN = 3.0
COUNTDOWN = 2.0
REVOKE_COUNTDOWN = 3.5  # below VISIBILITY: no redelivery meets the revoke first
VISIBILITY = 4.0
CONCURRENCY = {"prefork": 6, "threads": 8, "gevent": 16, "solo": 1}
#: Cases run at once in a phase (each may take two pool slots: its call and the duplicate).
PARALLEL = {"prefork": 4, "threads": 4, "gevent": 4, "solo": 1}
#: How each mode's body must end to count as done (I2).
FINAL = {"ok": "ok", "exception": "exception", "retry": "ok", "autoretry": "ok",
         "ignore": "ignore", "reject": "reject", "soft": "soft"}  # fmt: skip
ENDED = (" succeeded in ", " raised ", " retry: ", " ignored", " rejected")


class MatrixWorker(Worker):
    """``tests.workers.Worker`` on the matrix app (tests/matrix/app.py) and its queue."""

    def __init__(self, env: dict[str, str], **kwargs: Any) -> None:
        super().__init__({**env, "CEX_QUEUE": env["CEXM_QUEUE"]}, app="tests.matrix.app", **kwargs)


class Rendezvous:
    """Named meeting points for the cases of a phase; the last to arrive runs the action.

    A case that stops early calls ``leave()`` so the others never wait for it.
    """

    def __init__(self, parties: int, actions: dict[str, Callable[[], None]]) -> None:
        self.parties = parties
        self.actions = actions
        self.cond = threading.Condition()
        self.arrived: dict[str, int] = {}
        self.done: set[str] = set()
        self.errors: list[str] = []

    def _maybe_fire(self, name: str) -> None:
        if name not in self.done and self.arrived.get(name, 0) >= self.parties:
            self.done.add(name)
            try:
                self.actions[name]()
            except Exception as exc:  # reported by every case of the phase
                self.errors.append(f"fault action {name!r} failed: {exc!r}")
            self.cond.notify_all()

    def point(self, name: str, timeout: float = 90) -> None:
        with self.cond:
            self.arrived[name] = self.arrived.get(name, 0) + 1
            self._maybe_fire(name)
            if not self.cond.wait_for(lambda: name in self.done, timeout):
                raise TimeoutError(f"the cases of the phase never all reached {name!r}")
            if self.errors:
                raise AssertionError("; ".join(self.errors))

    def leave(self) -> None:
        with self.cond:
            self.parties -= 1
            for name in list(self.arrived):
                self._maybe_fire(name)


@dataclass
class Call:
    label: str
    task_id: str
    mode: str
    returned: str | None = None  # the id apply_async returned (None: it returned None)
    refused: str = ""  # the exception apply_async raised
    at: float = 0.0  # monotonic time apply_async returned

    @property
    def published(self) -> bool:
        return not self.refused and self.returned == self.task_id


@dataclass
class Outcome:
    case: dict[str, Any]
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log_excerpt: str = ""

    def fail(self, invariant: str, text: str) -> None:
        self.violations.append(f"{invariant}: {text}")


class Group:
    """One worker configuration with its cases."""

    def __init__(self, key: tuple[Any, ...], cases: list[dict[str, Any]], broker: RedisServer):
        self.pool, self.acks_late, self.backend = key
        self.cases = cases
        self.broker = broker
        # the lease store of this group alone (AOF: a restart keeps its data)
        self.store = RedisServer("--appendonly", "yes", "--appendfsync", "always")
        self.tag = uuid.uuid4().hex[:6]
        base = f"redis://127.0.0.1:{broker.port}"
        self.env = {
            "CEXM_BROKER": f"{base}/0",
            "CEXM_RESULT": f"{base}/1" if self.backend == "redis" else "",
            "CEXM_HISTORY": f"{base}/3",
            "CEXM_STORE": f"redis://127.0.0.1:{self.store.port}/0?socket_timeout=1",
            "CEXM_PREFIX": f"m{self.tag}",
            "CEXM_QUEUE": f"q{self.tag}",
            "CEXM_ACKS_LATE": "1" if self.acks_late else "0",
            "CEXM_VISIBILITY": str(VISIBILITY),
        }
        self.app = mapp.make_app(self.env)
        self.workers: list[MatrixWorker] = []
        self.kill_times: list[int] = []  # monotonic_ns of every worker kill

    # -- servers and worker ---------------------------------------------------------------

    def start_worker(self) -> None:
        worker = MatrixWorker(self.env, pool=self.pool, concurrency=CONCURRENCY[self.pool])
        self.workers.append(worker)
        worker.start()

    @property
    def worker(self) -> MatrixWorker:
        return self.workers[-1]

    def logs(self) -> str:
        return "\n".join(w.output() for w in self.workers)

    def kill_worker(self) -> None:
        self.kill_times.append(time.monotonic_ns())
        self.worker.kill()

    def term_worker(self) -> None:
        worker = self.worker
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: "Warm shutdown" in worker.output(), 10, "warm shutdown")
        self.kill_times.append(time.monotonic_ns())
        worker.kill()

    def store_down(self) -> None:
        self.store.kill()

    def store_up(self) -> None:
        self.store.start()

    def blip(self) -> None:
        self.store.kill()
        self.store.start()

    # -- running --------------------------------------------------------------------------

    def run(self) -> list[Outcome]:
        self.store.start()
        try:
            self.start_worker()
            return self._run_phases()
        finally:
            if self.workers:
                with contextlib.suppress(Exception):
                    self.worker.stop(timeout=10)
            for worker in self.workers:
                worker.kill()
            self.store.cleanup()
            self.app.close()

    def _run_phases(self) -> list[Outcome]:
        outcomes: list[Outcome] = []
        by_phase: dict[str, list[dict[str, Any]]] = {}
        for case in self.cases:
            phase = case["fault"]
            if phase in ("enqueue", "start", "renewal", "release"):
                phase = "store"  # one outage serves them all (see the case scripts)
            if case["outcome"] in ("kill_worker", "term_worker"):
                phase = case["outcome"]
            by_phase.setdefault(phase, []).append(case)
        par = PARALLEL[self.pool]
        for phase in ("none", "store", "blip", "kill_worker", "term_worker"):
            cases = by_phase.get(phase, [])
            for i in range(0, len(cases), par if phase != "none" else len(cases) or 1):
                batch = cases[i : i + (par if phase != "none" else len(cases))]
                rv = Rendezvous(len(batch), self._actions(phase)) if phase != "none" else None
                with ThreadPoolExecutor(max_workers=par) as ex:
                    runs = [CaseRun(case, self, rv) for case in batch]
                    outcomes += list(ex.map(CaseRun.run, runs))
                if phase in ("kill_worker", "term_worker") and (
                    self.worker.proc is None or self.worker.proc.poll() is not None
                ):
                    self.start_worker()
                if self.store.proc is None or self.store.proc.poll() is not None:
                    self.store.start()  # a phase that failed half-way: leave the store up
        return outcomes

    def _actions(self, phase: str) -> dict[str, Callable[[], None]]:
        return {
            "down": self.store_down,
            "up": self.store_up,
            "blip": self.blip,
            "kill": self.kill_worker if phase == "kill_worker" else self.term_worker,
            "restart": self.start_worker,
        }


class CaseRun:
    """One case: its calls, the fault at its points, and the judgement."""

    def __init__(self, case: dict[str, Any], group: Group, rv: Rendezvous | None) -> None:
        self.case = case
        self.g = group
        self.rv = rv
        self.cid = f"{group.tag}-{case['id']}"
        self.task = group.app.tasks[mapp.JOB_AUTO if case["outcome"] == "autoretry" else mapp.JOB]
        self.key = self.task.exclusive_key((self.cid,), {})
        self.opts = {
            "hold": case["hold"],
            "on_conflict": case["on_conflict"],
            "on_duplicate": case["on_duplicate"],
            "on_lock_lost": case["on_lock_lost"],
            "wait_timeout": 25.0,
            "retry_countdown": 0.3,
            "retry_backoff": 1.0,
            "max_retries": 100,
        }
        if case["on_duplicate"] == "keep_last":
            # the pending copy waits in short turns, each ended by a retry of its own: the
            # case holds A until B has retried more than 3 times (cases.EXPECTED)
            self.opts["wait_timeout"] = 0.5
        if case["hold"] == "queued_and_running" and case["on_conflict"] == "skip":
            del self.opts["on_conflict"]  # the default, judged as such (cases.EXPECTED)
        self.calls: dict[str, Call] = {}
        self.out = Outcome(case)
        self.hist = mapp.history(group.env["CEXM_HISTORY"])
        self.started_at = time.monotonic()

    # -- helpers ----------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.hist.lrange(f"h:{self.cid}", 0, -1)]

    def starts(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["ev"] == "start" and e["id"] == task_id]

    def ends(self, task_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["ev"] == "end" and e["id"] == task_id]

    def log_lines(self, task_id: str) -> list[str]:
        """Worker log lines about ``task_id`` itself (not those naming it as a holder)."""
        return [line for line in self.g.logs().splitlines() if f"[{task_id}]" in line]

    def mentioned(self, task_id: str, *texts: str) -> bool:
        """Whether a log line names ``task_id`` anywhere with one of ``texts``."""
        lines = self.g.logs().splitlines()
        return any(task_id in ln and any(t in ln for t in texts) for ln in lines)

    def count(self, task_id: str, text: str) -> int:
        return sum(text in line for line in self.log_lines(task_id))

    def logged(self, task_id: str, *texts: str) -> bool:
        return any(t in line for line in self.log_lines(task_id) for t in texts)

    def publish(self, label: str, mode: str, *, gate: bool, timing: str = "now") -> Call:
        call = Call(label, uuid.uuid4().hex, mode)
        self.calls[label] = call
        kw: dict[str, Any] = {"queue": self.g.env["CEXM_QUEUE"], "exclusive": self.opts,
                              "task_id": call.task_id}  # fmt: skip
        if self.g.backend == "none":
            kw["ignore_result"] = True
        delay = REVOKE_COUNTDOWN if self.case["outcome"] == "revoke_queued" else COUNTDOWN
        if timing == "countdown":
            kw["countdown"] = delay
        elif timing == "eta":
            kw["eta"] = datetime.now(timezone.utc) + timedelta(seconds=delay)
        elif timing == "expires":
            kw["countdown"] = COUNTDOWN
            kw["expires"] = 1.0
        if label == "a" and self.case["outcome"] == "soft_limit":
            kw["soft_time_limit"] = 1.0
        if label == "a" and self.case["outcome"] == "hard_limit":
            kw["time_limit"] = 1.5
        try:
            result = self.task.apply_async(
                (self.cid,), {"mode": mode, "call": label, "gate": gate}, **kw
            )
        except AlreadyQueued as exc:
            call.refused = f"AlreadyQueued({exc})"
        except ExclusiveError as exc:
            call.refused = f"{type(exc).__name__}({exc})"
        else:
            call.returned = None if result is None else str(result.id)
        call.at = time.monotonic()
        return call

    def wait_started(self, call: Call, timeout: float) -> dict[str, Any]:
        wait_until(lambda: self.starts(call.task_id), timeout, f"{call.label} to start", 0.05)
        return self.starts(call.task_id)[0]

    def open_gate(self) -> None:
        self.hist.set(f"gate:{self.cid}", 1, ex=600)

    def point(self, name: str) -> None:
        if self.rv is not None:
            self.rv.point(name)

    # -- the scenario -----------------------------------------------------------------------

    def run(self) -> Outcome:
        self.started_at = time.monotonic()
        try:
            self.scenario()
        except Exception as exc:
            self.out.fail("run", f"{type(exc).__name__}: {exc}")
        finally:
            if self.rv is not None:
                self.rv.leave()
            self.open_gate()
        try:
            self.judge()
        except Exception as exc:
            self.out.fail("judge", f"{type(exc).__name__}: {exc}")
        self.out.seconds = time.monotonic() - self.started_at
        if self.out.violations:
            ids = [c.task_id for c in self.calls.values()] + [self.cid]
            lines = [ln for ln in self.g.logs().splitlines() if any(i in ln for i in ids)]
            self.out.log_excerpt = "\n".join(lines[-40:])
        return self.out

    def scenario(self) -> None:
        c = self.case
        outcome, fault, timing = c["outcome"], c["fault"], c["timing"]
        own = ("exception", "retry", "autoretry", "ignore", "reject")
        mode = outcome if outcome in own else "ok"
        # B retries too: a keep_last hand-over must survive the retry of the copy it reached
        b_mode = mode if mode in ("retry", "autoretry") else "ok"
        solo = 3 if self.g.pool == "solo" else 1
        if fault in ("enqueue", "start"):
            if fault == "enqueue":
                self.point("down")
            a = self.publish("a", mode, gate=False, timing=timing)
            if fault == "enqueue":
                self.point("up")
                what = "published" if a.published else a.refused or a.returned
                self.out.notes.append(f"A {what}")
            else:
                self.point("down")
                # the message comes due and the worker deals with it while the store is down
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: self.starts(a.task_id) or self.logged(a.task_id, *ENDED),
                               COUNTDOWN + 15, "A to come due", 0.1)  # fmt: skip
                self.out.notes.append("A handled while down: " + self._state(a))
                self.point("up")
            self.settle()
            return
        published = time.monotonic()
        a = self.publish("a", mode, gate=True, timing=timing)
        if not a.published:
            self.out.fail("setup", f"A was not published: {a.refused or a.returned}")
            return
        if outcome == "revoke_queued":
            wait_until(lambda: self.logged(a.task_id, "received"), 15, "A to reach the worker")
            self.g.app.control.revoke(a.task_id)
            revoked = time.monotonic()
            due = published + REVOKE_COUNTDOWN
            try:
                self.wait_free(max(due - time.monotonic() - 0.3, 0.5))
                self.out.notes.append(f"free {time.monotonic() - revoked:.1f}s after revoke")
            except TimeoutError:
                self.out.fail("I3", f"revoked queued A still holds {self.held()} "
                              f"{time.monotonic() - revoked:.1f} s after the revoke, until "
                              "its countdown ends")  # fmt: skip
            wait_until(lambda: self.logged(a.task_id, "Discarding revoked"), 30,
                       "the worker to discard revoked A")  # fmt: skip
            self.settle()
            return
        if timing == "expires":
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: self.logged(a.task_id, "Discarding revoked"), 15,
                           "the worker to discard expired A")  # fmt: skip
            self.settle()
            return
        if fault == "none" and timing != "now" and outcome not in ("kill_worker", "term_worker"):
            self.publish("b", b_mode, gate=False)  # meets A while A is queued
        # A may never start: replaced, handed over or skipped because of B
        wait_until(lambda: self.starts(a.task_id) or self.policy_excuse(a), 30 * solo,
                   "A to start (or be excused by the policy)", 0.05)  # fmt: skip
        if not self.starts(a.task_id):
            self.open_gate()
            self.settle()
            return
        start = self.starts(a.task_id)[0]
        if fault == "none" and timing == "now" and outcome not in ("kill_worker", "term_worker"):
            b = self.publish("b", b_mode, gate=False)  # meets A while A runs
            if b.published and self.g.pool != "solo":
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: self.logged(b.task_id, "received"), 10, "B received")
                if c["on_duplicate"] == "keep_last":
                    with contextlib.suppress(TimeoutError):
                        wait_until(lambda: self.count(b.task_id, " retry: ") > 3
                                   or self.logged(b.task_id, " raised "), 20,
                                   "the pending copy to retry 4 times")  # fmt: skip
        if outcome == "revoke_terminate":
            if self.g.acks_late:  # a redelivered copy waiting beside the running body
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: self.mentioned(a.task_id, "was delivered again"),
                               VISIBILITY + 8, "a redelivered copy of A")  # fmt: skip
            self.g.app.control.revoke(a.task_id, terminate=True)
            wait_until(lambda: self.mentioned(a.task_id, "Terminating", "revoked"), 15,
                       "the worker to terminate A")  # fmt: skip
            if c["hold"] in RUN_LEASE_HOLDS:
                self.check_held_while_running(a)
        elif outcome == "kill_child":
            os.kill(int(start["pid"]), signal.SIGKILL)
        elif outcome == "soft_limit":
            wait_until(lambda: self.ends(a.task_id), 15, "the soft time limit to end A")
        elif outcome == "hard_limit":
            wait_until(lambda: self.logged(a.task_id, "Hard time limit"), 15, "the hard limit")
        elif outcome in ("kill_worker", "term_worker"):
            self.point("kill")
            self.point("restart")
        elif fault == "renewal" and c["hold"] not in RUN_LEASE_HOLDS:
            self.point("down")  # no lease while it runs (queued, period): nothing to lose
            self.point("up")
        elif fault == "renewal":
            self.point("down")
            try:
                wait_until(lambda: self.lost_for(a.task_id), mapp.TTL + 8, "the loss report")
            except TimeoutError:
                self.out.fail("I5", "the store was down past ttl while A ran, but no "
                              "exclusive_lost was sent")  # fmt: skip
            if c["on_lock_lost"] == "abort":
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: self.ends(a.task_id), 5, "the abort")
            self.point("up")
        elif fault == "release":
            self.point("down")
            self.open_gate()
            with contextlib.suppress(TimeoutError):
                wait_until(lambda: self.logged(a.task_id, *ENDED), 15, "A to end")
            self.point("up")
        elif fault == "blip":
            self.point("blip")
        self.open_gate()
        self.settle()

    def check_held_while_running(self, call: Call) -> None:
        """I1: for 2 s, the key is never free while a body of ``call`` still runs."""

        def freed_while_running() -> bool:
            running = [s for s in self.open_bodies() if s["id"] == call.task_id]
            return bool(running) and not self.held().get(self.key.rsplit(":", 1)[-1])

        with contextlib.suppress(TimeoutError):
            wait_until(freed_while_running, 2, "the key to be freed under a running body")
            self.out.fail("I1", "the key was freed while a body of A still ran (after "
                          "revoke(terminate=True) reached another delivery of A)")  # fmt: skip

    def lost_for(self, task_id: str) -> bool:
        return any(json.loads(x)["task_id"] == task_id for x in self.hist.lrange("lost", 0, -1))

    def _state(self, call: Call) -> str:
        if self.starts(call.task_id):
            return "started"
        lines = [ln for ln in self.log_lines(call.task_id) if any(t in ln for t in ENDED)]
        return lines[-1].split("]: ", 1)[-1][-160:] if lines else "not handled"

    # -- judging ------------------------------------------------------------------------------

    def excused(self, call: Call) -> str:
        """Why the policy (or the case's outcome) says this call need not run; '' if owed."""
        return self.policy_excuse(call) or self.outcome_excuse(call)

    def policy_excuse(self, call: Call) -> str:
        """Why the exclusive policy says this call need not run; '' if owed."""
        c = self.case
        tid = call.task_id
        if call.refused:
            return "refused at enqueue"
        if not call.published:
            keep_last = c["on_duplicate"] == "keep_last"
            if keep_last and call.returned:
                return ""  # its arguments were handed to the pending copy: they are owed
            return f"not published ({c['on_duplicate']})"
        for line in self.log_lines(tid):
            conflict = self.opts.get("on_conflict")
            if "'exclusive': 'skipped'" in line and conflict == "skip":
                return "skipped (on_conflict=skip)"
            if "AlreadyRunning" in line and " raised " in line and conflict in ("raise", "wait"):
                return f"AlreadyRunning (on_conflict={conflict})"
            if "Discarding revoked task" in line:
                return "revoked/replaced/expired"
        # keep_last: the pending copy ran newer arguments instead of these
        if c["on_duplicate"] == "keep_last" and any(
            x.returned == tid and x.label != call.label for x in self.calls.values()
        ):
            return "arguments replaced by a newer call (keep_last)"
        return ""

    def outcome_excuse(self, call: Call) -> str:
        """Why the case's outcome (a kill, a revoke...) says this call need not run."""
        c = self.case
        outcome = c["outcome"]
        killed = ("revoke_terminate", "hard_limit", "kill_child")
        a = self.calls.get("a")
        if call.label == "b" and outcome in killed and a and call.returned == a.task_id:
            return f"handed to A, {outcome}: killed by design"
        if call.label != "a":
            return ""
        if outcome in killed:
            return f"{outcome}: killed by design"
        if outcome in ("kill_worker", "term_worker") and not self.g.acks_late:
            return "worker killed, acks_late off: Celery acked it at start"
        if outcome in ("revoke_queued",) or c["timing"] == "expires":
            return "revoked before it started"
        if c["fault"] == "renewal" and c["on_lock_lost"] == "abort":
            return "aborted on lease loss"
        return ""

    def completed(self, call: Call) -> bool:
        final = FINAL["soft" if self.case["outcome"] == "soft_limit" and call.label == "a"
                      else call.mode]  # fmt: skip
        return any(e["ev"] == "end" and e["call"] == call.label and e["status"] == final
                   for e in self.events())  # fmt: skip

    def settle(self, timeout: float = 25) -> None:
        """Wait until every call is done or excused, and no body is still running."""

        def settled() -> bool:
            for call in self.calls.values():
                if not self.excused(call) and not self.completed(call):
                    return False
            return not self.open_bodies()

        with contextlib.suppress(TimeoutError):
            wait_until(settled, timeout, "the case to settle", 0.2)

    def open_bodies(self) -> list[dict[str, Any]]:
        """Starts with no end whose process still lives."""
        events = self.events()
        open_ = []
        for s in (e for e in events if e["ev"] == "start"):
            if _end_of(s, events) is None and psutil.pid_exists(s["pid"]) and _not_zombie(s["pid"]):
                open_.append(s)
        return open_

    def keys(self) -> list[str]:
        return [self.key, self.key + "@queued", self.key + "@period"]

    def held(self) -> dict[str, Any]:
        """Held keys of the case, each with its holders named by call label (or task id)."""
        store = store_for(self.g.app)
        names = {c.task_id: c.label.upper() for c in self.calls.values()}
        out = {}
        for k in self.keys():
            holders = store.holders(k)
            if holders:
                ids = [str(h.meta.get("task_id")) for h in holders]
                out[k.rsplit(":", 1)[-1]] = [names.get(i, i) for i in ids]
        return out

    def wait_free(self, timeout: float) -> None:
        wait_until(lambda: not self.held(), timeout, f"{self.key} to be free", 0.1)

    def judge(self) -> None:
        c = self.case
        # I2: every owed call reached its end
        for call in self.calls.values():
            why = self.excused(call)
            if not why and not self.completed(call):
                self.out.fail("I2", f"call {call.label} ({call.mode}, task {call.task_id}) "
                              f"never completed: {self._state(call)}")  # fmt: skip
            self.out.notes.append(f"{call.label}:{'done' if self.completed(call) else why}")
        never = c["outcome"] == "revoke_queued" or c["timing"] == "expires"
        if never and self.starts(self.calls["a"].task_id):
            self.out.fail("I2", "A ran although it was revoked/expired before its start")
        bodies = self.open_bodies()
        if bodies:
            self.out.fail("I2", f"bodies never ended: {[b['call'] for b in bodies]}")
        # I1 / period
        intervals = self.intervals()
        if c["hold"] in RUN_LEASE_HOLDS:
            self.check_exclusive(intervals)
        if c["hold"] == "period":  # one accepted call per ttl (C comes after the key is free)
            accepted = sorted(x.at for x in self.calls.values() if x.published and x.label != "c")
            for first, second in itertools.pairwise(accepted):
                if second - first < mapp.TTL - 0.2:
                    self.out.fail("I1", f"two calls accepted {second - first:.1f} s apart "
                                  f"within one period ({mapp.TTL:g} s)")  # fmt: skip
        # I4
        events = self.events()
        for e in events:
            if e["ev"] == "end" and e["status"] == "ok":
                again = [s for s in events if s["ev"] == "start" and s["id"] == e["id"]
                         and s["t"] > e["t"]]  # fmt: skip
                if again:
                    self.out.fail("I4", f"task {e['id']} ran its body again after it returned")
        # I5 (the renewal fault): logged too
        if c["fault"] == "renewal" and c["hold"] in RUN_LEASE_HOLDS:
            a = self.calls.get("a")
            if a and c["on_lock_lost"] == "abort":
                statuses = [e["status"] for e in self.ends(a.task_id)]
                if "aborted" not in statuses[:1]:
                    self.out.fail("I5", f"on_lock_lost=abort did not interrupt A on "
                                  f"{self.g.pool} (its first end: {statuses[:1]})")  # fmt: skip
            if f"lease on {self.key!r} lost" not in self.g.logs():
                self.out.fail("I5", "the lease loss is not in the worker log")
        # I3: the key is freed, then a fresh call runs
        try:
            self.wait_free(mapp.TTL + MARGIN)
        except TimeoutError:
            self.out.fail("I3", f"still held {mapp.TTL + MARGIN:g} s after the case settled: "
                          f"{self.held()}")  # fmt: skip
            return
        labels = {c.label.upper() for c in self.calls.values()}
        for attempt in range(3):  # a redelivered copy of the case's own may take the key
            fresh = self.publish("c", "ok", gate=False)
            if fresh.published:
                break
            held = self.held()
            holders = {h for names in held.values() for h in names}
            if attempt == 2 or not holders & labels:
                refusal = fresh.refused or fresh.returned
                self.out.fail("I3", f"a fresh call was not accepted: {refusal}; held: {held}")
                return
            self.out.notes.append(f"fresh call waited for a redelivered copy ({holders})")
            del self.calls["c"]
            self.wait_free(mapp.TTL + MARGIN + 20)
        try:
            wait_until(lambda: self.completed(fresh), 30, "the fresh call to run", 0.1)
        except TimeoutError:
            self.out.fail("I3", f"a fresh call did not run within 30 s: {self._state(fresh)}")

    def check_exclusive(self, intervals: list[dict[str, Any]]) -> None:
        """I1: no overlap (tests/history.py), fences rising in start order.

        The attempts of one task id may share a fence: until_done keeps one grant across
        retries (handed back to the retry message and over to its run).
        """
        ordered = sorted(intervals, key=lambda r: (r["start"], r["end"]))
        for prev, cur in itertools.pairwise(ordered):
            same_task = prev["id"].split(":")[1] == cur["id"].split(":")[1]
            if cur["fence"] < prev["fence"] or (cur["fence"] == prev["fence"] and not same_task):
                self.out.fail("I1", f"fence did not rise: {cur['id']} (fence {cur['fence']}) "
                              f"started after {prev['id']} (fence {prev['fence']})")  # fmt: skip
        try:  # the overlap check alone: fences replaced by the start order
            check_history([{**r, "fence": i} for i, r in enumerate(ordered)])
        except AssertionError as exc:
            self.out.fail("I1", str(exc)[:300])

    def intervals(self) -> list[dict[str, Any]]:
        """Each body as a hold [start, end]; a killed body ends when its process was seen gone."""
        events = self.events()
        out = []
        for s in (e for e in events if e["ev"] == "start"):
            if s.get("fence") is None:
                continue
            end = _end_of(s, events)
            if end is None:
                kills = [k for k in self.g.kill_times if k >= s["t"]]
                later = [e["t"] for e in events if e["ev"] == "start" and e["t"] > s["t"]]
                # a killed body: it ended at the kill, else (unknown) at the next start
                end = min(kills) if kills else (min(later) if later else s["t"])
            out.append({"key": self.key, "start": s["t"], "end": end, "fence": s["fence"],
                        "id": f"{s['call']}:{s['id']}"})  # fmt: skip
        return out


def _end_of(start: dict[str, Any], events: list[dict[str, Any]]) -> int | None:
    """The time the body begun by ``start`` recorded its end, or None (killed, or running).

    Paired by the execution's own ``run`` id: threads, gevent and solo run every body in the
    worker's pid, two deliveries of one task id among them, so task id and pid cannot tell
    which start an end closes.
    """
    ends = [e["t"] for e in events if e["ev"] == "end" and e.get("run") == start.get("run")]
    return min(ends) if ends else None


def _not_zombie(pid: int) -> bool:
    try:
        running: bool = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        return running
    except psutil.NoSuchProcess:
        return False


__all__ = ["GaveUp", "Group", "Outcome"]
