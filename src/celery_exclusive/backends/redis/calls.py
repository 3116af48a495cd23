"""How the Redis backend's script calls travel: the fast path, and redis-py's usual one.

Every operation of :class:`~celery_exclusive.backends.redis.RedisBackend` is one Lua script
call (``EVALSHA``). :class:`ScriptCalls`, a base of the backend, sends them:

- the fast path (:meth:`ScriptCalls._send`): the calls packed here (:func:`_pack`) and written
  straight to a connection of the client's own pool, kept between calls; a third of the
  client-side CPU of redis-py's command machinery, which a lease pays twice per run;
- releases sent without waiting for their answer (:meth:`ScriptCalls._send_owed`): the
  answer stays on the connection, owed (:class:`_Owed`), and its next user reads it first;
- the usual path (:meth:`ScriptCalls._call_usual`): redis-py's registered scripts, which load
  a script the server lost (``NOSCRIPT``) and retry a broken connection as the client is
  configured to; taken on a Cluster, on a client pinned to one connection, and whenever the
  fast path could not send or read;
- pipelines of one script called many times (:meth:`ScriptCalls._pipelined`: renewal, a
  Cluster's listing).
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ... import forking
from ...exceptions import BackendError, ConfigurationError

logger = logging.getLogger(__name__)

#: The default socket timeout for clients built from a URL: a store that stops answering holds
#: its renewal sender this long (the loss itself is reported at the lease's deadline anyway).
DEFAULT_SOCKET_TIMEOUT = 10.0

#: How long a grant or renewal waits for its replicas by default (``replicas=N``), in seconds.
DEFAULT_REPLICA_TIMEOUT = 1.0

#: One script call: the script's name, its KEYS and its ARGV.
Call = tuple[str, list[str], list[Any]]


def import_redis() -> Any:
    """Return the ``redis`` module, or say which extra installs it."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "the Redis store needs redis-py: pip install 'celery-exclusive[redis]'"
        ) from exc
    return redis


class ScriptCalls:
    """The sending half of the Redis backend: script calls, pipelined or one by one.

    The backend sets :attr:`client`, :attr:`_description` and :attr:`_cluster`, then calls
    :meth:`_setup_calls` with the scripts' sources.
    """

    client: Any
    _description: str
    _cluster: bool

    def _setup_calls(self, client: Any, sources: dict[str, str]) -> None:
        """Register the scripts on ``client`` and choose the fast path where it can run."""
        redis = import_redis()
        self._sources = sources
        self._scripts = {name: client.register_script(src) for name, src in sources.items()}
        self._shas = {name: script.sha for name, script in self._scripts.items()}
        self._socket_timeout = _client_socket_timeout(client)
        # The fast path talks to the client's connection pool: not on a Cluster (a pool per
        # node) nor on a client pinned to one connection.
        pool = getattr(client, "connection_pool", None)
        direct = not self._cluster and getattr(client, "connection", None) is None
        self._pool: Any = pool if direct and pool is not None else None
        self._pool_new_api = self._pool is not None and _get_connection_takes_no_name(pool)
        # Commands are packed here (see _pack) when the client encodes text as UTF-8 strictly,
        # as redis-py does by default; else by redis-py's own packer.
        settings = self._pool.connection_kwargs if self._pool is not None else {}
        encoding = str(settings.get("encoding", "utf-8")).lower().replace("_", "-")
        self._pack_here = (
            encoding in ("utf-8", "utf8") and settings.get("encoding_errors", "strict") == "strict"
        )
        # Connections taken from that pool and kept for the fast path: each one's last reply
        # was read in full, so none needs the pool's check for unread data (a non-blocking
        # read and two timeout changes: three system calls per command).
        self._idle: list[Any] = []
        # Answers of releases sent without waiting, by connection, read by its next user.
        self._owed: dict[int, tuple[Any, list[_Owed]]] = {}
        self._owed_lock = threading.Lock()
        self._release_loaded = False
        forking.call_after_fork(self, ScriptCalls._forget_connections)
        self._no_script = redis.exceptions.NoScriptError
        self._reply_errors = (redis.exceptions.ResponseError,)
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            redis.exceptions.RedisClusterException,
            OSError,
        )

    # -- one call, calls in order, calls read later ---------------------------------------

    def _call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._call_all([(name, keys, args)])[0]

    def _call_all(self, calls: Sequence[Call]) -> list[Any]:
        """Run script calls in order, in one round trip on the fast path; return the replies."""
        return self._call_later(calls)()

    def _call_later(self, calls: Sequence[Call]) -> Callable[[], list[Any]]:
        """Send script calls now on the fast path; return the reader of their replies, which
        makes the calls the usual way when the fast path could not (see _send)."""
        sent = self._send(calls) if self._pool is not None else None

        def replies() -> list[Any]:
            if sent is not None:
                read = sent()
                if read is not _RETRY:
                    return read  # type: ignore[no-any-return]
            return self._call_usual(calls)

        return replies

    def _call_usual(self, calls: Sequence[Call]) -> list[Any]:
        """Run script calls one by one through redis-py (which loads a script on NOSCRIPT)."""
        replies = []
        for name, keys, args in calls:
            try:
                replies.append(self._scripts[name](keys=keys, args=args))
            except self._errors as exc:
                raise BackendError(f"{name} on {self._description} failed: {exc}") from exc
        return replies

    def _pipelined(self, name: str, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """Run script ``name`` once per ``(keys, args)`` of ``calls`` in one pipeline
        (transaction=False): one round trip, one per node on Cluster. Returns the replies in
        order; raises what redis-py raises (the first error reply).
        """
        if self._pool is not None:  # the fast path pipelines them on a kept connection
            return self._call_all([(name, keys, args) for keys, args in calls])

        def send(calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                if self._cluster:  # redis-py refuses EVALSHA in a cluster pipeline
                    pipe.execute_command("EVAL", self._sources[name], len(keys), *keys, *args)
                else:
                    pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
            return list(pipe.execute(raise_on_error=self._cluster))  # Cluster: as before

        # EVALSHA as it is: a script registered on the pipeline would make redis-py send
        # SCRIPT EXISTS first, a second round trip every time. A call refused with NOSCRIPT (a
        # restarted or flushed server) did not run: load the script and send those again.
        replies = send(calls)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, self._no_script)]
        if again:
            self.client.script_load(self._sources[name])
            for i, reply in zip(again, send([calls[i] for i in again]), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    def _confirmed(self, calls: Sequence[Call], replicas: int, timeout: float) -> list[Any]:
        """Run script calls on one connection, then ``WAIT replicas`` on it (``replicas=N``).

        Returns the calls' replies and, last, how many replicas acknowledged every write made
        on that connection so far. On a Cluster every call's keys must be on one node: the
        calls go to that node's own client (a cluster pipeline cannot route ``WAIT``). One
        round trip, plus the wait; never the fast path (its connections are shared by calls
        whose writes ``WAIT`` would wait for too).
        """
        client = self.client
        if self._cluster:
            client = client.get_redis_connection(client.get_node_from_key(calls[0][1][0]))

        def send() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, keys, args in calls:
                pipe.evalsha(self._shas[name], len(keys), *keys, *args)
            pipe.execute_command("WAIT", replicas, max(1, round(timeout * 1000)))
            return list(pipe.execute(raise_on_error=False))

        try:
            replies = send()
            if any(isinstance(reply, self._no_script) for reply in replies):
                for name in {name for name, _, _ in calls}:  # a restarted or flushed server
                    client.script_load(self._sources[name])
                replies = send()
        except self._errors as exc:
            self._learn_slots()
            what = calls[0][0]
            raise BackendError(f"{what} on {self._description} failed: {exc}") from exc
        for name, reply in zip([c[0] for c in calls] + ["WAIT"], replies, strict=True):
            if isinstance(reply, Exception):
                self._learn_slots()
                raise BackendError(f"{name} on {self._description} failed: {reply}") from reply
        return replies

    def _learn_slots(self) -> None:
        """On a Cluster, read the slot map again after a failed call of ``_confirmed``.

        Those calls go to a node's own client, past the cluster client's handling of a dead
        node or a ``MOVED`` answer, so they would keep going to a node that lost its slots
        (after a failover) without this. The failed call is not repeated: its caller tries
        again (the renewer at its next pass, a task by ``on_store_error``).
        """
        if not self._cluster:
            return
        try:
            self.client.nodes_manager.initialize()
        except self._errors:  # no node answers now: the next failure asks again
            logger.debug("reading the slot map of %s failed", self._description, exc_info=True)

    # -- a call whose answer is read later -----------------------------------------------

    def _send_owed(
        self,
        call: Call,
        again: Callable[[], bool],
        done: Callable[[bool | BackendError], object],
    ) -> Callable[[], None] | None:
        """Send ``call`` (a release) on the fast path without waiting for its answer.

        The answer is left on the connection, which goes back to the kept ones at once: its
        next user (usually this process's next command) reads it first and gives it to
        ``done``, so Redis runs the call before anything sent after it on that connection.
        ``again`` makes the call the usual way (the server lost the script). The returned
        collect() reads the answer now if nobody has (a fallback timer, settle()). None when
        nothing was sent: the caller makes the call the usual way.
        """
        if self._pool is None:
            return None
        conn = self._write([call])
        if conn is None:
            return None
        owed = _Owed(done, again)
        with self._owed_lock:
            self._owed.setdefault(id(conn), (conn, []))[1].append(owed)
        self._idle.append(conn)

        def collect() -> None:
            if owed.is_read():
                return
            try:
                self._idle.remove(conn)  # ours now: nobody else reads it meanwhile
            except ValueError:  # in use: its user reads the answer before anything else
                owed.wait_read(self._socket_timeout or DEFAULT_SOCKET_TIMEOUT)
                return
            self._collect(conn)
            self._idle.append(conn)

        return collect

    # -- the fast path --------------------------------------------------------------------

    def _send(self, calls: Sequence[Call]) -> Callable[[], Any] | None:
        """Send script calls on a kept connection now; return the reader of their replies.

        ``EVALSHA`` written straight to a connection of the client's own pool, the reply read
        by the returned function, which gives the connection back. None when sending failed
        (nothing was sent: the caller takes the usual path). The reader returns ``_RETRY``
        when the call must be made again the usual way, which loads the script (``NOSCRIPT``)
        and retries a broken connection as the client is configured to; it raises
        BackendError for any other error.
        """
        idle = self._idle
        conn = self._write(calls)
        if conn is None:
            return None

        def read() -> Any:
            replies: list[Any] = []
            error: tuple[str, BaseException] | None = None
            try:
                for name, _, _ in calls:  # read every reply: the connection stays in step
                    try:
                        replies.append(conn.read_response())
                    except self._reply_errors as exc:  # the server answered with an error
                        error = error or (name, exc)
            except BaseException:
                self._drop(conn)  # a reply half read must not reach the next user
                return _RETRY
            idle.append(conn)
            if error is None:
                return replies
            name, failure = error
            if isinstance(failure, self._no_script):
                return _RETRY  # the usual path loads the script (each call is safe to repeat)
            raise BackendError(f"{name} on {self._description} failed: {failure}") from failure

        return read

    def _write(self, calls: Sequence[Call]) -> Any:
        """Write script calls (EVALSHA) on a kept connection; return it, its replies unread.
        None when nothing could be sent."""
        conn = self._take()
        if conn is None:
            return None
        commands = [
            ("EVALSHA", self._shas[name], len(keys), *keys, *args) for name, keys, args in calls
        ]
        try:
            packed = _pack(commands) if self._pack_here else None
            conn.send_packed_command([packed] if packed else conn.pack_commands(commands))
        except BaseException:
            self._drop(conn)
            return None
        return conn

    def _take(self) -> Any:
        """A kept connection (or a new one from the pool), its owed answers read; None when
        the pool cannot give one."""
        try:
            conn = self._idle.pop()  # atomic: no two threads get one connection
        except IndexError:
            try:
                pool = self._pool
                conn = pool.get_connection() if self._pool_new_api else pool.get_connection("_")
            except self._errors:
                return None
        if self._owed:
            self._collect(conn)
        return conn

    def _collect(self, conn: Any) -> None:
        """Read the answers owed on ``conn`` (releases sent without waiting), in order."""
        with self._owed_lock:
            owed = self._owed.pop(id(conn), (None, []))[1]
        for n, item in enumerate(owed):
            try:
                reply = conn.read_response()
            except self._no_script:  # the server lost its scripts: load, release now
                item.answer(_try_release(item))
            except self._reply_errors as exc:  # answered with an error: still in step
                item.answer(BackendError(f"release on {self._description} failed: {exc}"))
            except BaseException as exc:
                conn.disconnect()  # every later answer on it is lost too; it reconnects
                error = BackendError(f"release on {self._description} failed: {exc}")
                for rest in owed[n:]:
                    rest.answer(error)
                return
            else:
                item.answer(bool(int(reply)))

    def _drop(self, conn: Any) -> None:
        if self._owed:
            self._collect(conn)  # sends nothing: the owed answers get their errors
        conn.disconnect()
        self._pool.release(conn)

    def _close_connections(self) -> None:
        """Close the kept connections, reading the answers still owed on them first."""
        idle, self._idle = self._idle, []
        for conn in idle:
            if self._owed:
                self._collect(conn)  # the answers of releases still owed on it
            conn.disconnect()

    def _forget_connections(self) -> None:
        """In a forked child: the parent's connections are the parent's (never closed here)."""
        self._idle = []
        self._owed = {}
        self._owed_lock = threading.Lock()


def _try_release(item: _Owed) -> bool | BackendError:
    try:
        return item.again()
    except BackendError as exc:
        return exc


#: A fast-path reply that asks for the call to be made again the usual way (see _send).
_RETRY = object()


class _Owed:
    """A release sent whose answer is still to be read: ``done`` gets it (or the error);
    ``again`` makes the release the usual way."""

    __slots__ = ("_unread", "again", "done")

    def __init__(
        self, done: Callable[[bool | BackendError], object], again: Callable[[], bool]
    ) -> None:
        self.done = done
        self.again = again
        # Held until the answer is read: a lock, not an Event (one per release; an Event
        # costs a Condition and two locks).
        self._unread = threading.Lock()
        self._unread.acquire()

    def is_read(self) -> bool:
        return not self._unread.locked()

    def wait_read(self, timeout: float) -> None:
        if self._unread.acquire(timeout=timeout):
            self._unread.release()

    def answer(self, result: bool | BackendError) -> None:
        self._unread.release()  # called once: its answer is popped from the owed list
        try:
            self.done(result)
        except Exception:  # a receiver's error must not break the command that read it
            logger.exception("handling the answer of a release failed")


def _client_socket_timeout(client: Any) -> float | None:
    try:
        kwargs = client.connection_pool.connection_kwargs
    except AttributeError:  # a cluster client has one pool per node
        kwargs = getattr(client, "nodes_manager", None)
        kwargs = getattr(kwargs, "connection_kwargs", {}) if kwargs else {}
    value = kwargs.get("socket_timeout")
    return float(value) if value else None


def _get_connection_takes_no_name(pool: Any) -> bool:
    """redis-py 5.3+ deprecates the command name ``ConnectionPool.get_connection`` required."""
    try:
        param = inspect.signature(pool.get_connection).parameters.get("command_name")
    except (TypeError, ValueError):
        return False
    return param is None or param.default is not inspect.Parameter.empty


def _pack(commands: Sequence[tuple[Any, ...]]) -> bytes | None:
    """The commands in the Redis protocol (RESP), as redis-py packs them with its default
    UTF-8 encoder, at a third of its cost; None when an argument is not str, bytes or int
    (redis-py packs those)."""
    out = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            kind = type(arg)
            if kind is str:
                arg = arg.encode()
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes:
                return None
            out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)
