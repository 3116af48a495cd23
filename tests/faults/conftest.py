"""What the fault tests share: holder subprocesses, a store with a renewer of its own, and
the checks made after a fault (what was lost when, what escaped a thread, what was logged).

Servers come from tests/conftest.py (``private_redis`` for one the test may kill). Every holder
child is killed when its test ends (pass or fail), and its stdout is read by a thread into a
queue, so the test waits for a line with a deadline and never blocks on a pipe.
"""

from __future__ import annotations

import contextlib
import logging
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

from celery_exclusive import Lease, LeaseLost, Store, connect
from celery_exclusive.renewal import Renewer

from ..conftest import url_for_kind

HOLDER = str(Path(__file__).with_name("holder.py"))

#: How long a fresh Python may take to start, import redis and answer (a loaded CI box).
START_TIMEOUT = 20.0

#: At most this many stdout lines are looked at while waiting for one.
MAX_LINES = 10_000


class HolderProcess:
    """One ``holder.py`` child: send it commands, wait for its lines with a deadline.

    ``argv``: another command to run instead (another script speaking in lines the same way).
    """

    def __init__(self, args: list[str], stderr_path: Path, argv: list[str] | None = None) -> None:
        self.args = args
        self.stderr_path = stderr_path
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        with open(stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                argv or [sys.executable, HOLDER, *args],
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


@pytest.fixture(params=["redis", "postgres", "sqlite", "etcd"])
def store_url(request: pytest.FixtureRequest) -> str:
    """The same fault test on every server-backed store (SQLite: a file of the test's own)."""
    return url_for_kind(request, request.param, sqlite="sqlite_file_url")


@pytest.fixture
def store(store_url: str, prefix: str) -> Iterator[Store]:
    """A store on ``store_url`` (with this test's prefix), closed at the end."""
    store = connect(store_url, prefix=prefix)
    try:
        yield store
    finally:
        store.close()


# -- a store of the test's own, and what a fault leaves behind --------------------------------

PrivateStore = Callable[[str], tuple[Store, Renewer]]


@pytest.fixture
def private_store(prefix: str) -> Iterator[PrivateStore]:
    """``private_store(url)``: a store on ``url`` with a renewer of its own, closed at the end.

    Its own renewer, so that what the renewal thread does and logs is this test's alone.
    """
    stores: list[Store] = []

    def make(url: str) -> tuple[Store, Renewer]:
        renewer = Renewer()
        store = Store(connect(url, prefix=prefix).backend, renewer=renewer)
        stores.append(store)
        return store, renewer

    try:
        yield make
    finally:
        for store in stores:
            store.close()


class LostLog:
    """An on_lost callback that remembers each (reason, time) and can be waited on."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.at: list[float] = []
        self.event = threading.Event()

    def __call__(self, _lease: Lease, reason: str) -> None:
        self.reasons.append(reason)
        self.at.append(time.monotonic())
        self.event.set()


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """Exceptions that escaped any thread during the test."""
    seen: list[threading.ExceptHookArgs] = []
    original = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        seen.append(args)
        original(args)

    monkeypatch.setattr(threading, "excepthook", hook)
    return seen


def renewal_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Errors the library logged (the renewal thread logs ERROR only for a crash)."""
    return [
        r.getMessage() + (f" {r.exc_info[1]!r}" if r.exc_info else "")
        for r in caplog.records
        if r.name.startswith("celery_exclusive") and r.levelno >= logging.ERROR
    ]


def assert_lost(lease: Lease) -> None:
    """``lease`` is reported lost: not held, and ``ensure_held()`` raises LeaseLost."""
    assert not lease.held
    with pytest.raises(LeaseLost) as info:
        lease.ensure_held()
    assert info.value.key == lease.key


def stays_held(lease: Lease, rival: Lease, seconds: float) -> None:
    """Check for ``seconds`` that ``lease`` stays held and ``rival`` cannot take its key."""
    until = time.monotonic() + seconds
    for _ in range(10_000):
        if time.monotonic() >= until:
            return
        assert lease.held, f"{lease!r} was lost: {lease.lost_reason}"
        assert not rival.acquire(), f"a second owner got {lease.key!r}"
        time.sleep(0.05)
