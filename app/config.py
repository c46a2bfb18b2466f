"""Server settings, each declared once: CLI flag > environment variable > default.

Every field of ``Settings`` carries its ``Option`` (environment variable, help, metavar, conversion
and check) in its dataclass metadata. ``Settings.from_env(environ, **flags)`` and the ``uds-server``
argument parser (``app.__main__``) are both generated from those fields, so adding a setting is one
entry here. Nothing here reads ``os.environ`` at import.

Why not pydantic-settings: importing it costs about 150 ms, measured on this project's machine,
against 40-60 ms for the whole ``uds-server --help``; this module needs only the standard library.
"""

from __future__ import annotations

import grp
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from client.address import ENV_VAR, parse_address

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "Option", "Settings", "SettingsError", "flag", "options"]

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
STORES = ("sqlite", "memory")
DURABILITIES = ("normal", "full")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting and the value."""


# Conversions: each takes a raw value (a string from the environment or a flag, or a typed value
# passed in by code) and returns the typed value or raises ValueError saying what is expected.


def _as_str(value: object) -> str:
    return str(value)


def _as_socket(value: object) -> str:
    return parse_address(str(value))


def _positive_int(value: object) -> int:
    number = int(value, 10) if isinstance(value, str) else int(value)  # type: ignore[call-overload]
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


def _shown_uids(value: object) -> tuple[int, ...]:
    ids = tuple(dict.fromkeys(_ids(value)))
    if len(ids) > 32:
        raise ValueError("at most 32 uids")
    return ids


def _listen(value: object) -> str:
    host, sep, port = str(value).rpartition(":")
    if not sep or not host:
        raise ValueError("use HOST:PORT, e.g. 0.0.0.0:9100 or [::]:9100")
    _port(port)
    return str(value)


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ValueError(f"choose one of {', '.join(choices)}")
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


@dataclass(frozen=True, slots=True)
class Option:
    """How one setting is given: its environment variable, its flag's help, and how a value is read.

    The flag is the field's name with dashes (``--socket-mode``).
    """

    env: str
    help: str
    metavar: str | None = None
    """None for an on/off switch (``--debug`` / ``--no-debug``)."""
    convert: Callable[[object], object] = _as_str
    """Turns a raw value into the field's type; raises ValueError saying what it expects."""
    repeat: bool = False
    """The flag may be given several times (the values are collected)."""
    shown_default: str | None = None
    """The default as ``--help`` shows it, when ``str(default)`` does not read well."""


def _setting(
    default: Any,
    *,
    env: str,
    help: str,
    metavar: str | None = None,
    convert: Callable[[object], object] = _as_str,
    repeat: bool = False,
    shown_default: str | None = None,
) -> Any:
    """A ``Settings`` field: its default, with its ``Option`` in the field's metadata."""
    option = Option(env, help, metavar, convert, repeat, shown_default)
    return field(default=default, metadata={"option": option})


_ANYONE = "anyone who can open the socket"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told. Defaults are the production defaults."""

    socket: str = _setting(
        "/csi/csi.sock",
        env=ENV_VAR,
        help="socket to serve: unix:///abs/path, unix:/abs/path, /abs/path, http+unix://%2F...",
        metavar="ADDRESS",
        convert=_as_socket,
        shown_default="unix:///csi/csi.sock",
    )
    """Absolute socket path (already parsed from ``unix:///...`` or a bare path)."""
    host: str | None = _setting(
        None,
        env="UDS_HOST",
        help="serve TCP on this host instead of the socket (debugging, benchmarks); needs --port",
        metavar="HOST",
    )
    port: int | None = _setting(
        None,
        env="UDS_PORT",
        help="serve TCP on this port instead of the socket (0 picks a free port)",
        metavar="PORT",
        convert=_port,
    )
    socket_mode: int = _setting(
        0o660,
        env="UDS_SOCKET_MODE",
        help="octal permissions of the socket; keep 0600 at least",
        metavar="MODE",
        convert=_mode,
        shown_default="0660",
    )
    socket_group: int | None = _setting(
        None,
        env="UDS_SOCKET_GROUP",
        help="group (name or gid) that owns the socket, for clients in other containers",
        metavar="GROUP",
        convert=_group,
        shown_default="the process's group",
    )
    """Group id the socket is chowned to; ``None`` keeps the process's group."""
    allow_uid: tuple[int, ...] = _setting(
        (),
        env="UDS_ALLOW_UID",
        help="only peers with this uid may call the API, with every scope (repeatable; SO_PEERCRED; "
        "beside --policy, its rules are added)",
        metavar="UID",
        convert=_ids,
        repeat=True,
        shown_default=_ANYONE,
    )
    """Peers allowed to call the API; empty (with ``allow_gid`` empty) means anyone."""
    allow_gid: tuple[int, ...] = _setting(
        (),
        env="UDS_ALLOW_GID",
        help="only peers with this gid may call the API, with every scope (repeatable; SO_PEERCRED; "
        "beside --policy, its rules are added)",
        metavar="GID",
        convert=_ids,
        repeat=True,
        shown_default=_ANYONE,
    )
    log_level: str = _setting(
        "info",
        env="UDS_LOG_LEVEL",
        help=", ".join(LOG_LEVELS[:-1]) + " or " + LOG_LEVELS[-1],
        metavar="LEVEL",
        convert=_choice(LOG_LEVELS),
    )
    log_format: str = _setting(
        "text",
        env="UDS_LOG_FORMAT",
        help="text (demo lines bare, for kubectl logs) or json (one object per line)",
        metavar="FORMAT",
        convert=_choice(LOG_FORMATS),
    )
    access_log: bool = _setting(
        False, env="UDS_ACCESS_LOG", help="log one line per request (costs speed)", convert=_bool
    )
    max_text_length: int = _setting(
        4096,
        env="UDS_MAX_TEXT_LENGTH",
        help="longest message text, in characters",
        metavar="N",
        convert=_positive_int,
    )
    max_body_bytes: int = _setting(
        64 * 1024,
        env="UDS_MAX_BODY_BYTES",
        help="largest request body, in bytes",
        metavar="BYTES",
        convert=_positive_int,
    )
    history_size: int = _setting(
        1000,
        env="UDS_HISTORY_SIZE",
        help="messages kept; older ones are pruned (ids are never reused)",
        metavar="N",
        convert=_positive_int,
    )
    idempotency_keys: int = _setting(
        10_000,
        env="UDS_IDEMPOTENCY_KEYS",
        help="Idempotency-Key values remembered",
        metavar="N",
        convert=_positive_int,
    )
    store: str = _setting(
        "sqlite",
        env="UDS_STORE",
        help="sqlite (durable, in --data-dir) or memory (lost when the process stops)",
        metavar="KIND",
        convert=_choice(STORES),
    )
    data_dir: str = _setting(
        "/var/lib/uds-example",
        env="UDS_DATA_DIR",
        help="directory of the durable store (created if missing)",
        metavar="DIR",
    )
    data_dir_private: bool = _setting(
        False,
        env="UDS_DATA_DIR_PRIVATE",
        help="accept a --data-dir that other uids could write in by its mode, because only this "
        "server can reach it (an emptyDir mounted into its container alone)",
        convert=_bool,
    )
    """Without it a data directory writable by group or others (no sticky bit) is refused: another
    uid could rename the database away. Its parents are checked either way."""
    durability: str = _setting(
        "normal",
        env="UDS_DURABILITY",
        help="normal (acknowledged messages survive a crash of the process) or full (they also "
        "survive a power cut: every commit is flushed to disk, which costs throughput)",
        metavar="LEVEL",
        convert=_choice(DURABILITIES),
    )
    workers: int = _setting(
        1,
        env="UDS_WORKERS",
        help="worker processes serving the one socket (more than 1 needs --store sqlite)",
        metavar="N",
        convert=_positive_int,
    )
    max_streams: int = _setting(
        100,
        env="UDS_MAX_STREAMS",
        help="event streams (GET /v1/events) open at once, per server; the next one gets 503",
        metavar="N",
        convert=_positive_int,
    )
    metrics_listen: str | None = _setting(
        None,
        env="UDS_METRICS_LISTEN",
        help="also serve /metrics (and nothing else) over TCP on HOST:PORT, for Prometheus",
        metavar="HOST:PORT",
        convert=_listen,
        shown_default="off",
    )
    metrics_uid: tuple[int, ...] = _setting(
        (),
        env="UDS_METRICS_UID",
        help="count this peer uid's requests in its own series of uds_peer_requests_total (repeatable, "
        'up to 32); the others count as uid="other"',
        metavar="UID",
        convert=_shown_uids,
        repeat=True,
        shown_default="none",
    )
    """Peer uids that ``/metrics`` shows by name (opt-in: anyone who reaches the metrics port sees them)."""
    shutdown_timeout: float = _setting(
        20.0,
        env="UDS_SHUTDOWN_TIMEOUT",
        help="seconds in-flight requests get to finish after SIGTERM (below Kubernetes' 30)",
        metavar="SECONDS",
        convert=_positive_float,
    )
    keepalive_timeout: float = _setting(
        15.0,
        env="UDS_KEEPALIVE_TIMEOUT",
        help="seconds an idle keep-alive connection stays open",
        metavar="SECONDS",
        convert=_positive_float,
    )
    """Server keep-alive; the client keeps idle connections for less than this."""
    request_timeout: float = _setting(
        30.0,
        env="UDS_REQUEST_TIMEOUT",
        help="seconds a client has to send a whole request (head and body) before it gets 408",
        metavar="SECONDS",
        convert=_positive_float,
    )
    send_timeout: float = _setting(
        30.0,
        env="UDS_SEND_TIMEOUT",
        help="seconds a response may make no write progress (a client that does not read) "
        "before the connection is closed",
        metavar="SECONDS",
        convert=_positive_float,
    )
    max_connections: int = _setting(
        512,
        env="UDS_MAX_CONNECTIONS",
        help="concurrent connections. At the cap the longest-idle connection is closed for a new "
        "one, else the oldest still sending a request after 2 s; when all are busy the newcomer "
        "gets 503. Sized for the 100 MiB memory budget; kept below the open-file limit, which the "
        "server raises to its hard limit at start",
        metavar="N",
        convert=_positive_int,
    )
    reply: str = _setting(
        "Hello from server via UDS",
        env="UDS_REPLY",
        help="the reply text sent with every stored message",
        metavar="TEXT",
    )
    debug: bool = _setting(
        False, env="UDS_DEBUG", help="log tracebacks (never sent to clients)", convert=_bool
    )
    policy: str | None = _setting(
        None,
        env="UDS_POLICY",
        help="TOML file of rules granting scopes (read, write, events, metrics) by uid, gid, "
        "user or group; anything not granted gets 403. SIGHUP re-reads it",
        metavar="FILE",
        shown_default="none (every peer holds every scope, unless --allow-uid/--allow-gid)",
    )
    audit_log: str | None = _setting(
        None,
        env="UDS_AUDIT_LOG",
        help="append a JSON line for every write and every refusal to FILE (created 0600, "
        "reopened on SIGHUP), or - for standard error",
        metavar="FILE",
        shown_default="off",
    )

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

        ``overrides`` whose value is ``None`` (or an empty repeat) are ignored, so a CLI can pass
        every flag as parsed. Raw values from either source are converted and checked here; an error
        names the flag, the environment variable and the value.
        """
        env = os.environ if environ is None else environ
        known = dict(options())
        unknown = overrides.keys() - known.keys()
        if unknown:
            raise TypeError(f"unknown setting {min(unknown)!r}")
        values: dict[str, object] = {}
        for name, option in known.items():
            raw = overrides.get(name)
            if raw is None or raw == () or raw == []:
                raw = env.get(option.env) or None  # an empty variable counts as unset
            if raw is not None:
                values[name] = _convert(name, option, raw)
        if "host" in values and "port" not in values:
            raise SettingsError(f"--host needs --port ({known['port'].env}) to serve TCP")
        if values.get("workers", 1) != 1 and values.get("store") == "memory":
            raise SettingsError(
                f"--workers {values['workers']} needs --store sqlite ({known['store'].env}): with --store "
                "memory each worker process would keep its own messages and keys"
            )
        return cls(**values)  # type: ignore[arg-type]


def options() -> Iterator[tuple[str, Option]]:
    """Each setting's field name and ``Option``, in declaration order."""
    for item in fields(Settings):
        yield item.name, item.metadata["option"]


def flag(name: str) -> str:
    """The CLI flag of the field ``name``."""
    return "--" + name.replace("_", "-")


def _convert(name: str, option: Option, value: object) -> object:
    try:
        return option.convert(value)
    except (TypeError, ValueError, KeyError) as exc:
        detail = f": {exc}" if str(exc) else ""
        raise SettingsError(f"invalid value {value!r} for {flag(name)} ({option.env}){detail}") from exc
