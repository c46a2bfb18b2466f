"""``uds-server`` (also ``python -m app``): the only code that reads argv.

Exit codes: 0 clean stop, 2 bad usage or setting, 3 startup failure (uvicorn's STARTUP_FAILURE).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from app import __version__
from app.config import ENV, Settings, SettingsError

__all__ = ["build_parser", "main"]

USAGE_ERROR = 2

# (field, help, metavar); the flag is the field with dashes, the env var and default come from config.
_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("socket", "socket to serve: unix:///abs/path, unix:/abs/path, /abs/path, http+unix://%%2F...",
     "ADDRESS"),
    ("host", "serve TCP on this host instead of the socket (debugging, benchmarks); needs --port", "HOST"),
    ("port", "serve TCP on this port instead of the socket (0 picks a free port)", "PORT"),
    ("socket_mode", "octal permissions of the socket; keep 0600 at least", "MODE"),
    ("socket_group", "group (name or gid) that owns the socket, for clients in other containers", "GROUP"),
    ("allow_uid", "only peers with this uid may call the API (repeatable; SO_PEERCRED)", "UID"),
    ("allow_gid", "only peers with this gid may call the API (repeatable; SO_PEERCRED)", "GID"),
    ("log_level", "critical, error, warning, info or debug", "LEVEL"),
    ("log_format", "text (demo lines bare, for kubectl logs) or json (one object per line)", "FORMAT"),
    ("max_text_length", "longest message text, in characters", "N"),
    ("max_body_bytes", "largest request body, in bytes", "BYTES"),
    ("history_size", "messages kept in memory", "N"),
    ("idempotency_keys", "Idempotency-Key values remembered", "N"),
    ("shutdown_timeout", "seconds in-flight requests get to finish after SIGTERM (below Kubernetes' 30)",
     "SECONDS"),
    ("keepalive_timeout", "seconds an idle keep-alive connection stays open", "SECONDS"),
    ("request_timeout", "seconds a client has to send a whole request before it gets 408", "SECONDS"),
    ("send_timeout", "seconds a response may make no write progress before the connection is closed",
     "SECONDS"),
    ("max_connections", "concurrent connections; past it new requests get 503 (keep below the fd limit, "
     "which the server raises to its hard limit at start)", "N"),
    ("reply", "the reply text sent with every stored message", "TEXT"),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``uds-server`` argument parser; every value stays a string until Settings checks it."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="uds-server",
        description="Serve the uds-example REST API on a Unix domain socket. "
        "Each option falls back to its environment variable, then to its default.",
        epilog="Exit codes: 0 clean stop, 2 bad usage, 3 cannot start (socket in use, path, permission).",
    )
    for field, text, metavar in _OPTIONS:
        default = _show_default(field, getattr(defaults, field))
        flag = "--" + field.replace("_", "-")
        repeat = field.startswith("allow_")
        parser.add_argument(
            flag, dest=field, metavar=metavar, action="append" if repeat else "store", default=None,
            help=f"{text} [env {ENV[field]}; default {default}]",
        )
    parser.add_argument(
        "--access-log", dest="access_log", action=argparse.BooleanOptionalAction, default=None,
        help=f"log one line per request (costs speed) [env {ENV['access_log']}; default off]",
    )
    parser.add_argument(
        "--debug", dest="debug", action="store_true", default=None,
        help=f"log tracebacks (never sent to clients) [env {ENV['debug']}; default off]",
    )
    parser.add_argument("--version", action="version", version=f"uds-server {__version__}")
    return parser


def _show_default(field: str, value: object) -> str:
    if field == "socket":
        return "unix://" + str(value)
    if field == "socket_mode" and isinstance(value, int):
        return f"{value:04o}"
    if value is None:
        return "the process's group" if field == "socket_group" else "unset"
    if value == ():
        return "anyone who can open the socket"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, build Settings (flag > env > default), configure logging, serve."""
    args = build_parser().parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if value is not None}
    try:
        settings = Settings.from_env(os.environ, **flags)
    except SettingsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return USAGE_ERROR

    from app.logs import configure
    from app.server import run

    configure(settings.log_level, settings.log_format, debug=settings.debug, access_log=settings.access_log)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
