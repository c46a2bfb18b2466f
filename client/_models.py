"""Typed results of the API: frozen dataclasses built from the server's JSON (stdlib only);
``from_json`` raises ``TypeError``, ``KeyError`` or ``ValueError`` for JSON of the wrong shape."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from client._errors import ClientError


def _object(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"expected {what} (a JSON object), got {type(data).__name__}")
    return data


@dataclass(frozen=True, slots=True)
class Peer:
    """The SO_PEERCRED credentials of a message's sender; ``forwarded_for`` the user that
    ``uds-client proxy`` admitted (``pid`` 0 and ``gid`` -1 when it could not see them)."""

    pid: int
    uid: int
    gid: int
    forwarded_for: Peer | None = None

    @classmethod
    def from_json(cls, data: Any) -> Peer:
        data = _object(data, "peer credentials")
        forwarded = data.get("forwarded_for")
        behind = None if forwarded is None else cls.from_json(forwarded)
        return cls(pid=int(data["pid"]), uid=int(data["uid"]), gid=int(data["gid"]), forwarded_for=behind)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"pid": self.pid, "uid": self.uid, "gid": self.gid}
        if self.forwarded_for is not None:
            data["forwarded_for"] = self.forwarded_for.to_json()
        return data


@dataclass(frozen=True, slots=True)
class Message:
    """A message the server stored, with its reply; ``peer`` is ``None`` over TCP."""

    id: int
    text: str
    reply: str
    received_at: datetime
    peer: Peer | None

    @classmethod
    def from_json(cls, data: Any) -> Message:
        data = _object(data, "a message")
        peer = data.get("peer")
        return cls(
            id=int(data["id"]),
            text=str(data["text"]),
            reply=str(data["reply"]),
            received_at=datetime.fromisoformat(str(data["received_at"])),
            peer=Peer.from_json(peer) if isinstance(peer, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        """The message as the server spells it (``received_at`` in RFC 3339 UTC)."""
        at = self.received_at.isoformat().replace("+00:00", "Z")
        peer = None if self.peer is None else self.peer.to_json()
        return {"id": self.id, "text": self.text, "reply": self.reply, "received_at": at, "peer": peer}


@dataclass(frozen=True, slots=True)
class Health:
    """The answer of ``/healthz`` or ``/readyz``: ``ok`` is False while the server drains."""

    status: str
    ok: bool

    @classmethod
    def from_json(cls, data: Any, http_status: int) -> Health:
        status = _object(data, "a health status").get("status")
        if not isinstance(status, str):
            status = str(data.get("error") or "unavailable")
        return cls(status=status, ok=http_status == 200)


_COMPONENTS = ("app", "python", "uvicorn", "fastapi")


@dataclass(frozen=True, slots=True)
class Version:
    """Versions of the server and its main components; ``extra`` keeps any other fields."""

    app: str
    python: str
    uvicorn: str
    fastapi: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Any) -> Version:
        data = _object(data, "versions")
        missing = [name for name in _COMPONENTS if not isinstance(data.get(name), str)]
        if missing:
            raise KeyError(f"no version string for {', '.join(missing)}")
        extra = {k: v for k, v in data.items() if k not in _COMPONENTS}
        return cls(**{name: data[name] for name in _COMPONENTS}, extra=extra)


@dataclass(frozen=True, slots=True)
class WhoAmI:
    """The caller as the server sees it (``GET /whoami``; ids None over TCP) and the scopes it holds
    (``read``, ``write``, ``events``, ``metrics``). Through ``uds-client proxy``, the ids are the
    proxy's, ``forwarded_for`` the user it speaks for, and both scope lists what both hold."""

    uid: int | None
    gid: int | None
    pid: int | None
    groups: tuple[int, ...]
    scopes: tuple[str, ...]
    forwarded_for: Peer | None = None
    forwarded_scopes: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> WhoAmI:
        data = _object(data, "an identity")
        forwarded = data.get("forwarded_for")
        ids = {name: None if data.get(name) is None else int(data[name]) for name in ("uid", "gid", "pid")}
        return cls(
            **ids,
            groups=tuple(int(group) for group in data.get("groups") or ()),
            scopes=tuple(str(scope) for scope in data["scopes"]),
            forwarded_for=None if forwarded is None else Peer.from_json(forwarded),
            forwarded_scopes=tuple(str(s) for s in (forwarded or {}).get("scopes") or ()),
        )

    def to_json(self) -> dict[str, Any]:
        forwarded: dict[str, Any] | None = None
        if self.forwarded_for is not None:
            forwarded = {**self.forwarded_for.to_json(), "scopes": list(self.forwarded_scopes)}
        ids = {"uid": self.uid, "gid": self.gid, "pid": self.pid, "groups": list(self.groups)}
        return {**ids, "scopes": list(self.scopes), "forwarded_for": forwarded}


@dataclass(frozen=True, slots=True)
class RawResponse:
    """The undecoded answer of :meth:`Client.get`: status, headers (lower-case names) and body."""

    status: int
    headers: dict[str, str]
    content: bytes

    @property
    def ok(self) -> bool:
        return self.status < 400

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of ``GET /events``: ``event`` is ``message`` or ``reset``, ``data`` its JSON text,
    ``id`` the message's, or for ``reset`` the one the stream goes on after (the oldest message
    kept is ``id + 1``: list the messages again, some were missed)."""

    event: str
    id: int | None
    data: str

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def message(self) -> Message | None:
        """The stored message of a ``message`` event (None for other events)."""
        if self.event != "message":
            return None
        try:
            return Message.from_json(self.json())
        except (TypeError, KeyError, ValueError) as exc:
            raise ClientError(f"event {self.id} is not a message: {self.data[:200]!r}") from exc
