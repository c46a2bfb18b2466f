"""The API commands of ``uds-client`` and how they print: one line per item, text from the server
with its control characters escaped (docs/internals.md, "Client"). Standard library only at the top."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from client._errors import APIError, ClientError, UsageError
from client.address import to_url

# Not typing.TYPE_CHECKING: importing typing costs every probe; mypy honours this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from client._client import Client

# What can move the cursor, rewrite a line or reorder it: C0, DEL, C1, line separators, bidi overrides.
_CONTROLS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROLS}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
# For JSON output: json.dumps escapes C0 already; the rest become \u escapes, still valid JSON.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _CONTROLS if code >= 0x20}


def clean(text: str) -> str:
    """``text`` on one line, with every control character spelled as an escape."""
    return text.translate(_ESCAPES)


def error_line(error: str | ClientError, address: str = "") -> None:
    """One ``Error:`` line on stderr; the server's answer named with the socket's ``address``."""
    if isinstance(error, APIError):
        error = f"{to_url(address)} answered {error.status}: {error.message}"
    print(f"Error: {clean(str(error))}", file=sys.stderr, flush=True)


def client_for(args: argparse.Namespace) -> Client:
    from client._client import Client

    return Client(args.socket, timeout=args.timeout)


def _dumps(data: object, indent: int | None = 2) -> str:
    import json

    compact = None if indent else (",", ":")
    return json.dumps(data, indent=indent, ensure_ascii=False, separators=compact).translate(_JSON_ESCAPES)


def _show(as_json: bool, data: object, lines: Iterable[str]) -> int:
    for line in [_dumps(data)] if as_json else lines:
        print(line)
    return 0


def _peer(peer: Any) -> str:
    return "tcp" if peer is None else f"pid={peer.pid} uid={peer.uid} gid={peer.gid}"


def cmd_send(args: argparse.Namespace) -> int:
    import signal
    import threading

    stop = threading.Event()
    keep = args.every is not None or args.then_wait
    if keep:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    def send_once(client: Client) -> None:
        message = client.send(args.text)
        line = _dumps(message.to_json()) if args.json else f"📥 Client received: {clean(message.reply)}"
        print(line, flush=True)

    with client_for(args) as client:
        send_once(client)
        # --then-wait: wait(None) returns only once a signal set the event.
        while keep and not stop.wait(args.every):
            try:
                send_once(client)
            except ClientError as exc:  # keep the container alive while the server restarts
                error_line(exc, args.socket)
    return 0


def cmd_messages(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        messages = client.messages(args.limit)
    lines = (f"#{m.id} {m.to_json()['received_at']} {_peer(m.peer)}: {clean(m.text)}" for m in messages)
    return _show(args.json, {"messages": [m.to_json() for m in messages]}, lines)


def _event_line(event: Any, as_json: bool) -> str:
    """One line for an event of ``GET /events``, like ``docker events``."""
    data = event.json()
    if as_json:
        return _dumps({"event": event.event, "id": event.id, "data": data}, indent=None)
    message = event.message
    if message is not None:
        at = message.to_json()["received_at"]
        return f"{at} message #{message.id} {_peer(message.peer)}: {clean(message.text)}"
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    detail = data.get("message", "") if isinstance(data, dict) else data
    return f"{now} {clean(event.event)}: {clean(str(detail))}"


def cmd_events(args: argparse.Namespace) -> int:
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops it like Ctrl-C
    try:
        with client_for(args) as client:
            for event in client.events(args.since):
                print(_event_line(event, args.json), flush=True)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader (| head) went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        v = client.version()
    fields = {"app": v.app, "python": v.python, "uvicorn": v.uvicorn, "fastapi": v.fastapi, **v.extra}
    width = max(len(name) for name in fields)
    lines = (f"{clean(name):<{width}}  {clean(str(value))}" for name, value in fields.items())
    return _show(args.json, fields, lines)


def cmd_whoami(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        me = client.whoami()
    ids = "none (not a Unix socket connection)" if me.uid is None else f"{me.uid} gid {me.gid} pid {me.pid}"
    lines = [f"uid     {ids}", f"groups  {' '.join(map(str, me.groups)) or '-'}"]
    if me.forwarded_for is not None:
        user = me.forwarded_for
        theirs = clean(", ".join(me.forwarded_scopes)) or "nothing"
        lines.append(f"behind  uid {user.uid} gid {user.gid} pid {user.pid}, holding {theirs}")
    lines.append(f"scopes  {clean(', '.join(me.scopes)) or 'none'}")
    return _show(args.json, me.to_json(), lines)


def cmd_openapi(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        text = _dumps(client.openapi()) + "\n"
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {args.output}: {exc.strerror or exc}") from exc
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        raw = client.get(args.path)
    body = raw.text
    sys.stdout.write(body if body.endswith("\n") or not body else body + "\n")
    if raw.ok:
        return 0
    error = f"{to_url(args.socket)} answered {raw.status} for GET {args.path}"
    with contextlib.suppress(ValueError, AttributeError):  # a body that is not the JSON error shape
        if message := raw.json().get("message"):
            error += f": {message}"
    error_line(error)
    return 1


def cmd_health(args: argparse.Namespace) -> int:
    from client.wait import probe

    target = "/readyz" if args.ready else "/healthz"
    status, body = probe(args.socket, target, timeout=args.timeout)
    if status == 200:
        return 0
    detail = body.decode("utf-8", "replace").strip()[:200]
    state = "ready" if args.ready else "healthy"
    error_line(f"{to_url(args.socket)} is not {state}: {target} answered {status} {detail}")
    return 1
