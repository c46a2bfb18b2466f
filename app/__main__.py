"""``uds-server`` (also ``python -m app``): the only code that reads argv. Exit codes: 0 clean stop,
2 bad usage or setting, 3 startup failure or the socket file removed or replaced while serving."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from app import __version__
from app.config import Settings, SettingsError, flag, options


def build_parser() -> argparse.ArgumentParser:
    """One option per ``Settings`` field, raw (None when not given) until ``Settings`` checks it."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="uds-server",
        description="Serve the uds-example REST API on a Unix domain socket. "
        "Each option falls back to its environment variable, then to its default.",
        epilog="Exit codes: 0 clean stop, 2 bad usage (a bad --policy file or --audit-log too), "
        "3 cannot start (socket in use, path, permission, "
        "a socket passed by systemd that is not a listening Unix stream socket) "
        "or the socket file was removed or replaced while serving. "
        "Under systemd it serves the socket passed in LISTEN_FDS and notifies NOTIFY_SOCKET.",
    )
    for name, option in options():
        default = option.shown or _show(getattr(defaults, name))
        text = f"{option.help} [env {option.env}; default {default}]".replace("%", "%%")
        action: str | type[argparse.Action] = "append" if option.repeat else "store"
        if option.metavar is None:  # an on/off switch
            action = argparse.BooleanOptionalAction
        parser.add_argument(flag(name), dest=name, metavar=option.metavar, help=text, action=action)
    parser.add_argument("--version", action="version", version=f"uds-server {__version__}")
    return parser


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return "unset" if value is None else str(value)


def parse_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """The flags in ``argv`` over ``environ`` over the defaults; SettingsError for a bad value."""
    return Settings.from_env(environ, **vars(build_parser().parse_args(argv)))


def check_files(settings: Settings) -> None:
    """Read the policy file and open the audit log once: a bad one stops the start with exit 2."""
    from app.api.audit import AuditError, open_audit_file  # the server imports both anyway
    from app.api.policy import PolicyError, load_policy

    try:
        if settings.policy is not None:
            load_policy(settings.policy)
        if settings.audit_log is not None and settings.audit_log != "-":
            os.close(open_audit_file(settings.audit_log))
    except (PolicyError, AuditError) as exc:
        raise SettingsError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, build Settings (flag > env > default), configure logging, serve."""
    # A reload asked for while the server starts must not kill it: ignored until run() handles it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        settings = parse_settings(argv)
        check_files(settings)
    except SettingsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2  # bad usage

    from app.logs import configure
    from app.serving.run import run

    configure(settings.log_level, settings.log_format, debug=settings.debug, access_log=settings.access_log)
    return run(settings)


if __name__ == "__main__":
    sys.exit(main())
