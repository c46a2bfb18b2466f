"""Server settings, each declared once as a ``Settings`` field whose ``Option`` makes its flag
(``--socket-mode``) and environment variable (``UDS_SOCKET_MODE``): flag > environment > default.
Standard library only (why: docs/internals.md)."""

from __future__ import annotations

import grp
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from client.address import parse_address

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
LOG_FORMATS = ("text", "json")
STORES = ("sqlite", "memory")
DURABILITIES = ("normal", "full")
N = TypeVar("N", int, float)


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the setting and the value."""


# Conversions: a raw value (a string from the environment or a flag, or a typed value from code) to
# the typed value, or ValueError saying what is expected.


def _number(kind: Callable[[str], N], ok: Callable[[N], bool], expected: str) -> Callable[[object], N]:
    def convert(value: object) -> N:
        number = kind(str(value))
        if not ok(number):
            raise ValueError(expected)
        return number

    return convert


_port = _number(int, lambda n: 0 <= n <= 65535, "must be 0..65535")


def _mode(value: object) -> int:
    mode = value if isinstance(value, int) else int(str(value), 8)
    if not 0 <= mode <= 0o777:
        raise ValueError("must be an octal mode like 660")
    if mode & 0o600 != 0o600:
        raise ValueError("the owner needs read and write (0600) to serve the socket")
    return mode


def _group(value: object) -> int:
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ValueError(f"no group named {text!r}") from None


def _ids(value: object) -> tuple[int, ...]:
    parts = str(value).replace(",", " ").split() if isinstance(value, str | int) else value
    ids = tuple(int(str(p), 10) for p in parts)  # type: ignore[attr-defined]
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
    """How one setting is read: its flag's help and metavar (None: an on/off switch), the conversion,
    whether the flag repeats, the default as ``--help`` shows it, the environment variable."""

    help: str
    metavar: str | None = None
    convert: Callable[[object], object] = str
    repeat: bool = False
    shown: str | None = None
    env: str = ""


def _setting(default: Any, *args: Any, **kwargs: Any) -> Any:
    return field(default=default, metadata={"option": Option(*args, **kwargs)})


def _count(default: int, help: str, metavar: str = "N") -> Any:
    return _setting(default, help, metavar, _number(int, lambda n: n >= 1, "must be at least 1"))


def _seconds(default: float, help: str) -> Any:
    return _setting(default, help, "SECONDS", _number(float, lambda n: n > 0, "must be greater than 0"))


def _one_of(choices: tuple[str, ...], help: str, metavar: str, default: str = "") -> Any:
    return _setting(default or choices[0], help, metavar, _choice(choices))


def _allow(kind: str, metavar: str) -> Any:
    help = f"only peers with this {kind} may call the API, with every scope (repeatable; SO_PEERCRED; "
    help += "beside --policy, its rules are added)"
    return _setting((), help, metavar, _ids, repeat=True, shown="anyone who can open the socket")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the server can be told. Defaults are the production defaults."""

    socket: str = _setting(
        "/csi/csi.sock",
        "socket to serve: unix:///abs/path, unix:/abs/path, /abs/path, http+unix://%2F...",
        "ADDRESS",
        lambda value: parse_address(str(value)),
        shown="unix:///csi/csi.sock",
    )
    host: str | None = _setting(
        None, "serve TCP on this host instead of the socket (debugging, benchmarks); needs --port", "HOST"
    )
    port: int | None = _setting(
        None, "serve TCP on this port instead of the socket (0 picks a free port)", "PORT", _port
    )
    socket_mode: int = _setting(
        0o660, "octal permissions of the socket; keep 0600 at least", "MODE", _mode, shown="0660"
    )
    socket_group: int | None = _setting(
        None,
        "group (name or gid) that owns the socket, for clients in other containers",
        "GROUP",
        _group,
        shown="the process's group",
    )
    allow_uid: tuple[int, ...] = _allow("uid", "UID")
    allow_gid: tuple[int, ...] = _allow("gid", "GID")
    log_level: str = _one_of(LOG_LEVELS, "critical, error, warning, info or debug", "LEVEL", "info")
    log_format: str = _one_of(
        LOG_FORMATS, "text (demo lines bare, for kubectl logs) or json (one object per line)", "FORMAT"
    )
    access_log: bool = _setting(False, "log one line per request (costs speed)", None, _bool)
    max_text_length: int = _count(4096, "longest message text, in characters")
    max_body_bytes: int = _count(64 * 1024, "largest request body, in bytes", "BYTES")
    history_size: int = _count(1000, "messages kept; older ones are pruned (ids are never reused)")
    idempotency_keys: int = _count(10_000, "Idempotency-Key values remembered")
    store: str = _one_of(
        STORES, "sqlite (durable, in --data-dir) or memory (lost when the process stops)", "KIND"
    )
    data_dir: str = _setting(
        "/var/lib/uds-example", "directory of the durable store (created if missing)", "DIR"
    )
    data_dir_private: bool = _setting(
        False,
        "accept a --data-dir that other uids could write in by its mode, because only this "
        "server can reach it (an emptyDir mounted into its container alone)",
        None,
        _bool,
    )
    durability: str = _one_of(
        DURABILITIES,
        "normal (acknowledged messages survive a crash of the process) or full (they also "
        "survive a power cut: every commit is flushed to disk, which costs throughput)",
        "LEVEL",
    )
    workers: int = _count(1, "worker processes serving the one socket (more than 1 needs --store sqlite)")
    max_streams: int = _count(
        100, "event streams (GET /v1/events) open at once, per server; the next one gets 503"
    )
    metrics_listen: str | None = _setting(
        None,
        "also serve /metrics (and nothing else) over TCP on HOST:PORT, for Prometheus",
        "HOST:PORT",
        _listen,
        shown="off",
    )
    metrics_uid: tuple[int, ...] = _setting(
        (),
        "count this peer uid's requests in its own series of uds_peer_requests_total (repeatable, "
        'up to 32); the others count as uid="other"',
        "UID",
        _shown_uids,
        repeat=True,
        shown="none",
    )
    shutdown_timeout: float = _seconds(
        20.0, "seconds in-flight requests get to finish after SIGTERM (below Kubernetes' 30)"
    )
    keepalive_timeout: float = _seconds(15.0, "seconds an idle keep-alive connection stays open")
    request_timeout: float = _seconds(
        30.0, "seconds a client has to send a whole request (head and body) before it gets 408"
    )
    send_timeout: float = _seconds(
        30.0,
        "seconds a response may make no write progress (a client that does not read) "
        "before the connection is closed",
    )
    max_connections: int = _count(
        512,
        "concurrent connections. At the cap the longest-idle connection is closed for a new "
        "one, else the oldest still sending a request after 2 s; when all are busy the newcomer "
        "gets 503. Sized for the 100 MiB memory budget; kept below the open-file limit, which the "
        "server raises to its hard limit at start",
    )
    reply: str = _setting(
        "Hello from server via UDS", "the reply text sent with every stored message", "TEXT"
    )
    debug: bool = _setting(False, "log tracebacks (never sent to clients)", None, _bool)
    policy: str | None = _setting(
        None,
        "TOML file of rules granting scopes (read, write, events, metrics) by uid, gid, "
        "user or group; anything not granted gets 403. SIGHUP re-reads it",
        "FILE",
        shown="none (every peer holds every scope, unless --allow-uid/--allow-gid)",
    )
    audit_log: str | None = _setting(
        None,
        "append a JSON line for every write and every refusal to FILE (created 0600, "
        "reopened on SIGHUP), or - for standard error",
        "FILE",
        shown="off",
    )

    @property
    def uses_tcp(self) -> bool:
        return self.port is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """``overrides`` (CLI flags; None or an empty repeat: not given) over ``environ`` (default
        ``os.environ``) over the defaults; a bad value raises SettingsError naming both sources."""
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
            if raw is None:
                continue
            try:
                values[name] = option.convert(raw)
            except (TypeError, ValueError, KeyError) as exc:
                detail = f": {exc}" if str(exc) else ""
                raise SettingsError(f"invalid value {raw!r} for {flag(name)} ({option.env}){detail}") from exc
        if "host" in values and "port" not in values:
            raise SettingsError(f"--host needs --port ({known['port'].env}) to serve TCP")
        if values.get("workers", 1) != 1 and values.get("store") == "memory":
            raise SettingsError(
                f"--workers {values['workers']} needs --store sqlite ({known['store'].env}): with --store "
                "memory each worker process would keep its own messages and keys"
            )
        return cls(**values)  # type: ignore[arg-type]


def options() -> Iterator[tuple[str, Option]]:
    for item in fields(Settings):
        yield item.name, replace(item.metadata["option"], env=f"UDS_{item.name.upper()}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")
