"""``Uds-Forwarded-Peer: uid=U gid=G pid=P``: the user behind ``uds-client proxy`` (``pid=0``,
``gid=-1`` when it could not see them). A claim by the process on the socket, not a credential: it
is recorded beside that process's own SO_PEERCRED, and ignored over TCP.
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
    return None if forwarded is None else {**peer, "forwarded_for": forwarded}


def key_owner(peer: dict[str, Any]) -> str:
    """Whose Idempotency-Keys a request uses: ``"U"`` for peer uid U, ``"U>F"`` when U names caller F.
    Any peer may send the header, so a forger reaches only keys scoped under its own uid."""
    forwarded = peer.get("forwarded_for")
    return str(peer["uid"]) if forwarded is None else f"{peer['uid']}>{forwarded['uid']}"
