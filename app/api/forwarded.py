"""The ``Uds-Forwarded-Peer`` request header: who is behind a proxy on the socket.

``uds-client proxy`` identifies the user who opened each TCP connection and tells the server with
``Uds-Forwarded-Peer: uid=U gid=G pid=P`` (``pid=0`` and ``gid=-1`` when it could not see them).
It is a claim made by the process on the socket, not a credential: the server records it beside
that process's own SO_PEERCRED (``peer.forwarded_for``), so whoever made the claim is known too.
Over TCP (no peer credentials) the header is ignored.

An ``Idempotency-Key`` belongs to the peer uid that sent it, and behind a proxy to the caller it
names too (:func:`key_owner`): two callers of one proxy never share keys, and a peer that forges
the header reaches only keys scoped under its own uid.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["HEADER", "key_owner", "parse_forwarded_peer", "with_forwarded"]

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


def key_owner(peer: dict[str, Any]) -> str:
    """Whose Idempotency-Keys a request uses: ``"U"`` for peer uid U, ``"U>F"`` when U names caller F.

    The proxy's uid stays in the scope: any peer may send the header, so a caller's keys are only
    as trusted as the proxy that names it, and no other peer can reach them.
    """
    forwarded = peer.get("forwarded_for")
    if forwarded is None:
        return str(peer["uid"])
    return f"{peer['uid']}>{forwarded['uid']}"
