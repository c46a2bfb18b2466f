"""The uvicorn internals the protocol relies on are all still there (a uvicorn upgrade is checked here)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server, ServerState

from app.connection.internals import UVICORN_INTERNALS


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def write(self, data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_every_uvicorn_internal_the_protocol_uses_exists() -> None:
    async def main() -> dict[str, object]:
        config = Config(app=_app, lifespan="off", ws="none", log_config=None)
        config.load()
        protocol = HttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop())
        protocol.connection_made(_Transport())
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        owners: dict[str, object] = {"protocol": protocol, "cycle": protocol.cycle, "flow": protocol.flow}
        server = Server(config)
        with server.capture_signals():  # the signals it captured are kept in an attribute
            owners["server"] = server
        await asyncio.sleep(0)  # the request's task runs
        protocol.connection_lost(None)
        return owners

    owners = asyncio.run(main())
    missing = [
        f"{owner}.{name} ({why})"
        for owner, name, why in UVICORN_INTERNALS
        if not hasattr(owners[owner], name)
    ]
    assert not missing, f"uvicorn no longer has: {', '.join(missing)}; app/connection/ must change"
    assert {owner for owner, _, _ in UVICORN_INTERNALS} == set(owners)
