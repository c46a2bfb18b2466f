"""Parse the socket address shared by the server and the client (stdlib only).

Accepted spellings, like ``DOCKER_HOST`` and the libraries that talk to it:

* a bare absolute path: ``/csi/csi.sock``
* ``unix:///csi/csi.sock`` (and the lax ``unix:/csi/csi.sock``, ``unix://csi/csi.sock`` is rejected
  because ``csi`` would be a host name)
* ``http+unix://%2Fcsi%2Fcsi.sock`` (requests-unixsocket, docker-py), with an optional path suffix
  that is ignored

Anything else raises :class:`AddressError`, quoting the value.
"""

from __future__ import annotations

import os
from urllib.parse import unquote

__all__ = ["DEFAULT_ADDRESS", "ENV_VAR", "MAX_PATH_BYTES", "AddressError", "parse_address", "to_url"]

DEFAULT_ADDRESS = "unix:///csi/csi.sock"
ENV_VAR = "UDS_SOCKET"
# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_PATH_BYTES = 107


class AddressError(ValueError):
    """The socket address is not one we understand."""


def parse_address(value: str) -> str:
    """Return the absolute socket path named by ``value``.

    >>> parse_address("unix:///csi/csi.sock")
    '/csi/csi.sock'
    >>> parse_address("http+unix://%2Fcsi%2Fcsi.sock")
    '/csi/csi.sock'
    """
    raw = value.strip()
    if not raw:
        raise AddressError("invalid socket address '': expected unix:///path/to.sock or an absolute path")
    path: str
    if raw.startswith("http+unix://"):
        rest = raw[len("http+unix://") :]
        host, _, _ = rest.partition("/")
        path = unquote(host)
    elif raw.startswith("unix://"):
        path = raw[len("unix://") :]
        if not path.startswith("/"):
            raise AddressError(
                f"invalid socket address {value!r}: unix:// needs an absolute path, as in unix:///csi/csi.sock"
            )
    elif raw.startswith("unix:"):
        path = raw[len("unix:") :]
    elif "://" in raw:
        scheme = raw.split("://", 1)[0]
        raise AddressError(
            f"invalid socket address {value!r}: scheme {scheme!r} is not supported; use unix:///path/to.sock"
        )
    else:
        path = raw
    if not path.startswith("/"):
        raise AddressError(f"invalid socket address {value!r}: the socket path must be absolute")
    if "\x00" in path:
        raise AddressError(f"invalid socket address {value!r}: the path contains a NUL byte")
    path = os.path.normpath(path)
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise AddressError(
            f"invalid socket address {value!r}: the path is {size} bytes, "
            f"AF_UNIX allows at most {MAX_PATH_BYTES}; use a shorter path"
        )
    return path


def to_url(path: str) -> str:
    """Spell a socket path the canonical way, ``unix:///...``."""
    return "unix://" + path
