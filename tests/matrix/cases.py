"""The dimensions of the lifecycle matrix, which combinations are valid, and what to expect.

A *case* is one dict of dimension values. Cases that need the same worker configuration
(``pool``, ``acks_late``, ``backend``) form a *group*, run on one worker. Expectations that
the docs leave open are decided here, in ``EXPECTED`` (printed in docs/celery-matrix.md).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from .pairwise import all_pairs, full_product

HOLDS = ("running", "queued", "queued_and_running", "until_done", "period")
RUN_LEASE_HOLDS = ("running", "queued_and_running", "until_done")

DIMS: dict[str, tuple[Any, ...]] = {
    "hold": HOLDS,
    "on_conflict": ("skip", "raise", "retry", "wait"),
    "on_duplicate": ("return_existing", "skip", "raise", "replace", "keep_last"),
    "outcome": (
        "ok", "exception", "retry", "autoretry", "ignore", "reject", "revoke_queued",
        "revoke_terminate", "soft_limit", "hard_limit", "kill_child", "kill_worker",
        "term_worker",
    ),
    "fault": ("none", "enqueue", "start", "renewal", "release", "blip"),
    "backend": ("redis", "none"),
    "pool": ("prefork", "threads", "solo", "gevent"),
    "acks_late": (False, True),
    "timing": ("now", "countdown", "eta", "expires"),
    "on_lock_lost": ("warn", "abort"),
}  # fmt: skip

GROUP_DIMS = ("pool", "acks_late", "backend")

#: Outcomes only some pools can produce (Celery: time limits and SIGKILL of a pool child need
#: prefork; revoke(terminate=True) needs prefork or gevent, the others raise NotImplementedError).
POOLS_FOR = {
    "soft_limit": ("prefork",),
    "hard_limit": ("prefork",),
    "kill_child": ("prefork",),
    "revoke_terminate": ("prefork", "gevent"),
}

#: What is expected where the docs leave room (decided from docs/celery.md and options.py).
EXPECTED = {
    "duplicate": (
        "Each no-fault case publishes a duplicate call B of the same key: right after A when A "
        "waits on a countdown/ETA (so on_duplicate meets a queued copy), else once A's body "
        "has started (so on_conflict meets a running copy). B is owed a run unless "
        "apply_async did not publish it (return_existing/skip/raise/keep_last hand-over) or the "
        "worker skipped it or failed it with AlreadyRunning (on_conflict skip/raise): those are "
        "the policy saying 'do not run'. keep_last: B's arguments are owed a run (in whichever "
        "task id took them)."
    ),
    "keep_last pending copy": (
        "With keep_last the pending copy waits for the running one in turns of wait_timeout "
        "(0.5 s here), each ended by an internal retry; the case keeps A running until B has "
        "retried 4 times. The pending copy (and the newest arguments) is owed its run: an "
        "internal retry loop must not give up on its own (Celery reads max_retries=None as "
        "the task's max_retries, 3)."
    ),
    "queued_and_running default": (
        "queued_and_running with the default on_conflict (the matrix's 'skip' value is sent "
        "as no on_conflict at all): a copy queued while one runs is owed its run once the "
        "running one ends (docs: 'a second lease at start'; one may be queued while one "
        "runs). Skipping it at start drops accepted work."
    ),
    "queued": "hold=queued promises no exclusion of runs (I1 not checked), only of queued copies.",
    "period": (
        "hold=period promises at most one accepted call per ttl per key (not exclusion of "
        "runs): I1 is replaced by 'no two task ids published within one period'."
    ),
    "revoke_queued": (
        "A revoked copy waiting on its countdown/ETA never runs; its enqueue lease is freed "
        "when the revoke reaches the worker holding the message (docs: 'the worker that meets "
        "the revoked message releases its enqueue lease'), so the key is free within "
        "a moment, before its 3.5 s countdown ends (shorter than the 4 s visibility timeout, "
        "so no redelivery meets the revoke first)."
    ),
    "revoke_terminate": "prefork and gevent only; the body is owed nothing; the key is freed.",
    "soft_limit": "The body ends with SoftTimeLimitExceeded (FAILURE); its run counts as ended.",
    "hard_limit / kill_child": (
        "prefork only. No Python runs in the child: the body is owed nothing (Celery stores "
        "WorkerLostError / TimeLimitExceeded). With acks_late the message was seen delivered "
        "again after visibility_timeout and run again: allowed (not owed), and it must wait "
        "for the dead copy's lease, not overlap. The key is free within ttl of the death."
    ),
    "kill_worker / term_worker": (
        "With acks_late the message is redelivered to the restarted worker and the body is "
        "owed a run (docs: 'no work is lost and nothing deadlocks'); without acks_late Celery "
        "acked the message at start, so the run is lost by Celery's own design and not owed. "
        "term_worker = SIGTERM (warm shutdown waits for the gated body), then SIGKILL."
    ),
    "expires": (
        "The message expires (1 s) before its countdown (2 s) ends: Celery discards it as "
        "revoked; the body never runs and its enqueue lease is freed at once (task_revoked)."
    ),
    "store down at enqueue": (
        "apply_async of an enqueue hold needs the store: it must raise (BackendError), and "
        "then nothing is owed; if it returns a result, that call is owed a run. A 'running' "
        "hold publishes without the store and is owed a run (it starts after the store is back)."
    ),
    "store down at start": (
        "The message comes due while the store is down: the run is owed (docs: no work lost); "
        "it may be retried, but it must run once the store is back."
    ),
    "store down during renewal": (
        "The body runs while the store is down for longer than ttl: the loss is logged and "
        "sent as exclusive_lost; with on_lock_lost=abort the body is interrupted (LeaseLost) on "
        "every pool (the docs name prefork, threads, solo and gevent); with warn it runs on "
        "and is owed its end."
    ),
    "store down at release": (
        "The body ends while the store is down: owed nothing more; once the store is back the "
        "key is free within ttl (run lease) and no enqueue lease is left behind."
    ),
    "blip": "The store is killed and restarted (AOF keeps its data) while the body runs.",
}

ENQUEUE_HOLDS = ("queued", "queued_and_running", "until_done", "period")


def valid(case: dict[str, Any]) -> bool:
    """Whether a combination is meaningful (options.py's rules plus the matrix's own)."""
    hold, dup, outcome = case["hold"], case["on_duplicate"], case["outcome"]
    fault, timing, pool = case["fault"], case["timing"], case["pool"]
    if dup == "replace" and hold not in ("queued", "queued_and_running"):
        return False
    if dup == "keep_last" and hold != "queued_and_running":
        return False
    # on_duplicate means nothing without an enqueue lease, on_conflict nothing without a run
    # lease, on_lock_lost nothing without a run lease: one value each, so pairs are not wasted
    if hold == "running" and dup != "return_existing":
        return False
    no_run_lease = hold in ("queued", "period")
    if no_run_lease and (case["on_conflict"] != "skip" or case["on_lock_lost"] != "warn"):
        return False
    if case["on_lock_lost"] == "abort" and fault != "renewal":
        return False  # abort acts only when a lease is lost
    if pool not in POOLS_FOR.get(outcome, (pool,)):
        return False
    if fault != "none" and outcome not in ("ok", "exception", "retry"):
        return False
    if outcome == "revoke_queued" and timing not in ("countdown", "eta"):
        return False
    if timing == "expires" and (outcome != "ok" or fault != "none"):
        return False
    if fault == "start" and timing not in ("countdown", "eta"):
        return False
    return not (fault in ("renewal", "release", "blip") and timing == "expires")


#: The 8 worker configurations CI uses: every pair of pool x acks_late, pool x backend and
#: acks_late x backend occurs once (a worker start is the most expensive step).
CI_CONFIGS = {
    ("prefork", False, "redis"), ("prefork", True, "none"),
    ("threads", False, "none"), ("threads", True, "redis"),
    ("solo", False, "redis"), ("solo", True, "none"),
    ("gevent", False, "none"), ("gevent", True, "redis"),
}  # fmt: skip


def ci_cases(seed: int = 7) -> list[dict[str, Any]]:
    """The pairwise-covering subset (CI), on the 8 configurations of ``CI_CONFIGS``."""

    def ci_valid(case: dict[str, Any]) -> bool:
        return valid(case) and tuple(case[d] for d in GROUP_DIMS) in CI_CONFIGS

    return _number(all_pairs(DIMS, ci_valid, seed=seed, seeds=SEEDS))


#: Cases CI always runs: interactions of three or more values that pairs may miss.
SEEDS = (
    # a pending keep_last copy that was handed newer arguments, then retries
    {"hold": "queued_and_running", "on_duplicate": "keep_last", "outcome": "retry",
     "fault": "none", "timing": "countdown"},
    # queued_and_running with the default on_conflict: a copy queued while one runs
    {"hold": "queued_and_running", "on_conflict": "skip", "on_duplicate": "return_existing",
     "outcome": "ok", "fault": "none", "timing": "now", "pool": "prefork"},
    # on_lock_lost=abort on every pool
    *({"on_lock_lost": "abort", "fault": "renewal", "pool": p} for p in DIMS["pool"]),
)  # fmt: skip


def slow_cases() -> list[dict[str, Any]]:
    """A much larger set: the full product of hold x policies x outcome x fault, each case on
    one worker configuration, timing and on_lock_lost spread over it by rotation (the full
    10-way product is ~10^5 cases)."""
    core = {k: v for k, v in DIMS.items() if k not in (*GROUP_DIMS, "timing", "on_lock_lost")}
    configs = [(p, a, b) for p in DIMS["pool"] for a in (False, True) for b in ("redis", "none")]
    out = []
    for i, row in enumerate(full_product(core, lambda r: True)):
        for j in range(len(configs)):
            pool, acks, backend = configs[(i + j) % len(configs)]
            case = {**row, "pool": pool, "acks_late": acks, "backend": backend}
            case["timing"] = _rotate(case, i, "timing")
            case["on_lock_lost"] = _rotate(case, i, "on_lock_lost")
            if valid(case):
                out.append(case)
                break
    return _number(out)


def _rotate(case: dict[str, Any], i: int, dim: str) -> Any:
    """The i-th valid value of ``dim`` for ``case`` (the others fixed), cycling."""
    values = [v for v in DIMS[dim] if valid({**case, "timing": "now", "on_lock_lost": "warn",
                                             dim: v})]  # fmt: skip
    return values[i % len(values)] if values else DIMS[dim][0]


def _number(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**row, "id": f"c{i:03d}"} for i, row in enumerate(rows)]


def groups(cases: list[dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Cases by worker configuration, in a stable order."""
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for case in cases:
        out[tuple(case[d] for d in GROUP_DIMS)].append(case)
    return dict(sorted(out.items(), key=lambda kv: repr(kv[0])))
