"""The API commands of ``uds-client`` and how they print: one line per item, text from the server
with its control characters escaped (docs/internals.md, "Client"). Standard library only at the top."""

from __future__ import annotations

import argparse
import os
import sys

from client._errors import APIError, ClientError, UsageError
from client.address import to_url

# Not typing.TYPE_CHECKING: importing typing costs every probe; mypy honours this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from client._client import Client

# What can move the cursor, rewrite a line or reorder it: C0, DEL, C1, line separators, bidi overrides.
_CONTROLS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROLS}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
# For JSON output: json.dumps escapes C0 already; the rest become \u escapes, still valid JSON.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _CONTROLS if code >= 0x20}


def _clean(text: str) -> str:
    """``text`` on one line, with every control character spelled as an escape."""
    return text.translate(_ESCAPES)


def _error(text: str) -> None:
    print(f"Error: {_clean(text)}", file=sys.stderr, flush=True)


def _client(args: argparse.Namespace) -> Client:
    from client._client import Client

    return Client(args.socket, timeout=args.timeout)


def _dumps(data: object) -> str:
    import json

    return json.dumps(data, indent=2, ensure_ascii=False).translate(_JSON_ESCAPES)


def _api_error(args: argparse.Namespace, exc: APIError) -> str:
    return f"{to_url(args.socket)} answered {exc.status}: {exc.message}"


def _peer(peer: Any) -> str:
    return "tcp" if peer is None else f"pid={peer.pid} uid={peer.uid} gid={peer.gid}"


def cmd_send(args: argparse.Namespace) -> int:
    """Send TEXT once; with --every keep sending, with --then-wait stay idle, until SIGTERM/SIGINT."""
    import signal
    import threading

    stop = threading.Event()
    keep = args.every is not None or args.then_wait
    if keep:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())

    def send_once(client: Client) -> None:
        message = client.send(args.text)
        line = _dumps(message.to_json()) if args.json else f"📥 Client received: {_clean(message.reply)}"
        print(line, flush=True)

    with _client(args) as client:
        send_once(client)
        # --then-wait: wait(None) returns only once a signal set the event.
        while keep and not stop.wait(args.every):
            try:
                send_once(client)
            except ClientError as exc:  # keep the container alive while the server restarts
                _error(_api_error(args, exc) if isinstance(exc, APIError) else str(exc))
    return 0


def cmd_messages(args: argparse.Namespace) -> int:
    """Print the most recent messages, oldest first."""
    with _client(args) as client:
        messages = client.messages(args.limit)
    if args.json:
        print(_dumps({"messages": [m.to_json() for m in messages]}))
        return 0
    for m in messages:
        print(f"#{m.id} {m.to_json()['received_at']} {_peer(m.peer)}: {_clean(m.text)}")
    return 0


def _event_line(event: Any, as_json: bool) -> str:
    """One line for an event of ``GET /events``, like ``docker events``."""
    import json

    data = event.json()
    if as_json:
        doc = {"event": event.event, "id": event.id, "data": data}
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).translate(_JSON_ESCAPES)
    message = event.message
    if message is not None:
        at = message.to_json()["received_at"]
        return f"{at} message #{message.id} {_peer(message.peer)}: {_clean(message.text)}"
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    detail = data.get("message", "") if isinstance(data, dict) else data
    return f"{now} {_clean(event.event)}: {_clean(str(detail))}"


def cmd_events(args: argparse.Namespace) -> int:
    """Print events as they come, one line each, until Ctrl-C or SIGTERM (exit 0)."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops it like Ctrl-C
    try:
        with _client(args) as client:
            for event in client.events(args.since):
                print(_event_line(event, args.json), flush=True)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader (| head) went away: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    """Print the server's versions."""
    with _client(args) as client:
        v = client.version()
    fields = {"app": v.app, "python": v.python, "uvicorn": v.uvicorn, "fastapi": v.fastapi, **v.extra}
    if args.json:
        print(_dumps(fields))
        return 0
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        print(f"{_clean(name):<{width}}  {_clean(str(value))}")
    return 0


def cmd_whoami(args: argparse.Namespace) -> int:
    """Print who the server sees calling and the scopes it holds."""
    with _client(args) as client:
        me = client.whoami()
    if args.json:
        print(_dumps(me.to_json()))
        return 0
    ids = "none (not a Unix socket connection)" if me.uid is None else f"{me.uid} gid {me.gid} pid {me.pid}"
    print(f"uid     {ids}")
    print(f"groups  {' '.join(map(str, me.groups)) or '-'}")
    if me.forwarded_for is not None:
        user = me.forwarded_for
        theirs = _clean(", ".join(me.forwarded_scopes)) or "nothing"
        print(f"behind  uid {user.uid} gid {user.gid} pid {user.pid}, holding {theirs}")
    print(f"scopes  {_clean(', '.join(me.scopes)) or 'none'}")
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    """Print the OpenAPI spec, or write it to --output."""
    with _client(args) as client:
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
    """GET PATH and print the body as it came."""
    with _client(args) as client:
        raw = client.get(args.path)
    body = raw.text
    sys.stdout.write(body if body.endswith("\n") or not body else body + "\n")
    if raw.ok:
        return 0
    try:
        message = str(raw.json().get("message") or "")
    except (ValueError, AttributeError):
        message = ""
    _error(
        f"{to_url(args.socket)} answered {raw.status} for GET {args.path}"
        + (f": {message}" if message else "")
    )
    return 1


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when healthy (ready with --ready), 1 when the server says otherwise, 3 if unreachable."""
    from client.wait import probe

    target = "/readyz" if args.ready else "/healthz"
    status, body = probe(args.socket, target, timeout=args.timeout)
    if status == 200:
        return 0
    detail = body.decode("utf-8", "replace").strip()[:200]
    state = "ready" if args.ready else "healthy"
    _error(f"{to_url(args.socket)} is not {state}: {target} answered {status} {detail}")
    return 1
