"""The Redis backend packs its script calls itself: byte for byte what redis-py sends."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from celery_exclusive.backends.redis import _pack


def redis_py_packs(commands: list[tuple[Any, ...]]) -> bytes:
    # redis-py leaves Connection() and pack_commands unannotated
    connection = redis.Connection()  # type: ignore[no-untyped-call]
    return b"".join(connection.pack_commands(commands))  # type: ignore[no-untyped-call]


@pytest.mark.parametrize(
    "commands",
    [
        [("EVALSHA", "a" * 40, 1, "exclusive:{job}:lease", "tok", 30000, 1, "{}", 0)],
        [("EVALSHA", "sha", 2, "k\u00e9y \u2603", b"\x00\xffraw", -5, 0, "", "x" * 70_000)],
        [("EVALSHA", "s", 0), ("EVALSHA", "t", 1, "k", 12345678901234567890)],
        [],
    ],
)
def test_packs_as_redis_py_does(commands: list[tuple[Any, ...]]) -> None:
    assert _pack(commands) == redis_py_packs(commands)


@pytest.mark.parametrize("odd", [1.5, True, None, bytearray(b"x"), memoryview(b"x")])
def test_leaves_other_arguments_to_redis_py(odd: Any) -> None:
    assert _pack([("EVALSHA", "s", 0, odd)]) is None
