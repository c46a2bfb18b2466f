"""(d) The client library: sequential round trips of a persistent ``client.Client`` (its default
httpx backend, and its ``http.client`` backend) against bare stdlib ``http.client`` on the same
socket, and ``AsyncClient`` with 50 concurrent tasks against what the lean generator gets from the
same server at 50 connections.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from typing import Any

from _common import BODY, Row, compare, loadgen, main_for, paired, servers


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.path)


def stdlib_rate(path: str, seconds: float) -> dict[str, float]:
    """POST /messages in a loop on one keep-alive ``http.client`` connection."""
    conn = _UnixHTTPConnection(path)
    body = BODY.encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    done = errors = 0
    start = time.perf_counter()
    end = start + seconds
    try:
        while time.perf_counter() < end:
            conn.request("POST", "/messages", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            done += 1
            errors += response.status != 201
    finally:
        conn.close()
    return {"rps": done / (time.perf_counter() - start), "errors": float(errors), "requests": float(done)}


def client_rate(path: str, seconds: float, **options: Any) -> dict[str, float]:
    """``Client.send`` in a loop on one persistent client (``options`` go to ``Client``)."""
    from client import Client

    done = 0
    with Client(path, **options) as api:
        api.health()  # connect outside the timed loop, as the stdlib side does on its first request
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            api.send("Hello from client")
            done += 1
    return {"rps": done / (time.perf_counter() - start), "errors": 0.0, "requests": float(done)}


def async_rate(path: str, seconds: float, tasks: int = 50) -> dict[str, float]:
    """``AsyncClient.send`` from ``tasks`` concurrent tasks sharing one client."""
    from client import AsyncClient

    async def main() -> tuple[int, float]:
        async with AsyncClient(path) as api:
            await asyncio.gather(*(api.health() for _ in range(tasks)))  # open the pool first
            count = 0
            start = time.perf_counter()
            end = start + seconds

            async def worker() -> None:
                nonlocal count
                while time.perf_counter() < end:
                    await api.send("Hello from client")
                    count += 1

            await asyncio.gather(*(worker() for _ in range(tasks)))
            return count, time.perf_counter() - start

    count, elapsed = asyncio.run(main())
    return {"rps": count / elapsed, "errors": 0.0, "requests": float(count)}


def run(quick: bool) -> list[Row]:
    rounds, seconds = (1, 0.5) if quick else (7, 2.0)
    with servers(("ours", False)) as (server,):
        path = str(server.socket)
        sequential = paired(rounds, lambda: client_rate(path, seconds), lambda: stdlib_rate(path, seconds))
        stdlib_backend = paired(
            rounds,
            lambda: client_rate(path, seconds, backend="http.client"),
            lambda: stdlib_rate(path, seconds),
        )
        concurrent = paired(
            rounds, lambda: async_rate(path, seconds), lambda: loadgen(server, 50, seconds, warmup=0.5)
        )
    return [
        compare(
            "d",
            "sequential round trips/s, POST /messages, one keep-alive connection",
            ("Client()", "stdlib http.client"),
            sequential,
            "rps",
            "req/s",
            ">= 0.8x",
            lambda r: r >= 0.8,
        ),
        compare(
            "d",
            'the same, with Client(backend="http.client")',
            ("client.Client", "stdlib http.client"),
            stdlib_backend,
            "rps",
            "req/s",
            ">= 0.8x",
            lambda r: r >= 0.8,
        ),
        compare(
            "d",
            "req/s with 50 concurrent tasks (share of what the server can serve)",
            ("AsyncClient x50", "uds-client bench c=50"),
            concurrent,
            "rps",
            "req/s",
            "reported",
            lambda r: True,
        ),
    ]


if __name__ == "__main__":
    main_for(run)
