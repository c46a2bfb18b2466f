"""The proxy asks the kernel who owns a TCP connection once: the cap and the verdict share it."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from client.cli.proxy import caller, forwarding
from client.cli.proxy.command import allowed_hosts
from client.cli.proxy.forwarding import Proxy
from tests.client.test_proxy import unix_server


def test_one_owner_lookup_per_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, int]] = []

    def counting(peer: tuple[str, int], local: tuple[str, int]) -> tuple[int, int] | None:
        asked.append(peer)
        return real(peer, local)

    real = caller.tcp_owner
    monkeypatch.setattr(caller, "tcp_owner", counting)
    monkeypatch.setattr(forwarding, "tcp_owner", counting)
    lines: list[str] = []

    async def one_request(path: str) -> bytes:
        options = argparse.Namespace(
            socket=path, timeout=5.0, head_timeout=10.0, token_only=False, quiet=False
        )
        proxy = Proxy(options, 8, lines.append)
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        proxy.listening(allowed_hosts("127.0.0.1", port))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        server.close()
        await proxy.close_all()
        await server.wait_closed()
        return answer

    with unix_server() as upstream:
        answer = asyncio.run(one_request(upstream.path))
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert any(line.endswith("(admitted by uid)") for line in lines), lines
    assert len(asked) == 1, asked
