"""Server settings: one object, filled from CLI flag > environment variable > default.

``Settings.from_env(environ)`` reads the environment (a mapping, so tests pass a dict);
``app.__main__`` overlays the flags the user gave. Nothing here reads ``os.environ`` at import.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from client._address import ENV_VAR, parse_address

__all__ = ["ENV", "Settings", "SettingsError"]


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting and the value."""


# Field name -> environment variable. The CLI flag is the field name with dashes.
ENV: dict[str, str] = {
    "socket": ENV_VAR,
    "host": "UDS_HOST",
    "port": "UDS_PORT",
    "socket_mode": "UDS_SOCKET_MODE",
    "socket_group": "UDS_SOCKET_GROUP",
    "allow_uid": "UDS_ALLOW_UID",
    "allow_gid": "UDS_ALLOW_GID",
    "log_level": "UDS_LOG_LEVEL",
    "log_format": "UDS_LOG_FORMAT",
    "access_log": "UDS_ACCESS_LOG",
    "max_text_length": "UDS_MAX_TEXT_LENGTH",
    "max_body_bytes": "UDS_MAX_BODY_BYTES",
    "history_size": "UDS_HISTORY_SIZE",
    "idempotency_keys": "UDS_IDEMPOTENCY_KEYS",
    "shutdown_timeout": "UDS_SHUTDOWN_TIMEOUT",
    "keepalive_timeout": "UDS_KEEPALIVE_TIMEOUT",
    "request_timeout": "UDS_REQUEST_TIMEOUT",
    "send_timeout": "UDS_SEND_TIMEOUT",
    "max_connections": "UDS_MAX_CONNECTIONS",
    "reply": "UDS_REPLY",
    "debug": "UDS_DEBUG",
}

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told. Defaults are the production defaults."""

    socket: str = "/csi/csi.sock"
    """Absolute socket path (already parsed from ``unix:///...`` or a bare path)."""
    host: str | None = None
    """Serve TCP on this host instead of the socket (debugging, benchmarks)."""
    port: int | None = None
    socket_mode: int = 0o660
    socket_group: int | None = None
    """Group id the socket is chowned to; ``None`` keeps the process's group."""
    allow_uid: tuple[int, ...] = ()
    """Peers allowed to call the API; empty means anyone who can open the socket."""
    allow_gid: tuple[int, ...] = ()
    log_level: str = "info"
    log_format: str = "text"
    access_log: bool = False
    max_text_length: int = 4096
    max_body_bytes: int = 64 * 1024
    history_size: int = 1000
    idempotency_keys: int = 10_000
    shutdown_timeout: float = 20.0
    keepalive_timeout: float = 15.0
    """Server keep-alive; the client keeps idle connections for less than this."""
    request_timeout: float = 30.0
    """A client that has not sent a whole request (headers and body) by then is cut off."""
    send_timeout: float = 30.0
    """A response that makes no write progress for this long closes the connection."""
    max_connections: int = 4096
    """Concurrent connections; past it new requests get 503. Kept below the fd limit."""
    reply: str = "Hello from server via UDS"
    debug: bool = False
    """Log tracebacks (never sent to clients)."""

    @property
    def uses_tcp(self) -> bool:
        return self.port is not None

    @property
    def address(self) -> str:
        """Where the server listens, as a person reads it."""
        if self.uses_tcp:
            return f"http://{self.host or '127.0.0.1'}:{self.port}"
        return self.socket

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``), then ``overrides`` (CLI flags).

        ``overrides`` whose value is ``None`` are ignored, so a CLI can pass every flag as given.
        Raw string values (from the environment or flags) are converted and checked here.
        """
        env = os.environ if environ is None else environ
        raw: dict[str, object] = {}
        for name, var in ENV.items():
            if var in env and env[var] != "":
                raw[name] = env[var]
        for name, value in overrides.items():
            if name not in ENV:
                raise TypeError(f"unknown setting {name!r}")
            if value is not None and value != ():
                raw[name] = value
        values: dict[str, object] = {}
        for name, value in raw.items():
            values[name] = _convert(name, value)
        if ("host" in values) and "port" not in values:
            raise SettingsError("--host needs --port (UDS_PORT) to serve TCP")
        return cls(**values)  # type: ignore[arg-type]


def _label(name: str) -> str:
    return f"--{name.replace('_', '-')} ({ENV[name]})"


def _convert(name: str, value: object) -> object:
    try:
        return _CONVERTERS.get(name, _as_str)(value)
    except (TypeError, ValueError, KeyError) as exc:
        detail = f": {exc}" if str(exc) else ""
        raise SettingsError(f"invalid value {value!r} for {_label(name)}{detail}") from exc


def _as_str(value: object) -> str:
    return str(value)


def _as_socket(value: object) -> str:
    return parse_address(str(value))


def _positive_int(value: object) -> int:
    number = int(str(value), 10) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _port(value: object) -> int:
    number = int(str(value), 10)
    if not 0 <= number <= 65535:
        raise ValueError("must be 0..65535")
    return number


def _positive_float(value: object) -> float:
    number = float(str(value))
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _mode(value: object) -> int:
    mode = value if isinstance(value, int) else int(str(value), 8)
    if not 0 <= mode <= 0o777:
        raise ValueError("must be an octal mode like 660")
    if mode & 0o600 != 0o600:
        raise ValueError("the owner needs read and write (0600) to serve the socket")
    return mode


def _group(value: object) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group named {text!r}") from None


def _ids(value: object) -> tuple[int, ...]:
    if isinstance(value, str):
        parts: list[object] = [p for p in value.replace(",", " ").split() if p]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)  # type: ignore[call-overload]
    ids = tuple(int(str(p), 10) for p in parts)
    if any(i < 0 for i in ids):
        raise ValueError("ids are not negative")
    return ids


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = str(value).lower()
        if text not in options:
            raise ValueError(f"choose one of {', '.join(options)}")
        return text

    return convert


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("use true or false")


_CONVERTERS: dict[str, Callable[[object], object]] = {
    "socket": _as_socket,
    "port": _port,
    "socket_mode": _mode,
    "socket_group": _group,
    "allow_uid": _ids,
    "allow_gid": _ids,
    "log_level": _choice(LOG_LEVELS),
    "log_format": _choice(LOG_FORMATS),
    "access_log": _bool,
    "debug": _bool,
    "max_text_length": _positive_int,
    "max_body_bytes": _positive_int,
    "history_size": _positive_int,
    "idempotency_keys": _positive_int,
    "shutdown_timeout": _positive_float,
    "keepalive_timeout": _positive_float,
    "request_timeout": _positive_float,
    "send_timeout": _positive_float,
    "max_connections": _positive_int,
}
