"""The test servers' ports: never where the kernel hands out source ports.

A port found free and closed again can be taken by any outgoing connection before the
server binds it, when it lies in the kernel's ephemeral range (CI once lost a cluster
node to "Address already in use" on port 37006 that way).
"""

from __future__ import annotations

from celery_exclusive.embedded import ephemeral_ports, free_port


def test_the_ephemeral_range_is_read_from_the_kernel() -> None:
    low, high = ephemeral_ports()
    assert 1024 <= low <= high <= 65535


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    low, _ = ephemeral_ports()
    for _ in range(200):
        assert 1024 <= free_port() < low


def test_a_cluster_nodes_bus_port_lies_below_it_too() -> None:
    low, _ = ephemeral_ports()
    for _ in range(200):
        port = free_port(with_bus=True)
        assert port >= 1024 and port + 10000 < low
