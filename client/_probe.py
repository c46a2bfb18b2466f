"""A lean health probe: one HTTP/1.1 request over AF_UNIX with the standard library only.

``uds-client health`` runs as a Kubernetes exec probe every few seconds, so it must not pay for
importing httpx; this module imports nothing outside the standard library and ``client._errors``.
"""

from __future__ import annotations

import http.client
import socket

from client._address import to_url
from client._errors import ConnectError, reason_for

__all__ = ["probe"]


class _UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a Unix socket; the Host header reads ``localhost``."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def probe(path: str, target: str = "/healthz", *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``target`` on the socket at ``path``; return (status, body) or raise :class:`ConnectError`."""
    conn = _UnixConnection(path, timeout)
    try:
        conn.request("GET", target, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ConnectError(to_url(path), reason_for(exc)) from exc
    finally:
        conn.close()
