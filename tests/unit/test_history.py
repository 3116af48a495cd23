"""Tests for tests/history.py: the checker must catch what it claims to catch."""

from __future__ import annotations

from typing import Any

import pytest

from ..history import check_history


def hold(key: str, start: int, end: int, fence: int, **extra: Any) -> dict[str, Any]:
    return {"key": key, "start": start, "end": end, "fence": fence, **extra}


def test_a_valid_history_passes() -> None:
    check_history(
        [
            hold("a", 0, 10, 1, id="w1:0"),
            hold("b", 5, 15, 7),  # other keys are independent
            hold("a", 10, 20, 2),  # touching is not overlapping
            hold("a", 25, 30, 5),
            hold("b", 16, 18, 8),
        ]
    )
    check_history([])


def test_an_overlap_is_caught_and_named() -> None:
    with pytest.raises(AssertionError, match=r"overlap on key 'a'.*id='w2:3'"):
        check_history([hold("a", 0, 10, 1), hold("a", 9, 20, 2, id="w2:3")])


def test_an_overlap_with_a_long_earlier_hold_is_caught() -> None:
    # the third hold starts after the second ended, but inside the first
    with pytest.raises(AssertionError, match="overlap"):
        check_history([hold("a", 0, 100, 1), hold("a", 0, 5, 2), hold("a", 50, 60, 3)])


def test_a_fence_going_backwards_is_caught() -> None:
    with pytest.raises(AssertionError, match=r"fence did not increase on key 'a'"):
        check_history([hold("a", 0, 10, 5), hold("a", 20, 30, 4)])


def test_a_repeated_fence_is_caught() -> None:
    with pytest.raises(AssertionError, match="fence did not increase"):
        check_history([hold("a", 0, 10, 5), hold("a", 20, 30, 5)])


def test_a_semaphore_allows_limit_overlaps_but_not_more() -> None:
    two = [hold("a", 0, 10, 1), hold("a", 5, 15, 2), hold("a", 10, 20, 3)]
    check_history(two, limit=2)
    with pytest.raises(AssertionError, match="overlap"):
        check_history(two, limit=1)
    three = [*two, hold("a", 6, 8, 4, id="x")]
    with pytest.raises(AssertionError, match=r"3 holds of key 'a' overlap \(limit 2\).*id='x'"):
        check_history(three, limit=2)


def test_a_semaphore_catches_a_fence_granted_twice() -> None:
    with pytest.raises(AssertionError, match="fence 3 granted twice"):
        check_history([hold("a", 0, 10, 3), hold("a", 20, 30, 3)], limit=2)


def test_a_semaphore_fence_order_is_checked_against_requests() -> None:
    # a later grant may record its start first, which is fine...
    check_history(
        [
            hold("a", 5, 10, 2, requested=0),
            hold("a", 3, 12, 3, requested=1),
        ],
        limit=2,
    )
    # ...but a hold requested after another had ended cannot have the lower fence
    with pytest.raises(AssertionError, match="fence went backwards on key 'a'"):
        check_history(
            [hold("a", 0, 10, 9, requested=0), hold("a", 12, 15, 8, requested=11)], limit=2
        )


def test_malformed_records_are_refused() -> None:
    with pytest.raises(AssertionError, match="lacks fence"):
        check_history([{"key": "a", "start": 0, "end": 1}])
    with pytest.raises(AssertionError, match="ends before it starts"):
        check_history([hold("a", 5, 1, 1)])
    with pytest.raises(ValueError):
        check_history([], limit=0)
