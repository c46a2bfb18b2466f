"""Peer allowlist: only processes whose uid or gid is allowed may call the API.

Installed only when ``allow_uid`` or ``allow_gid`` is set, so an open server pays nothing. The
peer comes from ``scope["extensions"]["uds.peer"]`` (SO_PEERCRED, set by the socket layer).
A connection without peer credentials (TCP) is refused: the allowlist fails closed. The probes
(``/healthz``, ``/readyz``) stay open so the kubelet can reach them, and so does ``/_ping``: a
client negotiates the API version before anything else, and the versions are no secret.

A request that names the user behind a proxy (``Uds-Forwarded-Peer``, see :mod:`app.forwarded`)
must have both on the list, the proxy's own process and the user it speaks for: a proxy never
widens who may call the API. A malformed header is refused too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_response
from app.forwarded import HEADER as FORWARDED_HEADER
from app.forwarded import parse_forwarded_peer
from app.logs import Throttle, escaped

__all__ = ["OPEN_PATHS", "PeerAllowlist", "is_allowed"]

log = logging.getLogger("app.access")

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/_ping"})


def is_allowed(peer: dict[str, int] | None, uids: frozenset[int], gids: frozenset[int]) -> bool:
    """True when the peer's uid is in ``uids`` or its gid is in ``gids``; no peer is never allowed."""
    if peer is None:
        return False
    return peer.get("uid") in uids or peer.get("gid") in gids


class PeerAllowlist:
    """Pure ASGI middleware answering 403 (the shared JSON error response) to peers not on the list.

    It answers without reading the request body; the protocol then closes the connection, so a
    refused peer cannot keep streaming a body into the server.
    """

    def __init__(self, app: ASGIApp, allow_uid: Iterable[int] = (), allow_gid: Iterable[int] = ()) -> None:
        self.app = app
        self.uids = frozenset(allow_uid)
        self.gids = frozenset(allow_gid)
        # Refusals are logged at most once per 10 s (with a count): a refused peer must not flood the log.
        self.refused = Throttle(log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        peer = scope.get("extensions", {}).get("uds.peer")
        if is_allowed(peer, self.uids, self.gids):
            behind = _forwarded(scope)
            if behind is None or is_allowed(behind.get("peer"), self.uids, self.gids):
                await self.app(scope, receive, send)
                return
            await self._refuse_forwarded(scope, receive, send, behind)
            return
        method, path = escaped(scope["method"]), escaped(scope["path"])
        if peer is None:
            self.refused.log(
                logging.WARNING,
                "Refused %s %s: no peer credentials (not a Unix socket connection); "
                "the allowlist admits only Unix socket peers",
                method,
                path,
            )
            message = "this server only accepts allowed peers over its Unix socket"
        else:
            self.refused.log(
                logging.WARNING,
                "Refused %s %s from pid=%s uid=%s gid=%s: not in allow_uid/allow_gid",
                method,
                path,
                peer.get("pid"),
                peer.get("uid"),
                peer.get("gid"),
            )
            message = (
                f"peer uid {peer.get('uid')} gid {peer.get('gid')} is not allowed; "
                "ask the operator to add it to UDS_ALLOW_UID or UDS_ALLOW_GID"
            )
        await error_response(403, message)(scope, receive, send)

    async def _refuse_forwarded(
        self, scope: Scope, receive: Receive, send: Send, behind: dict[str, dict[str, int] | None]
    ) -> None:
        method, path = escaped(scope["method"]), escaped(scope["path"])
        user = behind["peer"]
        if user is None:
            self.refused.log(
                logging.WARNING,
                "Refused %s %s: malformed or repeated Uds-Forwarded-Peer header",
                method,
                path,
            )
            message = "send one Uds-Forwarded-Peer header, reading 'uid=U gid=G pid=P'"
        else:
            self.refused.log(
                logging.WARNING,
                "Refused %s %s via proxy for uid=%s gid=%s: not in allow_uid/allow_gid",
                method,
                path,
                user["uid"],
                user["gid"],
            )
            message = (
                f"uid {user['uid']} gid {user['gid']}, behind the proxy, is not allowed; "
                "ask the operator to add it to UDS_ALLOW_UID or UDS_ALLOW_GID"
            )
        await error_response(403, message)(scope, receive, send)


def _forwarded(scope: Scope) -> dict[str, dict[str, int] | None] | None:
    """``{"peer": user, or None if malformed or repeated}`` when the request names a user behind a
    proxy, else None. A repeated header is refused: the record keeps one, so the check must too."""
    values = [value for name, value in scope["headers"] if name == FORWARDED_HEADER]
    if not values:
        return None
    return {"peer": parse_forwarded_peer(values[0]) if len(values) == 1 else None}
