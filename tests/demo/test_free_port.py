"""``free_port``: a port for a child to bind, outside the range the kernel hands out to ``bind(0)`` and outgoing
connections, so that no other process is given it before the child binds it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from llmpath.demo.supervisor import LOWEST_PICKED_PORT, free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


@pytest.mark.skipif(not RANGE.exists(), reason="the ephemeral port range is known on Linux only")
def test_ports_are_free_and_below_the_ephemeral_range() -> None:
    low = int(RANGE.read_text().split()[0])
    ports = {free_port() for _ in range(50)}
    assert all(LOWEST_PICKED_PORT <= port < low for port in ports)
    assert len(ports) > 40  # picked at random, not one after another from a shared counter
    for port in list(ports)[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free: it binds
