"""A private PostgreSQL server for the tests: its own data dir, a free loopback port, no auth.

Binaries (``initdb`` and ``postgres``, from one directory) are looked for in this order:

1. ``CELERY_EXCLUSIVE_TEST_POSTGRES_BIN``: a directory holding them;
2. ``initdb`` on PATH (with ``postgres`` beside it);
3. ``/usr/lib/postgresql/<version>/bin`` (Debian and Ubuntu packages; newest first);
4. the ``pgserver`` wheel, which ships a PostgreSQL build (in the ``test`` extra on
   Linux x86_64 for Python < 3.13), so a fresh machine with only Python can run the suite.

PostgreSQL refuses to run as root. When the tests run as root, ``initdb`` and ``postgres`` run
as an unprivileged user instead (``postgres`` if the machine has it, else ``nobody``), through
``subprocess``'s ``user=``/``group=`` (no ``su``/``runuser``, no PAM, nothing to install). The
data dir is a fresh temp dir given to that user; the server listens on 127.0.0.1 only (no
Unix socket), with ``fsync`` off (a crash of the server process loses nothing committed, a
crash of the machine would): a test server, never a place for data.

Every wait has a deadline; nothing sleeps without a condition to check.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .servers import GaveUp, free_port, wait_until

__all__ = ["PostgresServer", "postgres_bin_dir"]

#: Seconds allowed for initdb and for the server to accept connections (a loaded CI box).
START_TIMEOUT = 30.0


def _has_binaries(directory: str | os.PathLike[str]) -> bool:
    return all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "postgres"))


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path)) or (0,)


def postgres_bin_dir() -> str | None:
    """The directory of ``initdb`` and ``postgres`` to use, or None when there is none."""
    explicit = os.environ.get("CELERY_EXCLUSIVE_TEST_POSTGRES_BIN")
    if explicit:
        return explicit if _has_binaries(explicit) else None
    on_path = shutil.which("initdb")
    if on_path and _has_binaries(os.path.dirname(on_path)):
        return os.path.dirname(on_path)
    for directory in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True):
        if _has_binaries(directory):
            return directory
    # Found without importing pgserver (its import has side effects we do not need).
    spec = importlib.util.find_spec("pgserver")
    for location in (spec.submodule_search_locations or []) if spec else []:
        shipped = Path(location) / "pginstall" / "bin"
        if _has_binaries(shipped):
            return str(shipped)
    return None


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


#: Resolved here, not in the child: a child between fork and exec must not import or load.
_PRCTL = _prctl() if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """In the child, before exec: have Linux stop the server (SIGINT) if the test run dies."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGINT)  # PR_SET_PDEATHSIG


def _run_as() -> dict[str, Any]:
    """``subprocess`` arguments that drop root for PostgreSQL (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user to run PostgreSQL as")


class PostgresServer:
    """One private PostgreSQL server: ``start``, ``stop``, ``kill``, ``restart``, ``cleanup``.

    The data dir survives ``stop``/``kill``/``start``, like a real server's disk; only
    ``cleanup`` removes it.
    """

    def __init__(self, bin_dir: str | None = None, *, port: int | None = None) -> None:
        found = bin_dir or postgres_bin_dir()
        if found is None:
            raise RuntimeError(
                "no PostgreSQL binaries: install PostgreSQL, or pip install pgserver, or set "
                "CELERY_EXCLUSIVE_TEST_POSTGRES_DSN"
            )
        self.bin_dir = found
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="cex-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log_path = os.path.join(self.dir, "postgres.log")
        self._as = _run_as()
        if self._as:
            os.chown(self.dir, self._as["user"], self._as["group"])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _initdb(self) -> None:
        args = [
            os.path.join(self.bin_dir, "initdb"),
            "-D", self.data,
            "-U", "postgres",
            "-A", "trust",
            "-E", "UTF8",
            "--no-locale",
            "--no-sync",
        ]  # fmt: skip
        done = subprocess.run(
            args,
            cwd=self.dir,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            env={**os.environ, "LC_ALL": "C"},
            check=False,
            **self._as,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}): {done.stderr[-3000:]}")

    def start(self) -> PostgresServer:
        if not os.path.exists(os.path.join(self.data, "PG_VERSION")):
            self._initdb()
        args = [
            os.path.join(self.bin_dir, "postgres"),
            "-D", self.data,
            "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1",
            "-c", "unix_socket_directories=",
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
            "-c", "shared_buffers=32MB",
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            if self._as:
                os.fchown(log.fileno(), self._as["user"], self._as["group"])
            self.proc = subprocess.Popen(
                args,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LC_ALL": "C"},
                preexec_fn=_die_with_parent if _PRCTL is not None else None,
                **self._as,
            )
        wait_until(self._ready, START_TIMEOUT, f"PostgreSQL on port {self.port}", step=0.05)
        return self

    def _ready(self) -> bool:
        import psycopg

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise GaveUp(f"postgres exited ({self.proc.returncode}): {self.log_tail()}")
        with psycopg.connect(self.dsn, connect_timeout=2) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)

    def log_tail(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-3000:]
        except OSError:
            return "?"

    def _signal_and_wait(self, sig: int, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): sessions are ended, the data is kept."""
        self._signal_and_wait(signal.SIGINT)

    def kill(self) -> None:
        """Immediate shutdown (SIGQUIT): like a crash; the next start recovers from the WAL."""
        self._signal_and_wait(signal.SIGQUIT)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running(server: PostgresServer) -> Iterator[PostgresServer]:
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def django_database(url: str, options: dict[str, str] | None = None) -> dict[str, Any]:
    """A Django ``DATABASES`` entry for the PostgreSQL database at ``url`` (with ``OPTIONS``)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    entry: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/") or "postgres",
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": str(parts.port or ""),
    }
    if options is not None:
        entry["OPTIONS"] = options
    return entry


# -- the session's server (the postgres_url fixture, tests/conftest.py) ----------------------

_shared_url: str | None = None
_shared_error: str | None = None


def _drop_tables(dsn: str, table: str) -> None:
    import psycopg

    with contextlib.suppress(Exception), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP TABLE IF EXISTS "{table}", "{table}_fence"')


def shared_postgres_url() -> str:
    """The URL of this test run's PostgreSQL, started (or named) once per process.

    With ``CELERY_EXCLUSIVE_TEST_POSTGRES_DSN`` it is that database, with a lease table of this
    run's own (``?table=cex_test_<random>``), dropped at exit; nothing else there is touched.
    Otherwise a private server, stopped and deleted at exit. Raises ``RuntimeError`` (with the
    reason) when neither can be had.
    """
    global _shared_url, _shared_error
    if _shared_url is not None:
        return _shared_url
    if _shared_error is not None:
        raise RuntimeError(_shared_error)
    import atexit
    import uuid

    dsn = os.environ.get("CELERY_EXCLUSIVE_TEST_POSTGRES_DSN")
    if dsn:
        table = f"cex_test_{uuid.uuid4().hex[:12]}"
        atexit.register(_drop_tables, dsn, table)
        _shared_url = f"{dsn}{'&' if '?' in dsn else '?'}table={table}"
        return _shared_url
    try:
        server = PostgresServer()
    except RuntimeError as exc:
        _shared_error = str(exc)
        raise
    try:
        server.start()
    except BaseException as exc:
        server.cleanup()
        _shared_error = f"could not start PostgreSQL from {server.bin_dir}: {exc}"
        raise RuntimeError(_shared_error) from exc
    atexit.register(server.cleanup)
    _shared_url = server.dsn
    return _shared_url
