"""Soak: many POST /messages over concurrent keep-alive connections; no errors, memory levels off.

The load comes from a lean asyncio raw-HTTP loader (httpx's AsyncClient would be the bottleneck).
Memory is the server's RSS, sampled by request count, never by time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.support import ServerProcess, running_server

REQUESTS = 100_000
CONNECTIONS = 50
SAMPLES = 25


@dataclass
class Tally:
    done: int = 0
    errors: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


def _request(n: int) -> bytes:
    body = json.dumps({"text": f"soak message {n}"}).encode()
    return (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


async def _worker(path: str, count: int, tally: Tally, sample: Callable[[], None]) -> None:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        for n in range(count):
            writer.write(_request(n))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if status != 201 or b'"reply":"Hello from server via UDS"' not in body:
                tally.errors.append(f"{status} {body[:200]!r}")
            if b"connection: close" in head.lower():
                tally.errors.append("server closed a keep-alive connection")
                return
            tally.done += 1
            if tally.done % (REQUESTS // SAMPLES) == 0:
                sample()
    finally:
        writer.close()
        await writer.wait_closed()


async def _load(path: str, tally: Tally, process: psutil.Process) -> None:
    def sample() -> None:
        tally.rss.append(process.memory_info().rss)

    per_connection = REQUESTS // CONNECTIONS
    results = await asyncio.gather(
        *(_worker(path, per_connection, tally, sample) for _ in range(CONNECTIONS)), return_exceptions=True
    )
    tally.errors.extend(repr(r) for r in results if isinstance(r, BaseException))


@pytest.mark.slow
def test_soak_keepalive_posts(tmp: Path) -> None:
    with running_server("--request-timeout", "60", "--keepalive-timeout", "60", tmp=tmp) as server:
        process = psutil.Process(server.proc.pid)
        tally = Tally()
        asyncio.run(_load(str(server.socket_path), tally, process))
        assert tally.errors == []
        assert tally.done == REQUESTS
        assert server.stop() == 0
        _check_output(server)
    _check_memory(tally.rss)


def _check_output(server: ServerProcess) -> None:
    lines = server.log_path.read_text(encoding="utf-8").splitlines()
    received = sum(1 for line in lines if line.startswith("📩 Server received: soak message "))
    assert received == REQUESTS
    problems = [line for line in lines if line.startswith(("WARNING", "ERROR", "CRITICAL"))]
    assert problems == []


def _check_memory(rss: list[int]) -> None:
    """After warm-up (history filling), RSS stays level: the last samples near the middle ones."""
    assert len(rss) >= SAMPLES - 1, rss
    third = len(rss) // 3
    middle = statistics.median(rss[third : 2 * third])
    last = max(rss[-third:])
    margin = max(4 * 1024 * 1024, middle * 0.05)
    mib = [round(r / 2**20, 1) for r in rss]
    print(f"server RSS (MiB by sample): {mib}")
    assert last - middle <= margin, f"server RSS kept growing (MiB by sample): {mib}"
