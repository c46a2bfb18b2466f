"""The uvicorn internals the protocol relies on are all still there (a uvicorn upgrade is checked here)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import Server, ServerState

# What app/connection/protocol.py (and the serving layer's ``UdsServer``) use of uvicorn beyond the
# callbacks they override, none of it documented, and why.
UVICORN_INTERNALS = (
    ("protocol", "parser", "fed piecewise to bound pipelining; read for a refused request's method"),
    ("protocol", "url", "the request target, to measure a head that came in pieces"),
    ("protocol", "headers", "counted and measured; trailer fields land there too"),
    ("protocol", "scope", "gets the peer extensions; its headers give the transfer coding"),
    ("protocol", "cycle", "the request last parsed: made keep_alive False while draining, counted"),
    ("protocol", "pipeline", "requests queued behind the one answered: bounded, a refused one dropped"),
    ("protocol", "flow", "replaced by HoldingFlow, which keeps reading paused while input is held"),
    ("protocol", "connections", "the open connections, which the connection cap scans"),
    ("protocol", "limit_concurrency", "set to None: our cap (503 in JSON, room made) replaces uvicorn's"),
    ("protocol", "timeout_keep_alive", "with timeout_keep_alive_task, since when a connection idles"),
    ("protocol", "timeout_keep_alive_task", "its due time tells since when a connection idles"),
    ("protocol", "_unset_keepalive_if_required", "before each parse, as in uvicorn; on a reset too"),
    ("cycle", "body", "what the application has not read yet, drawn on the held-input budget"),
    ("cycle", "disconnected", "set with message_event for cycles uvicorn does not mark on a hang-up"),
    ("cycle", "message_event", "wakes an application waiting for a body that will not come"),
    ("cycle", "keep_alive", "False while draining; True again for the end of an early answer"),
    ("cycle", "response_started", "an answer under way is not cut to make room or on a late body"),
    ("cycle", "response_complete", "which pipelined requests are answered"),
    ("cycle", "send", "wrapped by the recorder's counting send, and while a body is due"),
    ("flow", "read_paused", "HoldingFlow resumes reading only when nothing is held"),
    ("server", "_captured_signals", "cleared once stopped: a SIGTERM ends the process with code 0"),
    ("server", "_wait_tasks_to_complete", 'extended to note the drain done, for the "Drain done" line'),
)


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
