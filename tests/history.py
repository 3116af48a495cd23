"""Check a recorded history of lease holds for mutual exclusion and fence order.

A *record* is one hold of one key, as the holder saw it::

    {"key": "k1", "start": 1712, "end": 1719, "fence": 42, "id": "pid:7"}

``start`` is read right after ``acquire()`` returned True and ``end`` right before
``release()`` was called, on a clock shared by every holder (``time.monotonic_ns()`` is
system-wide on Linux). The store's own hold of a grant covers at least ``[start, end]``, so
if the store keeps its promise, recorded holds of one key never overlap more than ``limit``
deep. Optional fields: ``id`` (named in failure messages) and ``requested`` (read right before
``acquire()`` was called; enables the fence-order check for semaphores, see below).

Used by the fault tests and the Celery tests::

    check_history(records)            # a lock: holds never overlap, fences rise in time order
    check_history(records, limit=2)   # a semaphore of 2
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_history"]

Record = Mapping[str, Any]


def _name(record: Record) -> str:
    rid = record.get("id")
    where = f"id={rid!r} " if rid is not None else ""
    return (
        f"{where}key={record['key']!r} fence={record['fence']} "
        f"start={record['start']} end={record['end']}"
    )


def _check_fields(record: Record) -> None:
    missing = [f for f in ("key", "start", "end", "fence") if f not in record]
    if missing:
        raise AssertionError(f"history record {dict(record)!r} lacks {', '.join(missing)}")
    if record["start"] > record["end"]:
        raise AssertionError(f"history record ends before it starts: {_name(record)}")


def _check_lock(key: str, holds: list[Record]) -> None:
    """limit 1: holds are disjoint, so start order is grant order and fences must rise."""
    ordered = sorted(holds, key=lambda r: (r["start"], r["end"]))
    latest = ordered[0]  # the hold seen so far that ends last
    previous = ordered[0]
    for record in ordered[1:]:
        if record["start"] < latest["end"]:
            raise AssertionError(
                f"overlap on key {key!r}: {_name(record)} started before {_name(latest)} ended "
                f"(by {latest['end'] - record['start']})"
            )
        if record["fence"] <= previous["fence"]:
            raise AssertionError(
                f"fence did not increase on key {key!r}: {_name(record)} "
                f"came after {_name(previous)}"
            )
        if record["end"] >= latest["end"]:
            latest = record
        previous = record


def _check_semaphore(key: str, holds: list[Record], limit: int) -> None:
    """limit > 1: at most ``limit`` holds at any instant, fences unique."""
    # Sweep: at equal times an end comes before a start (touching holds do not overlap).
    events = sorted(
        [(r["start"], 1, i) for i, r in enumerate(holds)]
        + [(r["end"], 0, i) for i, r in enumerate(holds)]
    )
    active: set[int] = set()
    for _time, is_start, i in events:
        if not is_start:
            active.discard(i)
            continue
        active.add(i)
        if len(active) > limit:
            names = "; ".join(_name(holds[j]) for j in sorted(active))
            raise AssertionError(
                f"{len(active)} holds of key {key!r} overlap (limit {limit}): {names}"
            )
    seen: dict[int, Record] = {}
    for record in holds:
        other = seen.setdefault(record["fence"], record)
        if other is not record:
            raise AssertionError(
                f"fence {record['fence']} granted twice on key {key!r}: "
                f"{_name(other)} and {_name(record)}"
            )


def _check_fence_vs_requests(key: str, holds: list[Record]) -> None:
    """A hold that ended before another was even requested was granted first: lower fence.

    Valid for any limit. Sort by fence, highest first, and keep the earliest end among the
    higher fences: a hold requested after that end has a fence lower than a hold that was
    over before it asked.
    """
    with_request = [r for r in holds if "requested" in r]
    if not with_request:
        return
    by_fence = sorted(with_request, key=lambda r: r["fence"], reverse=True)
    earliest_end: Record | None = None
    for record in by_fence:
        if (
            earliest_end is not None
            and earliest_end["fence"] > record["fence"]
            and earliest_end["end"] < record["requested"]
        ):
            raise AssertionError(
                f"fence went backwards on key {key!r}: {_name(record)} was requested at "
                f"{record['requested']}, after {_name(earliest_end)} had ended, yet got a "
                f"lower fence"
            )
        if earliest_end is None or record["end"] < earliest_end["end"]:
            earliest_end = record


def check_history(records: Iterable[Record], limit: int = 1) -> None:
    """Raise AssertionError, naming the records involved, unless ``records`` is a valid history.

    Per key: at most ``limit`` holds overlap at any instant; with ``limit == 1`` the fences
    also strictly increase in start order; with ``limit > 1`` they are unique. Records that
    carry ``requested`` are also checked for fence order against holds that ended earlier.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, not {limit!r}")
    by_key: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        _check_fields(record)
        by_key[record["key"]].append(record)
    for key, holds in by_key.items():
        if limit == 1:
            _check_lock(key, holds)
        else:
            _check_semaphore(key, holds, limit)
        _check_fence_vs_requests(key, holds)
