"""Run test code in a forked child with a deadline: a child that hangs is killed, not waited for.

The child never returns into pytest: it runs the body, writes a report to a pipe and leaves
with ``os._exit()``. A child that misses its deadline (a deadlock on a lock inherited from the
fork is what these tests look for) is SIGKILLed and reported as ``None``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable

__all__ = ["read_all", "reap", "run_forked"]


def reap(pid: int, timeout: float) -> int | None:
    """Wait for child ``pid`` to exit and return its exit code; None if it missed
    ``timeout`` (it is then SIGKILLed and reaped)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def read_all(fd: int) -> str:
    """Everything left in a pipe whose writers have all exited."""
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def run_forked(
    body: Callable[[], tuple[int, str] | None], timeout: float
) -> tuple[int | None, str]:
    """Run ``body`` in a forked child; return its exit code (None: it hung) and its report.

    ``body`` returns ``(exit code, report)``, or None for ``(0, "")``; if it raises, the child
    exits 1 with the traceback as its report.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code, report = 1, ""
        try:
            os.close(read_fd)
            code, report = body() or (0, "")
        except BaseException:
            report = traceback.format_exc()
        finally:
            with contextlib.suppress(BaseException):
                os.write(write_fd, report[-8000:].encode())
            os._exit(code)
    os.close(write_fd)
    try:
        return reap(pid, timeout), read_all(read_fd)
    finally:
        os.close(read_fd)
