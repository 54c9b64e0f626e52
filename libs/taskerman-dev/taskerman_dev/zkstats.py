"""ZooKeeper's own counters, read with the four-letter word `mntr`: what benchmarks and tests use to
count the requests a recipe costs (the server counts every packet it receives)."""

from __future__ import annotations

import socket


def mntr(host: str, port: int, timeout: float = 2.0) -> dict[str, str]:
    """The server's `mntr` answer as a mapping (needs `mntr` in `4lw.commands.whitelist`)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"mntr")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    out = {}
    for line in b"".join(chunks).decode().splitlines():
        key, _, value = line.partition("\t")
        if key:
            out[key] = value.strip()
    return out


def packets_received(hosts: str) -> int:
    """Requests received so far by every server of `host:port,...` (summed over an ensemble)."""
    total = 0
    for item in hosts.split("/", 1)[0].split(","):
        host, _, port = item.strip().rpartition(":")
        total += int(mntr(host or "127.0.0.1", int(port))["zk_packets_received"])
    return total
