"""``uds-client``: talk to the server on its Unix socket, like ``docker`` talks to docker.sock.

The only module of the client that prints or exits. Exit codes: 0 ok, 1 the server answered an
error, 2 usage, 3 cannot reach the socket. Errors are one line on stderr; ``--debug`` adds the
traceback and one log line per request. Text from the server is printed with its control characters
escaped (``\r``, ESC, ...), so it cannot move the cursor or rewrite the terminal.

The top level imports the standard library only: ``health`` answers through ``client._probe``
without httpx2, and the other commands import ``Client`` when they run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from client._errors import APIError, ClientError
from client.address import DEFAULT_ADDRESS, ENV_VAR, resolve_socket, to_url

# Not typing.TYPE_CHECKING: importing typing costs ~2 ms on every probe; mypy honours this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from client._client import Client

__all__ = ["main"]

PROG = "uds-client"
# Global options that take a value: skipped when looking for the command name in argv.
_VALUE_OPTIONS = ("--socket", "--timeout", "--wait")
# Commands whose code lives in its own module, imported only when argv names the command.
_EXTERNAL = {
    "proxy": ("client.cli.proxy", "expose the socket's API on a local TCP port (for a browser or curl)"),
    "docs": ("client.cli.docs_export", "export the OpenAPI spec and offline API docs to a directory"),
}


# C0 controls, DEL, C1 controls, line separators and the bidirectional overrides: what can move the
# cursor, rewrite a line or reorder it on a terminal.
_CONTROLS = (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_ESCAPES = {code: f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" for code in _CONTROLS}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"})
# The same for JSON output: json.dumps escapes C0 already; the rest become \u escapes, still valid JSON.
_JSON_ESCAPES = {code: f"\\u{code:04x}" for code in _CONTROLS if code >= 0x20}


def _clean(text: str) -> str:
    """``text`` on one line, with every control character spelled as an escape."""
    return text.translate(_ESCAPES)


def _error(text: str) -> None:
    print(f"Error: {_clean(text)}", file=sys.stderr, flush=True)


class _Exit(Exception):
    """Leave with ``code`` after printing ``message`` (local failures, not the server's)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _id(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a message id, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _terminal_columns() -> int:
    """What ``shutil.get_terminal_size`` answers, without importing shutil (and lzma, bz2)."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno() if sys.__stdout__ else 1).columns
        except (AttributeError, ValueError, OSError):
            columns = 80
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter; it only learns the width more cheaply (``health`` runs often)."""

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(
            prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width
        )


class _VersionAction(argparse.Action):
    """``--version``: read the installed version only when asked (importlib.metadata is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        from importlib.metadata import PackageNotFoundError, version

        number = "unknown (not installed)"
        for distribution in ("uds-example", "uds-example-client"):  # the project, or the client alone
            try:
                number = version(distribution)
                break
            except PackageNotFoundError:
                continue
        print(f"{PROG} {number}")
        parser.exit(0)


# --- the library, loaded on demand -------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    from client._client import Client

    return Client(args.socket, timeout=args.timeout)


def _dumps(data: object) -> str:
    import json

    return json.dumps(data, indent=2, ensure_ascii=False).translate(_JSON_ESCAPES)


def _api_error(args: argparse.Namespace, exc: APIError) -> str:
    return f"{to_url(args.socket)} answered {exc.status}: {exc.message}"


# --- commands -----------------------------------------------------------------------------------


def _send_once(client: Client, args: argparse.Namespace) -> None:
    message = client.send(args.text)
    if args.json:
        print(_dumps(message.to_json()), flush=True)
    else:
        print(f"📥 Client received: {_clean(message.reply)}", flush=True)


def cmd_send(args: argparse.Namespace) -> int:
    """Send TEXT once; with --every keep sending, with --then-wait stay idle, until SIGTERM/SIGINT."""
    import signal
    import threading
    from types import FrameType

    stop = threading.Event()
    if args.every is not None or args.then_wait:

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    with _client(args) as client:
        _send_once(client, args)
        if args.every is None and not args.then_wait:
            return 0
        # --then-wait: wait(None) returns only once a signal set the event.
        while not stop.wait(args.every):
            try:
                _send_once(client, args)
            except ClientError as exc:
                # Keep the container alive while the server restarts: report and try again later.
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
        peer = "tcp" if m.peer is None else f"pid={m.peer.pid} uid={m.peer.uid} gid={m.peer.gid}"
        print(f"#{m.id} {m.to_json()['received_at']} {peer}: {_clean(m.text)}")
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
        p = message.peer
        peer = "tcp" if p is None else f"pid={p.pid} uid={p.uid} gid={p.gid}"
        at = message.to_json()["received_at"]
        return f"{at} message #{message.id} {peer}: {_clean(message.text)}"
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
        return 0
    except BrokenPipeError:  # the reader (| head) went away: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    """Print the server's versions."""
    with _client(args) as client:
        version = client.version()
    fields: dict[str, Any] = {
        "app": version.app,
        "python": version.python,
        "uvicorn": version.uvicorn,
        "fastapi": version.fastapi,
        **version.extra,
    }
    if args.json:
        print(_dumps(fields))
    else:
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

    def ids(uid: int | None, gid: int | None, pid: int | None) -> str:
        return "none (not a Unix socket connection)" if uid is None else f"{uid} gid {gid} pid {pid}"

    print(f"uid     {ids(me.uid, me.gid, me.pid)}")
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
        raise _Exit(f"cannot write {args.output}: {exc.strerror or exc}", 2) from exc
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
    from client._probe import probe

    target = "/readyz" if args.ready else "/healthz"
    status, body = probe(args.socket, target, timeout=args.timeout)
    if status == 200:
        return 0
    detail = body.decode("utf-8", "replace").strip()[:200]
    _error(
        f"{to_url(args.socket)} is not {'ready' if args.ready else 'healthy'}: "
        f"{target} answered {status} {detail}"
    )
    return 1


# --- parser ---------------------------------------------------------------------------------------


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is not a global option or its value)."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in _VALUE_OPTIONS:
            skip = True
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word
    return None


def _load_external(name: str) -> ModuleType:
    module_name = _EXTERNAL[name][0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise _Exit(f"'{PROG} {name}' is not available: module {module_name} is not installed", 2) from exc


# Each command's options are only added when argv names it: argparse is slow to add arguments,
# and ``health`` runs every few seconds.


def _build_send(send: argparse.ArgumentParser) -> None:
    send.add_argument("text", metavar="TEXT", help="the message text")
    send.add_argument("--json", action="store_true", help="print the stored message as JSON")
    keep = send.add_mutually_exclusive_group()
    keep.add_argument(
        "--every",
        type=_positive_float,
        metavar="SECONDS",
        help="after the first send, send again every SECONDS until SIGTERM/SIGINT",
    )
    keep.add_argument(
        "--then-wait",
        action="store_true",
        help="after the send, stay idle until SIGTERM/SIGINT (for a Pod's container)",
    )
    send.set_defaults(func=cmd_send)


def _build_messages(messages: argparse.ArgumentParser) -> None:
    messages.add_argument("--limit", type=_positive_int, metavar="N", help="at most N messages")
    messages.add_argument("--json", action="store_true", help="print JSON")
    messages.set_defaults(func=cmd_messages)


def _build_events(events: argparse.ArgumentParser) -> None:
    events.add_argument(
        "--since", type=_id, metavar="ID", help="first print the messages after message ID still kept"
    )
    events.add_argument("--json", action="store_true", help="print one JSON object per line")
    events.set_defaults(func=cmd_events)


def _build_version(version: argparse.ArgumentParser) -> None:
    version.add_argument("--json", action="store_true", help="print JSON")
    version.set_defaults(func=cmd_version)


def _build_whoami(whoami: argparse.ArgumentParser) -> None:
    whoami.add_argument("--json", action="store_true", help="print JSON")
    whoami.set_defaults(func=cmd_whoami)


def _build_openapi(openapi: argparse.ArgumentParser) -> None:
    openapi.add_argument("--output", "-o", metavar="FILE", help="write the spec to FILE")
    openapi.set_defaults(func=cmd_openapi)


def _build_get(get: argparse.ArgumentParser) -> None:
    get.add_argument("path", metavar="PATH", help="request path, e.g. /messages?limit=3")
    get.set_defaults(func=cmd_get)


def _build_health(health: argparse.ArgumentParser) -> None:
    health.add_argument("--ready", action="store_true", help="check readiness (/readyz) instead")
    health.set_defaults(func=cmd_health)


def _external_builder(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def build(sub: argparse.ArgumentParser) -> None:
        module = _load_external(name)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)

    return build


_SEND_DESCRIPTION = (
    "POST TEXT to /messages and print '📥 Client received: <reply>'. Each send carries a fresh "
    "Idempotency-Key, so a retry never stores it twice. To keep a container running, add --every "
    "SECONDS (send again periodically) or --then-wait (send once, then idle); both stop cleanly with "
    "exit 0 on SIGTERM or SIGINT. With them only the first send is fatal; later failures print one "
    "error line and the loop goes on."
)
_HEALTH_DESCRIPTION = (
    "GET /healthz (or /readyz with --ready) with the standard library only, for Kubernetes exec "
    "probes. Prints nothing when healthy."
)
_EVENTS_DESCRIPTION = (
    "Follow GET /events and print each event on one line as it comes: every message stored from "
    "now on (after message ID first, with --since), from any worker. After a server restart or a "
    "dropped stream it connects again and goes on from the last event, so nothing is missed or "
    "printed twice; a 'reset' line says some messages left the history meanwhile (list them with "
    "'messages'). Ctrl-C or SIGTERM stops it with exit 0."
)
# name -> (help, description, builder)
_COMMANDS: dict[str, tuple[str, str | None, Callable[[argparse.ArgumentParser], None]]] = {
    "send": ("send a message and print the server's reply", _SEND_DESCRIPTION, _build_send),
    "messages": ("list recent messages, oldest first", None, _build_messages),
    "events": ("print messages as they are stored, like docker events", _EVENTS_DESCRIPTION, _build_events),
    "version": ("print the server's versions", None, _build_version),
    "whoami": (
        "print your uid, gid and groups as the server sees them, and the scopes you hold",
        "GET /whoami, which needs no scope: the first thing to run after a 403.",
        _build_whoami,
    ),
    "openapi": ("print the OpenAPI spec (or write it to a file)", None, _build_openapi),
    "get": ("GET a path and print the raw body (exit 1 on an error status)", None, _build_get),
    "health": (
        "quiet health check for exec probes: exit 0 healthy, 1 unhealthy, 3 unreachable",
        _HEALTH_DESCRIPTION,
        _build_health,
    ),
    **{name: (help_text, None, _external_builder(name)) for name, (_, help_text) in _EXTERNAL.items()},
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only the external ``command`` (if any) has its module imported."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        formatter_class=_Formatter,
        description="Talk to the uds-example server over its Unix socket.",
        epilog="Exit codes: 0 ok, 1 the server answered an error, 2 usage, 3 cannot reach the socket.",
    )
    parser.add_argument(
        "--socket",
        metavar="ADDRESS",
        help=f"server socket: unix:///path, unix:/path, a bare absolute path or "
        f"http+unix://%%2Fpath (default: ${ENV_VAR}, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="give up on a request after SECONDS, whole: connect, send and the entire answer (default: 5)",
    )
    parser.add_argument(
        "--wait",
        type=_non_negative_float,
        default=0.0,
        metavar="SECONDS",
        help="before the first request, wait up to SECONDS (backing off) for the "
        "server to accept; exit 3 if it never does (default: 0, no waiting)",
    )
    parser.add_argument("--debug", action="store_true", help="log each request and show tracebacks")
    parser.add_argument("--version", action=_VersionAction)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for name, (help_text, description, build) in _COMMANDS.items():
        sub = commands.add_parser(
            name, help=help_text, description=description or help_text, formatter_class=_Formatter
        )
        if name == command:
            build(sub)
    return parser


def _enable_debug_logging() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("client")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _wait(args: argparse.Namespace) -> None:
    from client.wait import wait_for_socket

    reported = False

    def on_retry(reason: str, delay: float) -> None:
        nonlocal reported
        if not reported or args.debug:
            print(
                f"{PROG}: waiting up to {args.wait:g}s for {_clean(to_url(args.socket))} ({reason})",
                file=sys.stderr,
                flush=True,
            )
            reported = True

    wait_for_socket(args.socket, args.wait, on_retry=on_retry)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``uds-client``; return the exit code."""
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    try:
        parser = build_parser(_command_in(words))
        args = parser.parse_args(words)
        if args.debug:
            _enable_debug_logging()
        args.socket = resolve_socket(args.socket)
        if args.wait > 0:
            _wait(args)
        run: Callable[[argparse.Namespace], int] = args.func
        return run(args)
    except APIError as exc:
        return _fail(_api_error(args, exc), exc.exit_code, debug)
    except ClientError as exc:
        return _fail(str(exc), exc.exit_code, debug)
    except _Exit as exc:
        return _fail(str(exc), exc.code, debug)
    except KeyboardInterrupt:
        return 130


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        import traceback

        traceback.print_exc()
    _error(message)
    return code


if __name__ == "__main__":
    sys.exit(main())
