"""(d) The client library against bare httpx2 on the same socket: sequential round trips of a
persistent ``client.Client`` against a bare ``httpx2.Client``, and ``AsyncClient`` with 50 concurrent
tasks against a bare ``httpx2.AsyncClient`` with 50 tasks; then the async figure next to what the
server can serve at 50 connections (the lean load generator).

Both sides send the same ``POST /messages``. The bare side reads the raw answer; ``Client`` also
adds an Idempotency-Key, decodes the JSON into a ``Message``, bounds the request by its deadline
and counts the bytes against its cap: the ratio is the price of all that.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx2
from _common import BODY, Row, compare, loadgen, main_for, paired, servers

TASKS = 50
_HEADERS = {"content-type": "application/json", "accept": "application/json"}


def bare_rate(path: str, seconds: float) -> dict[str, float]:
    """``POST /messages`` in a loop on a bare ``httpx2.Client`` over ``HTTPTransport(uds=...)``."""
    body = BODY.encode()
    done = errors = 0
    with httpx2.Client(transport=httpx2.HTTPTransport(uds=path), base_url="http://localhost") as http:
        http.get("/healthz")  # connect outside the timed loop
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            response = http.post("/messages", content=body, headers=_HEADERS)
            done += 1
            errors += response.status_code != 201
        elapsed = time.perf_counter() - start
    return {"rps": done / elapsed, "errors": float(errors), "requests": float(done)}


def client_rate(path: str, seconds: float, **options: Any) -> dict[str, float]:
    """``Client.send`` in a loop on one persistent client (``options`` go to ``Client``)."""
    from client import Client

    done = 0
    with Client(path, **options) as api:
        api.health()  # connect outside the timed loop, as the bare side does
        start = time.perf_counter()
        end = start + seconds
        while time.perf_counter() < end:
            api.send("Hello from client")
            done += 1
        elapsed = time.perf_counter() - start
    return {"rps": done / elapsed, "errors": 0.0, "requests": float(done)}


def bare_async_rate(path: str, seconds: float, tasks: int = TASKS) -> dict[str, float]:
    """``POST /messages`` from ``tasks`` tasks sharing a bare ``httpx2.AsyncClient`` (its default pool)."""
    body = BODY.encode()

    async def main() -> tuple[int, int, float]:
        transport = httpx2.AsyncHTTPTransport(uds=path)
        async with httpx2.AsyncClient(transport=transport, base_url="http://localhost") as http:
            await asyncio.gather(*(http.get("/healthz") for _ in range(tasks)))  # open the pool first
            count = errors = 0
            start = time.perf_counter()
            end = start + seconds

            async def worker() -> None:
                nonlocal count, errors
                while time.perf_counter() < end:
                    response = await http.post("/messages", content=body, headers=_HEADERS)
                    count += 1
                    errors += response.status_code != 201

            await asyncio.gather(*(worker() for _ in range(tasks)))
            return count, errors, time.perf_counter() - start

    count, errors, elapsed = asyncio.run(main())
    return {"rps": count / elapsed, "errors": float(errors), "requests": float(count)}


def async_rate(path: str, seconds: float, tasks: int = TASKS) -> dict[str, float]:
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
    rounds, seconds = (1, 0.25) if quick else (7, 2.0)
    with servers(("ours", False)) as (server,):
        path = str(server.socket)
        sequential = paired(rounds, lambda: client_rate(path, seconds), lambda: bare_rate(path, seconds))
        concurrent = paired(rounds, lambda: async_rate(path, seconds), lambda: bare_async_rate(path, seconds))
        capacity = paired(
            rounds, lambda: async_rate(path, seconds), lambda: loadgen(server, TASKS, seconds, warmup=0.5)
        )
    return [
        compare(
            "d",
            "sequential round trips/s, POST /messages, one keep-alive connection",
            ("Client()", "bare httpx2.Client"),
            sequential,
            "rps",
            "req/s",
            ">= 0.9x",
            lambda r: r >= 0.9,
        ),
        compare(
            "d",
            f"req/s with {TASKS} concurrent tasks on one client",
            (f"AsyncClient x{TASKS}", f"bare httpx2.AsyncClient x{TASKS}"),
            concurrent,
            "rps",
            "req/s",
            ">= 0.9x",
            lambda r: r >= 0.9,
        ),
        compare(
            "d",
            f"the same next to what the server can serve at {TASKS} connections",
            (f"AsyncClient x{TASKS}", f"bench.py generator c={TASKS}"),
            capacity,
            "rps",
            "req/s",
            "reported",
            lambda r: True,
        ),
    ]


if __name__ == "__main__":
    main_for(run)
