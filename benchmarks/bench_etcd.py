#!/usr/bin/env python
"""What the etcd store costs on a single private member: acquire+release, refusals, renewals.

Run from the repository root::

    python benchmarks/bench_etcd.py            # 5 rounds x 300 pairs, renewal batches of 100/1000
    python benchmarks/bench_etcd.py --quick    # 2 rounds x 100 pairs

It starts a private etcd member (``tests/etcd.py``: the ``etcd`` binary on PATH, data in
``/dev/shm``) on free loopback ports and stops it at the end. It reports, as medians and p99:

- acquire + release of one reused ``Lease`` (``auto_renew=False``), and the gateway calls each
  one sends (counted on the wire: every ``Gateway.post``);
- a refused acquire (the key held by another token), and the requests of the first refusal
  in this process, of the next ones, and of the grant once the key is free;
- one renewal batch (``backend.renew``) of 100 and of 1,000 held leases: one keep-alive
  request carrying every lease id and one slot check per 128 leases, against the keep-alives
  alone sent as one request per lease.

Every loop is bounded; figures mean something only next to each other on one machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from tests.etcd import EtcdCluster  # noqa: E402

from celery_exclusive import connect  # noqa: E402
from celery_exclusive.backends.base import RenewRequest  # noqa: E402
from celery_exclusive.backends.etcd import EtcdBackend  # noqa: E402
from celery_exclusive.backends.etcd.gateway import Gateway  # noqa: E402


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"median {statistics.median(ordered) * 1000:7.2f} ms   p99 {p99 * 1000:7.2f} ms"


def _timed(rounds: int, n: int, step: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(rounds):
        for _ in range(n):
            began = time.perf_counter()
            step()
            samples.append(time.perf_counter() - began)
    return samples


class _Counting:
    """Counts the gateway's requests (each ``post`` is one HTTP round trip)."""

    def __init__(self, gateway: Gateway) -> None:
        self.calls: list[str] = []
        original = gateway.post

        def post(path: str, payload: bytes) -> bytes:
            self.calls.append(path)
            return original(path, payload)

        gateway.post = post  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, pairs = (2, 100) if args.quick else (5, 300)
    server = EtcdCluster(1).start()
    try:
        store = connect(server.url, prefix="bench")
        backend = store.backend
        assert isinstance(backend, EtcdBackend)
        counting = _Counting(backend.gateway)

        lease = store.lease("pair", auto_renew=False)
        for _ in range(20):  # warm-up: connections opened
            lease.acquire()
            lease.release()
        counting.calls.clear()
        lease.acquire()
        acquire_calls = list(counting.calls)
        counting.calls.clear()
        lease.release()
        release_calls = list(counting.calls)
        pair = _timed(rounds, pairs, lambda: (lease.acquire(), lease.release()))
        print(f"etcd {server.members[0].client_url} (single member), {rounds} x {pairs}")
        print(f"acquire+release      {_ms(pair)}")
        print(f"  requests: acquire {acquire_calls}, release {release_calls}")

        holder = store.lease("held", ttl=60, auto_renew=False)
        holder.acquire()
        refused = store.lease("held", auto_renew=False)
        counting.calls.clear()
        refused.acquire()
        first_calls = list(counting.calls)
        counting.calls.clear()
        refused.acquire()
        again_calls = list(counting.calls)
        samples = _timed(rounds, pairs // 3, refused.acquire)
        print(f"refused acquire      {_ms(samples)}   (refused before by this process)")
        print(f"  requests: first refusal {first_calls}, then {again_calls}")
        holder.release()
        counting.calls.clear()
        refused.acquire()
        print(f"  the grant once free: {counting.calls}")
        refused.release()

        for size in (100, 1000):
            _renewals(backend, size, rounds)
        store.close()
    finally:
        server.cleanup()
    return 0


def _renewals(backend: EtcdBackend, size: int, rounds: int) -> None:
    """One renewal batch of ``size`` leases: batched keep-alive vs one request per lease."""
    tokens = [f"t{i}" for i in range(size)]
    for i, token in enumerate(tokens):
        backend.acquire(f"renew:{i}", token, ttl=60, limit=1, meta="{}")
    requests = [RenewRequest(f"renew:{i}", token, 60.0) for i, token in enumerate(tokens)]
    grants = [backend._grant_of(r.key, r.token) for r in requests]
    batched = _timed(rounds * 2, 1, lambda: backend.renew(requests))
    assert all(backend.renew(requests))

    def one_by_one() -> None:
        for grant in grants:
            assert grant is not None
            backend.gateway.keep_alive([grant[1]])

    single = _timed(rounds, 1, one_by_one)
    print(f"renew {size:5d} leases  batched:      {_ms(batched)}")
    print(f"renew {size:5d} leases  one by one:   {_ms(single)}")
    for i, token in enumerate(tokens):
        backend.release(f"renew:{i}", token)


if __name__ == "__main__":
    sys.exit(main())
