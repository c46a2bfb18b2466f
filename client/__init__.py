"""uds-example client: a typed library and the uds-client command for a Unix-socket REST server.

Names load on first use (PEP 562), so ``import client`` stays free of httpx2 for the lean
``uds-client health`` probe. :func:`resolve_socket` lives here, the one place both the library and
that probe reach without importing the HTTP stack.
"""

from __future__ import annotations

import importlib
import os

from client._address import DEFAULT_ADDRESS, ENV_VAR, AddressError, parse_address
from client._errors import UsageError

# Not typing.TYPE_CHECKING: ``uds-client health`` should not import typing; mypy honours this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from client._client import AsyncClient, Client
    from client._errors import APIError, ClientError, ConnectError, WaitTimeout
    from client._models import Health, Message, Peer, RawResponse, Version
    from client._probe import probe
    from client._wait import wait_for_socket

__all__ = [
    "DEFAULT_ADDRESS",
    "APIError",
    "AddressError",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectError",
    "Health",
    "Message",
    "Peer",
    "RawResponse",
    "UsageError",
    "Version",
    "WaitTimeout",
    "parse_address",
    "probe",
    "resolve_socket",
    "wait_for_socket",
]

_WHERE = {
    "AsyncClient": "_client", "Client": "_client",
    "APIError": "_errors", "ClientError": "_errors", "ConnectError": "_errors", "WaitTimeout": "_errors",
    "Health": "_models", "Message": "_models", "Peer": "_models", "RawResponse": "_models",
    "Version": "_models",
    "probe": "_probe", "wait_for_socket": "_wait",
}


def resolve_socket(socket: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The socket path: ``socket`` if given, else ``$UDS_SOCKET``, else ``unix:///csi/csi.sock``.

    Raises :class:`UsageError` quoting a value that is not a socket address.
    """
    env = os.environ if environ is None else environ
    value = socket if socket is not None else (env.get(ENV_VAR) or DEFAULT_ADDRESS)
    try:
        return parse_address(value)
    except AddressError as exc:
        raise UsageError(str(exc)) from exc


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"client.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
