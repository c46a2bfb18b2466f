"""``uds-client``'s entry point: options, dispatch, exit codes (0 ok, 1 the server answered an
error, 2 usage, 3 cannot reach the socket) and one error line on stderr (``--debug`` adds tracebacks
and a log line per request). Standard library only at the top, for the ``health`` probe."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from client._errors import ClientError, UsageError
from client.address import DEFAULT_ADDRESS, ENV_VAR, resolve_socket, to_url
from client.cli import _commands
from client.cli._commands import clean, error_line

PROG = "uds-client"


def _number(
    parse: Callable[[str], float], what: str, fits: Callable[[float], bool], bound: str
) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not fits(value):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return convert


_positive_float = _number(float, "a number of seconds", lambda v: v > 0, "greater than 0")
_non_negative_float = _number(float, "a number of seconds", lambda v: v >= 0, "0 or more")
_positive_int = _number(lambda t: int(t, 10), "a whole number", lambda v: v >= 1, "at least 1")
_id = _number(lambda t: int(t, 10), "a message id", lambda v: v >= 0, "0 or more")


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, learning the width as shutil does without importing it (lzma, bz2)."""

    def __init__(self, prog: str) -> None:
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdecimal() else 0
        if width <= 0:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                width = os.get_terminal_size(sys.__stdout__.fileno() if sys.__stdout__ else 1).columns
        super().__init__(prog, width=(width or 80) - 2)


class _VersionAction(argparse.Action):
    """``--version``: read the installed version only when asked (importlib.metadata is not free)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from importlib.metadata import PackageNotFoundError, version

        number = "unknown (not installed)"
        for distribution in ("uds-example-client", "uds-example"):  # the project's wins if installed
            with contextlib.suppress(PackageNotFoundError):
                number = version(distribution)
        print(f"{PROG} {number}")
        parser.exit(0)


def _builtin(name: str, sub: argparse.ArgumentParser) -> None:
    """The options of command ``name`` of this module (added only when argv names it: argparse is slow)."""
    if name == "send":
        sub.add_argument("text", metavar="TEXT", help="the message text")
        keep = sub.add_mutually_exclusive_group()
        every = "after the first send, send again every SECONDS until SIGTERM/SIGINT"
        keep.add_argument("--every", type=_positive_float, metavar="SECONDS", help=every)
        idle = "after the send, stay idle until SIGTERM/SIGINT (for a Pod's container)"
        keep.add_argument("--then-wait", action="store_true", help=idle)
    elif name == "messages":
        sub.add_argument("--limit", type=_positive_int, metavar="N", help="at most N messages")
    elif name == "events":
        since = "first print the messages after message ID still kept"
        sub.add_argument("--since", type=_id, metavar="ID", help=since)
    elif name == "openapi":
        sub.add_argument("--output", "-o", metavar="FILE", help="write the spec to FILE")
    elif name == "get":
        sub.add_argument("path", metavar="PATH", help="request path, e.g. /messages?limit=3")
    elif name == "health":
        sub.add_argument("--ready", action="store_true", help="check readiness (/readyz) instead")
    if name in ("send", "messages", "events", "version", "whoami"):
        as_json = {"send": "print the stored message as JSON", "events": "print one JSON object per line"}
        sub.add_argument("--json", action="store_true", help=as_json.get(name, "print JSON"))
    sub.set_defaults(func=getattr(_commands, f"cmd_{name}"))


def _external(module_name: str, sub: argparse.ArgumentParser) -> None:
    """The options of a command whose code lives in ``module_name``, imported only now."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise UsageError(f"'{sub.prog}' is not available: module {module_name} is not installed") from exc
    module.add_arguments(sub)
    sub.set_defaults(func=module.run)


_EXTERNAL = {"proxy": "client.cli.proxy.command", "docs": "client.cli.docs_export"}
_COMMANDS = {  # name: the line in the list of commands
    "send": "send a message and print the server's reply",
    "messages": "list recent messages, oldest first",
    "events": "print messages as they are stored, like docker events",
    "version": "print the server's versions",
    "whoami": "print your uid, gid and groups as the server sees them, and the scopes you hold",
    "openapi": "print the OpenAPI spec (or write it to a file)",
    "get": "GET a path and print the raw body (exit 1 on an error status)",
    "health": "quiet health check for exec probes: exit 0 healthy, 1 unhealthy, 3 unreachable",
    "proxy": "expose the socket's API on a local TCP port (for a browser or curl)",
    "docs": "export the OpenAPI spec and offline API docs to a directory",
}
_DESCRIPTIONS = {  # the command's own --help, where it says more
    "send": "POST TEXT to /messages and print '📥 Client received: <reply>'. Each send carries a fresh "
    "Idempotency-Key, so a retry never stores it twice. To keep a container running, add --every SECONDS "
    "(send again periodically) or --then-wait (send once, then idle); both stop cleanly with exit 0 on "
    "SIGTERM or SIGINT. With them only the first send is fatal; later failures print one error line and "
    "the loop goes on.",
    "events": "Follow GET /events and print each event on one line as it comes: every message stored from "
    "now on (after message ID first, with --since), from any worker. After a server restart or a dropped "
    "stream it connects again and goes on from the last event, so nothing is missed or printed twice; a "
    "'reset' line says some messages left the history meanwhile (list them with 'messages'). Ctrl-C or "
    "SIGTERM stops it with exit 0.",
    "whoami": "GET /whoami, which needs no scope: the first thing to run after a 403.",
    "health": "GET /healthz (or /readyz with --ready) with the standard library only, for Kubernetes exec "
    "probes. Prints nothing when healthy.",
}


def _command_in(argv: Sequence[str]) -> str | None:
    """The command named in argv (the first word that is not a global option or its value)."""
    words = iter(argv)
    for word in words:
        if word in ("--socket", "--timeout", "--wait"):  # global options that take a value
            next(words, None)
        elif word == "--":
            return None
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command`` (if any) gets its options (and its module imported)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        allow_abbrev=False,
        formatter_class=_Formatter,
        description="Talk to the uds-example server over its Unix socket.",
        epilog="Exit codes: 0 ok, 1 the server answered an error, 2 usage, 3 cannot reach the socket.",
    )
    where = "server socket: unix:///path, unix:/path, a bare absolute path or "
    where += f"http+unix://%%2Fpath (default: ${ENV_VAR}, else {DEFAULT_ADDRESS})"
    parser.add_argument("--socket", metavar="ADDRESS", help=where)
    whole = "give up on a request after SECONDS, whole: connect, send and the entire answer "
    whole += "(default: %(default)g)"
    parser.add_argument("--timeout", type=_positive_float, default=5.0, metavar="SECONDS", help=whole)
    wait = "before the first request, wait up to SECONDS (backing off) for the server to accept; exit 3 if "
    wait += "it never does (default: %(default)g, no waiting)"
    parser.add_argument("--wait", type=_non_negative_float, default=0.0, metavar="SECONDS", help=wait)
    parser.add_argument("--debug", action="store_true", help="log each request and show tracebacks")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in _COMMANDS.items():
        description = _DESCRIPTIONS.get(name, help_text)
        sub = commands.add_parser(name, help=help_text, description=description, formatter_class=_Formatter)
        if name == command:
            if name in _EXTERNAL:
                _external(_EXTERNAL[name], sub)
            else:
                _builtin(name, sub)
    return parser


def _wait(args: argparse.Namespace) -> None:
    from client.wait import wait_for_socket

    said: list[str] = []  # one line, or one per attempt with --debug

    def on_retry(reason: str, delay: float) -> None:
        if not said or args.debug:
            said.append(reason)
            where = clean(to_url(args.socket))
            print(f"{PROG}: waiting up to {args.wait:g}s for {where} ({reason})", file=sys.stderr, flush=True)

    wait_for_socket(args.socket, args.wait, on_retry=on_retry)


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words
    address = ""
    try:
        args = build_parser(_command_in(words)).parse_args(words)
        if args.debug:
            import logging

            logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")  # stderr
            logging.getLogger("client").setLevel(logging.DEBUG)
        args.socket = address = resolve_socket(args.socket)
        if args.wait > 0:
            _wait(args)
        run: Callable[[argparse.Namespace], int] = args.func
        return run(args)
    except ClientError as exc:
        if debug:
            import traceback

            traceback.print_exc()
        error_line(exc, address)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
