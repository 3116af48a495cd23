"""A private memcached for the Django cache tests: a free loopback port, no UDP.

The binary comes from ``CELERY_EXCLUSIVE_TEST_MEMCACHED``, else ``memcached`` on PATH (Debian:
``apt-get install memcached``; CI installs it). As root it runs as ``nobody`` (memcached
refuses to run as root).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

from celery_exclusive.embedded import stop_process

from ..servers import GaveUp, free_port, wait_until


def memcached_binary() -> str | None:
    return os.environ.get("CELERY_EXCLUSIVE_TEST_MEMCACHED") or shutil.which("memcached")


class MemcachedServer:
    """One private memcached process."""

    def __init__(self) -> None:
        binary = memcached_binary()
        if binary is None:
            raise RuntimeError("no memcached binary")
        self.binary = binary
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> MemcachedServer:
        args = [self.binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "nobody"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(self._ready, 15, f"memcached on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise GaveUp(f"memcached exited: {err}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"version\r\n")
            return sock.recv(100).startswith(b"VERSION")

    def cleanup(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
