"""The socket address shared by the server and the client (stdlib only), like ``DOCKER_HOST``: a bare
absolute path, ``unix:///path`` (and the lax ``unix:/path``, not ``unix://csi/x``: ``csi`` is a host)
or ``http+unix://%2Fpath``; anything else is an :class:`AddressError` saying what to write instead."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import unquote

from client._errors import UsageError

DEFAULT_ADDRESS = "unix:///csi/csi.sock"
ENV_VAR = "UDS_SOCKET"
# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_PATH_BYTES = 107

_EXPECTED = "expected unix:///path/to.sock or an absolute path"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_TCP = {"tcp", "http", "https"}


class AddressError(UsageError, ValueError):
    """The socket address is not one we understand (a ValueError too, for settings parsers)."""


def resolve_socket(socket: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The socket path: ``socket`` if given, else ``$UDS_SOCKET``, else ``unix:///csi/csi.sock``;
    :class:`AddressError` quoting a value that is not a socket address."""
    env = os.environ if environ is None else environ
    return parse_address(socket if socket is not None else (env.get(ENV_VAR) or DEFAULT_ADDRESS))


def parse_address(value: str) -> str:
    """The absolute socket path ``value`` names."""

    def bad(reason: str) -> AddressError:
        return AddressError(f"invalid socket address {value!r}: {reason}")

    raw = value.strip()
    if not raw:
        raise bad(_EXPECTED)
    if "\x00" in raw:
        raise bad("it contains a NUL byte")
    name, sep, path = raw.partition(":")
    scheme = name.lower() if sep else ""
    if scheme == "http+unix":
        if not path.startswith("//"):
            raise bad(
                "http+unix needs the percent-encoded path as the host, as in http+unix://%2Fcsi%2Fcsi.sock"
            )
        host = path[2:].partition("/")[0].partition("?")[0].partition("#")[0]
        if not host:
            raise bad("http+unix:// names no socket; encode the path as in http+unix://%2Fcsi%2Fcsi.sock")
        try:
            path = unquote(host, errors="strict")
        except UnicodeDecodeError:
            raise bad("the percent-encoding is not valid UTF-8") from None
        if "\x00" in path:
            raise bad("the decoded path contains a NUL byte")
        if not path.startswith("/"):
            raise bad(f"the decoded path {path!r} is not absolute; encode the leading slash as %2F")
    elif scheme == "unix":
        if path == "//":
            raise bad("unix:// names no socket; write unix:///path/to.sock")
        if path.startswith("//") and not path.startswith("///"):
            host = path[2:].partition("/")[0]
            raise bad(
                f"{host!r} would be a host name; unix:// needs three slashes before an absolute path, "
                "as in unix:///csi/csi.sock"
            )
        if path.startswith("///"):
            path = path[2:]
    elif path.startswith("//") and _SCHEME.fullmatch(name):
        hint = " (to reach the socket over TCP, run uds-client proxy)" if scheme in _TCP else ""
        raise bad(f"scheme {name!r} is not supported; use unix:///path/to.sock{hint}")
    else:
        path = raw
    if not path.startswith("/"):
        raise bad(f"the socket path must be absolute; {_EXPECTED}")
    # Only repeated slashes and "." go: ".." stays, as a directory on the way may be a link.
    directory, path = (path.endswith("/"), "/" + "/".join(p for p in path.split("/") if p not in ("", ".")))
    if directory or path == "/":
        raise bad("the path names a directory; add the socket's file name, as in /csi/csi.sock")
    try:
        size = len(os.fsencode(path))
    except UnicodeEncodeError:
        raise bad("the path cannot be encoded for the file system") from None
    if size > MAX_PATH_BYTES:
        raise bad(f"the path is {size} bytes, AF_UNIX allows at most {MAX_PATH_BYTES}; use a shorter path")
    return path


def to_url(path: str) -> str:
    return "unix://" + path
