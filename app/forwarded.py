"""The ``Uds-Forwarded-Peer`` request header: who is behind a proxy on the socket.

``uds-client proxy`` identifies the user who opened each TCP connection and tells the server with
``Uds-Forwarded-Peer: uid=U gid=G pid=P`` (``pid=0`` and ``gid=-1`` when it could not see them).
It is a claim made by the process on the socket, not a credential: the server records it beside
that process's own SO_PEERCRED (``peer.forwarded_for``), so whoever made the claim is known too.
Over TCP (no peer credentials) the header is ignored.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["HEADER", "parse_forwarded_peer", "with_forwarded"]

HEADER = b"uds-forwarded-peer"
_VALUE = re.compile(rb"uid=(\d{1,10}) gid=(-1|\d{1,10}) pid=(\d{1,10})")


def parse_forwarded_peer(value: bytes) -> dict[str, int] | None:
    """``{"uid", "gid", "pid"}`` from the header's value, or None if it is not exactly that shape."""
    match = _VALUE.fullmatch(value.strip())
    if match is None:
        return None
    uid, gid, pid = (int(group) for group in match.groups())
    return {"uid": uid, "gid": gid, "pid": pid}


def with_forwarded(peer: dict[str, int], value: bytes) -> dict[str, Any] | None:
    """``peer`` with ``forwarded_for`` added from the header's value; None if it is malformed."""
    forwarded = parse_forwarded_peer(value)
    if forwarded is None:
        return None
    return {**peer, "forwarded_for": forwarded}
