"""``Uds-Forwarded-Peer: uid=U gid=G pid=P``: the user behind ``uds-client proxy`` (``pid=0``,
``gid=-1`` when it could not see them). A claim by the process on the socket, not a credential: it
is recorded beside that process's own SO_PEERCRED, and ignored over TCP."""

import re
from typing import Any

HEADER = b"uds-forwarded-peer"
_VALUE = re.compile(rb"uid=(\d{1,10}) gid=(-1|\d{1,10}) pid=(\d{1,10})")


def parse_forwarded_peer(value: bytes) -> dict[str, int] | None:
    """``{"uid", "gid", "pid"}`` from the header's value, or None if it is not exactly that shape."""
    match = _VALUE.fullmatch(value.strip())
    return None if match is None else dict(zip(("uid", "gid", "pid"), map(int, match.groups()), strict=True))


def key_owner(peer: dict[str, Any]) -> str:
    """Whose Idempotency-Keys a request uses: ``"U"`` for peer uid U, ``"U>F"`` when U names caller F."""
    forwarded = peer.get("forwarded_for")
    return str(peer["uid"]) if forwarded is None else f"{peer['uid']}>{forwarded['uid']}"
