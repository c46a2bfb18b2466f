"""Upgrade requests (WebSocket or other) from a peer: answered as plain HTTP, logged at most once
per period like every other request a peer can repeat at will."""

from __future__ import annotations

import socket

from tests.support import read_response, running_server


def test_upgrade_requests_cannot_flood_the_log() -> None:
    with running_server("--store", "memory") as server:
        path = server.socket_path
        assert path is not None
        for _ in range(200):
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(5)
                conn.connect(path)
                conn.sendall(
                    b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
                )
                status, _, _ = read_response(conn)
                assert status == 200
        server.stop()
        warnings = [line for line in server.output.splitlines() if line.startswith("WARNING")]
        # Before: two lines per request (uvicorn's "Unsupported upgrade request." and its advice to
        # install a WebSocket library), 400 lines for 200 requests.
        assert 1 <= len(warnings) <= 2, warnings
        assert "upgrade" in warnings[0].lower(), warnings
