"""Redis topologies that can fail over, and a network namespace that can be cut off.

- :class:`SentinelGroup`: a master, one replica and three Sentinels (quorum 2, a master is
  judged down after ``down_after_ms``), all on free loopback ports.
- :class:`ReplicatedCluster`: a Redis Cluster of three masters with one replica each
  (``cluster-node-timeout`` short, so a dead master's replica takes over within seconds).
- :class:`Netns`: a network namespace joined to this host by a veth pair, for a process to run
  in and be cut off from the servers (link down, or every packet dropped) and healed.

Each topology kills (SIGKILL) or pauses (SIGSTOP/SIGCONT) its master, waits with a deadline
until a replica is promoted, and restarts the old master as a replica. Servers are
:class:`tests.servers.RedisServer` processes; nothing here sleeps without a condition.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from celery_exclusive import embedded

from .servers import RedisCluster, RedisServer, cluster_node, free_port, wait_until

__all__ = ["Netns", "ReplicatedCluster", "SentinelGroup", "netns_unavailable_reason"]

SERVICE = "mymaster"


def _client(port: int, timeout: float = 1.0) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1", port=port, socket_timeout=timeout, socket_connect_timeout=timeout
    )


def _info(port: int, section: str) -> dict[str, Any]:
    with _client(port) as c:
        info: dict[str, Any] = c.info(section)
        return info


def _alive(server: RedisServer) -> bool:
    return server.proc is not None and server.proc.poll() is None


def _kill(server: RedisServer) -> None:
    """SIGKILL ``server`` (a paused one too) and reap it."""
    if _alive(server):
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)


def _resume_then_cleanup(server: RedisServer) -> None:
    if _alive(server):
        assert server.proc is not None
        server.proc.send_signal(signal.SIGCONT)
    server.cleanup()


class DelayRelay:
    """A TCP relay from a replica to its master that delays what the master sends by ``lag``.

    What the master sends is held here for ``lag_ms`` before the replica gets it, the way a
    busy replica or a slow link leaves a replica behind; what the replica sends (its ACKs) goes
    through at once. When the master dies, what the relay still holds is dropped, as a dead
    master's unsent output is: those writes never reach the replica. Loopback alone leaves a
    window of microseconds between a master's reply and its replica's copy.
    """

    def __init__(self, target_port: int, lag_ms: float) -> None:
        self.target_port = target_port
        self.lag = lag_ms / 1000.0
        self.port = free_port()
        self.dropped = 0  # bytes held when the master went away
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._threads = [threading.Thread(target=self._accept, name="relay", daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            try:
                up = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                down.close()
                continue
            up.settimeout(None)
            self._sockets += [down, up]
            held: deque[tuple[float, bytes]] = deque()
            ready = threading.Condition()
            jobs: list[tuple[Any, tuple[Any, ...]]] = [
                (self._pump, (down, up)),
                (self._hold, (up, held, ready)),
                (self._send_due, (down, held, ready)),
            ]
            for target, args in jobs:
                thread = threading.Thread(target=target, args=args, name="relay", daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def _hold(
        self, up: socket.socket, held: deque[tuple[float, bytes]], ready: threading.Condition
    ) -> None:
        with contextlib.suppress(OSError):
            while data := up.recv(65536):
                with ready:
                    held.append((time.monotonic() + self.lag, data))
                    ready.notify()
        with ready:  # the master is gone: what it sent and the replica did not get is lost
            self.dropped += sum(len(d) for _, d in held)
            held.clear()
            held.append((0.0, b""))  # tells the sender to close the replica's side
            ready.notify()

    def _send_due(
        self, down: socket.socket, held: deque[tuple[float, bytes]], ready: threading.Condition
    ) -> None:
        while not self._closed.is_set():
            with ready:
                if not held:
                    ready.wait(0.2)
                    continue
                due, data = held[0]
                wait = due - time.monotonic()
                if wait > 0:
                    ready.wait(wait)
                    continue
                held.popleft()
            if not data:
                break
            try:
                down.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            down.close()

    def close(self) -> None:
        """Stop relaying and close every socket."""
        self._closed.set()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(2)


class SentinelGroup:
    """A master, one replica and three Sentinels watching them as ``mymaster`` (quorum 2).

    ``bind`` adds addresses (besides 127.0.0.1) the data nodes listen on. A failover takes
    about ``down_after_ms`` plus one Sentinel election (a second or two on loopback).
    ``lag_ms``: the replica follows its master through a :class:`DelayRelay` of that lag.
    """

    def __init__(
        self,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        bind: Sequence[str] = (),
        lag_ms: float = 0.0,
    ) -> None:
        self.down_after_ms = down_after_ms
        # A Sentinel points a replica that follows another address than the master's (our
        # relay) straight at the master once its configuration is failover-timeout old: 10 s
        # leaves a run time to strike first. (Much longer would delay a Sentinel whose vote
        # was split for twice as long before it tries again.)
        self.failover_timeout_ms = (
            max(failover_timeout_ms, 10_000) if lag_ms else failover_timeout_ms
        )
        self.lag_ms = lag_ms
        self.relays: list[DelayRelay] = []
        self.bind = ["127.0.0.1", *bind]
        self.nodes = [RedisServer(*self._bind_args()), RedisServer(*self._bind_args())]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.dir = tempfile.mkdtemp(prefix="cex-sentinels-")
        self.sentinels: list[subprocess.Popen[bytes] | None] = [None, None, None]

    def _bind_args(self) -> list[str]:
        # Protected mode refuses clients from other addresses than loopback: the extra ones
        # are this host's private veth addresses.
        return ["--bind", *self.bind, "--protected-mode", "no" if self.bind[1:] else "yes"]

    @property
    def url(self) -> str:
        """The store URL naming all three Sentinels."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> SentinelGroup:
        """Start the nodes and the Sentinels; return once every Sentinel sees the replica
        and the two other Sentinels, and the replica is in sync."""
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> SentinelGroup:
        master, replica = self.nodes
        master.start()
        replica.extra += ["--replicaof", "127.0.0.1", str(self._upstream(master))]
        replica.start()
        wait_until(lambda: self._in_sync(replica), 20, "the replica to sync")
        for i, port in enumerate(self.sentinel_ports):
            conf = Path(self.dir, f"sentinel-{port}.conf")
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"logfile {self.dir}/sentinel-{port}.log\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.sentinels[i] = subprocess.Popen(
                [master.binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        def ready() -> bool:
            for port in self.sentinel_ports:
                with _client(port) as c:
                    if not c.execute_command("SENTINEL", "REPLICAS", SERVICE):
                        return False
                    if len(c.execute_command("SENTINEL", "SENTINELS", SERVICE)) < 2:
                        return False
            return True

        wait_until(ready, 30, "the Sentinels to see the replica and each other", step=0.1)
        return self

    def _upstream(self, master: RedisServer) -> int:
        """The port a replica of ``master`` follows: the master's, or a new relay's."""
        if not self.lag_ms:
            return master.port
        relay = DelayRelay(master.port, self.lag_ms)
        self.relays.append(relay)
        return relay.port

    def lagging(self, replica: RedisServer) -> bool:
        """Whether ``replica`` follows its master through a relay (not straight)."""
        port = int(_info(replica.port, "replication").get("master_port", 0))
        return any(r.port == port for r in self.relays)

    @staticmethod
    def _in_sync(replica: RedisServer) -> bool:
        info = _info(replica.port, "replication")
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def sentinel_view(self) -> set[int]:
        """The master port each answering Sentinel names now."""
        seen = set()
        for port in self.sentinel_ports:
            with contextlib.suppress(redis.RedisError), _client(port, 0.5) as c:
                _host, master_port = c.execute_command(
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                seen.add(int(master_port))
        return seen

    def master(self) -> RedisServer:
        """The node the Sentinels agree is the master."""
        view = self.sentinel_view()
        assert len(view) == 1, f"the Sentinels disagree on the master: {view}"
        (port,) = view
        return next(n for n in self.nodes if n.port == port)

    def replica(self) -> RedisServer:
        """The node that is not the master."""
        master = self.master()
        return next(n for n in self.nodes if n is not master)

    def kill(self, node: RedisServer) -> None:
        """SIGKILL ``node``."""
        _kill(node)

    def pause(self, node: RedisServer) -> None:
        """SIGSTOP ``node``: its connections stay open, nothing is answered."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)

    def resume(self, node: RedisServer) -> None:
        """SIGCONT ``node``."""
        assert node.proc is not None
        node.proc.send_signal(signal.SIGCONT)

    def wait_promoted(self, old: RedisServer, timeout: float = 60.0) -> RedisServer:
        """Wait until every Sentinel names another node and that node says it is a master."""
        other = next(n for n in self.nodes if n is not old)

        def promoted() -> bool:
            if self.sentinel_view() != {other.port}:
                return False
            return bool(_info(other.port, "replication").get("role") == "master")

        wait_until(promoted, timeout, f"a failover away from port {old.port}", step=0.02)
        return other

    def restart_as_replica(self, old: RedisServer, timeout: float = 60.0) -> None:
        """Start the killed ``old`` master again as a replica of the current master, and wait
        until the group is whole (:meth:`wait_whole`)."""
        master = self.master()
        _kill(old)
        old.extra = [*self._bind_args(), "--replicaof", "127.0.0.1", str(self._upstream(master))]
        old.start()
        self.wait_whole(timeout)

    def wait_demoted(self, old: RedisServer, timeout: float = 60.0) -> None:
        """Wait until a resumed old master was turned into a replica (by the Sentinels) and
        the group is whole."""
        self.wait_whole(timeout)

    def whole(self) -> bool:
        """The Sentinels agree on a master that says it is one, and the other node follows it
        in sync (a loaded machine may see a second failover, back to the old master: whole
        all the same)."""
        view = self.sentinel_view()
        if len(view) != 1:
            return False
        master = next(n for n in self.nodes if n.port in view)
        replica = next(n for n in self.nodes if n is not master)
        if _info(master.port, "replication").get("role") != "master":
            return False
        return self._in_sync(replica)

    def wait_whole(self, timeout: float = 60.0) -> None:
        """Wait until :meth:`whole`; then put the replica behind a relay again (``lag_ms``),
        in case the Sentinels pointed it straight at the master."""
        try:
            wait_until(self.whole, timeout, "one master and its replica in sync", step=0.05)
            self.reroute(self.replica(), timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.explain()}") from None

    def reroute(self, replica: RedisServer, timeout: float = 60.0) -> None:
        """Send ``replica`` through a new relay to the master again (with ``lag_ms``), after
        the Sentinels pointed it straight at the master (as they do to an old master that
        comes back)."""
        if not self.lag_ms or self.lagging(replica):
            return
        with replica.client() as c:
            c.replicaof("127.0.0.1", self._upstream(self.master()))
        wait_until(lambda: self._in_sync(replica), timeout, "the replica to follow its relay")

    def explain(self) -> str:
        """The nodes' replication state and the ends of every log (for a failure message)."""
        lines = []
        for node in self.nodes:
            try:
                state = str(_info(node.port, "replication"))
            except redis.RedisError as exc:
                state = repr(exc)
            lines.append(f"node {node.port}: {state}")
        logs = [Path(n.dir, "redis.log") for n in self.nodes]
        logs += [Path(self.dir, f"sentinel-{p}.log") for p in self.sentinel_ports]
        for log in logs:
            with contextlib.suppress(OSError):
                lines.append(f"--- {log}\n" + log.read_text(errors="replace")[-2500:])
        return "\n".join(lines)

    def cleanup(self) -> None:
        """Stop everything (a paused node too) and remove the files."""
        for proc in self.sentinels:
            if proc is not None:
                embedded.stop_process(proc)
        for node in self.nodes:
            _resume_then_cleanup(node)
        for relay in self.relays:
            relay.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class ReplicatedCluster(RedisCluster):
    """A Redis Cluster of ``masters`` masters with one replica each."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [
            cluster_node(node_timeout_ms, "--cluster-replica-validity-factor", "0")
            for _ in range(2 * masters)
        ]
        self.masters = masters

    def _start(self) -> ReplicatedCluster:
        for node in self.nodes:
            node.start()
        primaries = self.nodes[: self.masters]
        per = 16384 // self.masters
        for i, node in enumerate(primaries):
            end = 16384 if i == self.masters - 1 else (i + 1) * per
            with node.client() as c:
                c.execute_command("CLUSTER ADDSLOTS", *range(i * per, end))
        with self.nodes[0].client() as c:
            for other in self.nodes[1:]:
                c.execute_command("CLUSTER MEET", "127.0.0.1", other.port)
        wait_until(
            lambda: all(self._knows_all(n) for n in self.nodes), 30, "the nodes to meet", 0.05
        )
        for primary, replica in zip(primaries, self.nodes[self.masters :], strict=True):
            primary_id = self.node_id(primary)
            with replica.client() as c:
                c.execute_command("CLUSTER REPLICATE", primary_id)
        wait_until(self.healthy, 30, "the cluster to be ok with every replica in sync", 0.05)
        return self

    def _knows_all(self, node: RedisServer) -> bool:
        with node.client() as c:
            info = c.execute_command("CLUSTER INFO")
            return int(info.get("cluster_known_nodes", 0)) == len(self.nodes)

    @staticmethod
    def node_id(node: RedisServer) -> str:
        """The cluster id of ``node``."""
        with node.client() as c:
            return str(c.execute_command("CLUSTER MYID").decode())

    def healthy(self) -> bool:
        """Every live node says ok, and every live replica's link to its master is up."""
        for node in self.nodes:
            if not _alive(node):
                continue
            with _client(node.port) as c:
                if c.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    return False
            info = _info(node.port, "replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        return sum(self.is_master(n) for n in self.nodes if _alive(n)) == self.masters

    @staticmethod
    def is_master(node: RedisServer) -> bool:
        """Whether ``node`` says it is a master."""
        return bool(_info(node.port, "replication").get("role") == "master")

    def owner(self, slot: int) -> RedisServer:
        """The node serving ``slot``, as a live node's ``CLUSTER SLOTS`` says."""
        for node in self.nodes:
            if not _alive(node):
                continue
            with contextlib.suppress(redis.RedisError), _client(node.port) as c:
                for start, end, primary, *_ in c.execute_command("CLUSTER SLOTS"):
                    if start <= slot <= end:
                        port = int(primary[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no live node knows who serves slot {slot}")

    def kill(self, node: RedisServer) -> None:
        """SIGKILL ``node``."""
        _kill(node)

    def wait_promoted(self, slot: int, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until another node serves ``slot``, says it is a master, and the cluster is
        ok again."""

        def promoted() -> bool:
            new = self.owner(slot)
            if new is old or not self.is_master(new):
                return False
            with _client(new.port) as c:
                return bool(c.execute_command("CLUSTER INFO").get("cluster_state") == "ok")

        wait_until(promoted, timeout, f"slot {slot} to fail over from port {old.port}", 0.02)
        return self.owner(slot)

    def restart_as_replica(self, old: RedisServer, timeout: float = 30.0) -> None:
        """Start the killed ``old`` master again: its nodes.conf makes it rejoin, and the
        cluster turns it into a replica of the node that took its slots."""
        _kill(old)
        old.start()
        wait_until(self.healthy, timeout, "the old master to rejoin as a replica", 0.05)

    def cleanup(self) -> None:
        """Stop every node and remove its files."""
        for node in self.nodes:
            _resume_then_cleanup(node)


# -- a network namespace ----------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def netns_unavailable_reason() -> str | None:
    """Why this process cannot make network namespaces (None: it can)."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to make a network namespace"
    if os.geteuid() != 0:
        return "making a network namespace needs root"
    return None


class Netns:
    """A network namespace joined to the host by a veth pair on a /30 of 10.213.0.0/16.

    The host side is :attr:`host_ip`, the namespace side :attr:`ns_ip`. A server bound to
    :attr:`host_ip` is reached from inside through the veth only, so :meth:`cut` severs the
    namespace's processes from it and :meth:`heal` joins them again. Use it as a context
    manager: the namespace and the veth pair are always removed.
    """

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"cex-{tag}"
        self.host_dev = f"cexh{tag}"
        self.ns_dev = f"cexn{tag}"
        self.subnet = self._free_subnet()
        self.host_ip = f"10.213.{self.subnet}.1"
        self.ns_ip = f"10.213.{self.subnet}.2"
        self.cut_how: str | None = None

    @staticmethod
    def _free_subnet() -> int:
        used = _ip("-o", "-4", "addr", "show").stdout
        for _ in range(200):
            n = secrets.randbelow(250) + 1
            if f"10.213.{n}." not in used:
                return n
        raise RuntimeError("no free 10.213.x.0/30 subnet")

    def __enter__(self) -> Netns:
        try:
            self.create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def create(self) -> None:
        """Make the namespace and the veth pair, and bring both ends up."""
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        _ip("link", "set", self.ns_dev, "netns", self.name)
        _ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_dev)
        _ip("link", "set", self.host_dev, "up")
        _ip("-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_dev)
        _ip("-n", self.name, "link", "set", self.ns_dev, "up")
        _ip("-n", self.name, "link", "set", "lo", "up")

    def redis_server(self) -> RedisServer:
        """A standalone Redis (not started) listening on 127.0.0.1 and :attr:`host_ip`."""
        # Protected mode would refuse the namespace's clients (not loopback); the address is
        # this host's private veth end, reachable from the namespace only.
        return RedisServer("--bind", "127.0.0.1", self.host_ip, "--protected-mode", "no")

    def command(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self, how: str) -> None:
        """Cut the namespace off: ``"down"`` sets the host's veth down; ``"loss"`` drops
        every packet both ways (netem ``loss 100%`` where the kernel has netem, else a
        ``pfifo`` queue of length 0 on both ends, which drops all the same) while the link
        stays up, so neither side sees an error: its packets just vanish."""
        if how == "down":
            _ip("link", "set", self.host_dev, "down")
            self.cut_how = "link down"
        elif how == "loss":
            netem = ["qdisc", "add", "dev", self.host_dev, "root", "netem", "loss", "100%"]
            if _tc(*netem).returncode == 0:
                _tc_check("-n", self.name, *netem[:3], self.ns_dev, *netem[4:])
                self.cut_how = "netem loss 100%"
            else:
                _tc_check("qdisc", "add", "dev", self.host_dev, "root", "pfifo", "limit", "0")
                _tc_check(
                    "-n", self.name, "qdisc", "add", "dev", self.ns_dev, "root", "pfifo",
                    "limit", "0",
                )  # fmt: skip
                self.cut_how = "pfifo limit 0 (all packets dropped; no netem here)"
        else:
            raise ValueError(f"how must be 'down' or 'loss', not {how!r}")

    def heal(self) -> None:
        """Undo :meth:`cut`: the link up, the dropping queues removed."""
        _ip("link", "set", self.host_dev, "up")
        _tc("qdisc", "del", "dev", self.host_dev, "root")
        _tc("-n", self.name, "qdisc", "del", "dev", self.ns_dev, "root")

    def remove(self) -> None:
        """Remove the veth pair and the namespace (whatever of them exists)."""
        _ip("link", "del", self.host_dev, check=False)
        _ip("netns", "del", self.name, check=False)

    def exists(self) -> bool:
        """Whether the namespace is still there."""
        return self.name in _ip("netns", "list").stdout.split()


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, timeout=20)


def _tc_check(*args: str) -> None:
    done = _tc(*args)
    if done.returncode != 0:
        raise RuntimeError(f"tc {' '.join(args)} failed: {done.stderr.strip()}")
