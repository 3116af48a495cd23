"""etcd's v3 JSON gateway over the standard library's ``http.client``: no driver to install.

Every etcd member (3.4 and later) serves the gRPC API as JSON on its client port
(``POST /v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant`` ...). Bytes travel as base64,
64-bit numbers as decimal strings. :class:`Gateway` keeps one kept-alive connection per
thread and process to the member in use, moves to the next member of the URL when one cannot
be reached, and sends the two streaming calls the store needs: a keep-alive of many leases in
one request (:meth:`Gateway.keep_alive`), and a watch read until an event or a deadline
(:meth:`Gateway.watch_deletes`).
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from ... import forking
from ...exceptions import BackendError

__all__ = ["EtcdError", "Gateway", "b64", "unb64"]

#: gRPC status of "requested lease not found" (and of other missing things).
NOT_FOUND = 5

#: Requests one keep-alive batch may take: the gateway sometimes answers only the first part
#: of a batch, and the rest is sent again.
KEEPALIVE_REQUESTS = 64

#: At most this many lines are read from one watch before it is given up (a watch sends one
#: line per event batch; the caller's key sees few).
MAX_WATCH_LINES = 10_000

#: Errors of a connection that did not answer (timeouts and refusals are OSErrors): another
#: member may.
_DOWN = (OSError, http.client.HTTPException)


class EtcdError(BackendError):
    """An error the etcd gateway answered with (``code`` is the gRPC status)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def b64(data: bytes | str) -> str:
    """Bytes (or UTF-8 text) as the gateway's base64 text."""
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: str) -> bytes:
    """The gateway's base64 text as bytes ("" for a missing field)."""
    return base64.b64decode(text) if text else b""


class _Local(threading.local):
    """This thread's connections, by member index."""

    def __init__(self) -> None:
        self.conns: dict[int, http.client.HTTPConnection] = {}


class Gateway:
    """Calls to an etcd cluster's JSON gateway; safe across threads and forks.

    ``members``: ``(host, port)`` pairs, tried in order from the last one that answered.
    ``timeout``: seconds a call may take on one member (connect, send and read).
    """

    def __init__(
        self,
        members: Sequence[tuple[str, int]],
        *,
        timeout: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.members = tuple(members)
        self.timeout = timeout
        self._tls = tls
        self._current = 0
        self._local = _Local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        forking.call_after_fork(self, Gateway._reset_after_fork)

    def _reset_after_fork(self) -> None:
        # The parent's sockets are the parent's: this process opens its own.
        self._local = _Local()
        self._all = []
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------

    def _connection(self, index: int, timeout: float) -> http.client.HTTPConnection:
        conn = self._local.conns.get(index)
        if conn is None:
            host, port = self.members[index]
            if self._tls is not None:
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            self._local.conns[index] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self, index: int) -> None:
        conn = self._local.conns.pop(index, None)
        if conn is not None:
            conn.close()
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)

    def close(self) -> None:
        """Close every connection this process opened."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = _Local()

    # -- calls ---------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to ``/v3/<path>``; return the answer's JSON object."""
        raw = self.post(path, json.dumps(body, separators=(",", ":")).encode())
        return _decode(raw, path)

    def post(self, path: str, payload: bytes) -> bytes:
        """POST ``payload`` to ``/v3/<path>`` on a member that answers; return the body.

        A member that cannot be reached is left for the next one (each tried once per call);
        a kept connection the member had closed is opened again once.
        """
        errors: list[str] = []
        count = len(self.members)
        start = self._current
        for step in range(count):
            index = (start + step) % count
            for attempt in range(2):
                fresh = index not in self._local.conns
                conn = self._connection(index, self.timeout)
                try:
                    conn.request(
                        "POST", f"/v3/{path}", body=payload,
                        headers={"Content-Type": "application/json"},
                    )  # fmt: skip
                    reply = conn.getresponse()
                    data = reply.read()
                except _DOWN as exc:
                    self._drop(index)
                    if not fresh and attempt == 0 and _stale(exc):
                        continue  # a kept connection the member had closed: open it again
                    errors.append(f"{self._name(index)}: {exc!r}")
                    break
                self._current = index
                return data
        raise BackendError(f"etcd {path} failed on every member: {'; '.join(errors)}")

    def keep_alive(self, lease_ids: Sequence[int]) -> dict[int, int]:
        """Renew every lease in ``lease_ids``; return each one's TTL (0: gone).

        The gateway takes a stream of JSON objects in one request body and answers with one
        line per lease, in order; but etcd 3.4's gateway may end its answer early (measured:
        100 leases sent, 18 answered in about one try out of three), so the leases it did not
        answer are sent again, in at most :data:`KEEPALIVE_REQUESTS` requests in all.
        """
        ttls: dict[int, int] = {}
        pending = list(dict.fromkeys(lease_ids))
        for _ in range(KEEPALIVE_REQUESTS):
            if not pending:
                return ttls
            ttls.update(self._keep_alive_once(pending))
            pending = [lid for lid in pending if lid not in ttls]
        if pending:
            raise BackendError(
                f"etcd keepalive: {len(pending)} of {len(lease_ids)} leases got no answer"
            )
        return ttls

    def _keep_alive_once(self, lease_ids: Sequence[int]) -> dict[int, int]:
        payload = "\n".join(f'{{"ID":"{lid}"}}' for lid in lease_ids).encode()
        raw = self.post("lease/keepalive", payload)
        ttls: dict[int, int] = {}
        for line in raw.splitlines():
            if not line.strip():
                continue
            message = json.loads(line)
            if "error" in message:
                err = message["error"]
                raise EtcdError(f"etcd keepalive failed: {err}", int(err.get("grpc_code", 0)))
            result = message.get("result", {})
            ttls[int(result.get("ID", 0))] = int(result.get("TTL", 0))
        return ttls

    def watch_deletes(
        self, key: bytes, range_end: bytes, start_revision: int, timeout: float
    ) -> bool:
        """Wait until a key in ``[key, range_end)`` is deleted at ``start_revision`` or later.

        Return True on a deletion (or when the history was compacted or the watch cancelled:
        the caller checks again), False when ``timeout`` passes first. One connection of its
        own, closed at the end (closing it ends the watch on the member).
        """
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {"key": b64(key), "range_end": b64(range_end)}
        if start_revision > 0:
            body["start_revision"] = str(start_revision)
        payload = json.dumps({"create_request": body}).encode()
        host, port = self.members[self._current % len(self.members)]
        connect = min(self.timeout, max(timeout, 0.05))
        if self._tls is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=connect, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=connect)
        try:
            conn.request(
                "POST", "/v3/watch", body=payload, headers={"Content-Type": "application/json"}
            )
            reply = conn.getresponse()
            for message in _lines(reply, conn, deadline):
                if "error" in message:
                    return True  # the member could not watch: let the caller look again
                result = message.get("result", {})
                if result.get("canceled") or result.get("compact_revision"):
                    return True
                if any(e.get("type") == "DELETE" for e in result.get("events", ())):
                    return True
            return False
        except TimeoutError:
            return False
        except _DOWN as exc:
            raise BackendError(f"etcd watch on {host}:{port} failed: {exc!r}") from exc
        finally:
            conn.close()

    def _name(self, index: int) -> str:
        host, port = self.members[index]
        return f"{host}:{port}"


def _lines(
    reply: http.client.HTTPResponse, conn: http.client.HTTPConnection, deadline: float
) -> Iterator[dict[str, Any]]:
    """The JSON objects of a streamed answer, one per line, until ``deadline``."""
    for _ in range(MAX_WATCH_LINES):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        line = reply.readline()
        if not line:
            return
        if line.strip():
            yield json.loads(line)


def _stale(exc: BaseException) -> bool:
    """Whether ``exc`` says a kept connection had been closed by the other side."""
    return isinstance(
        exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)
    ) or (isinstance(exc, http.client.BadStatusLine) and not str(exc).strip("'\""))


def _decode(raw: bytes, path: str) -> dict[str, Any]:
    try:
        message: dict[str, Any] = json.loads(raw)
    except ValueError as exc:
        raise BackendError(f"etcd {path}: not JSON: {raw[:200]!r}") from exc
    if "error" in message and "header" not in message:
        code = int(message.get("code", 0))
        raise EtcdError(f"etcd {path} failed: {message.get('error')}", code)
    return message
