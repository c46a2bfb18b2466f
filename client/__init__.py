"""uds-example client: a typed library and the uds-client command for a Unix-socket REST server.
Names load on first use (PEP 562), so the lean ``uds-client health`` probe imports no httpx2."""

from __future__ import annotations

import importlib

from client._errors import UsageError
from client.address import DEFAULT_ADDRESS, AddressError, parse_address, resolve_socket

# Not typing.TYPE_CHECKING: ``uds-client health`` should not import typing; mypy honours this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from client._client import AsyncClient, Client
    from client._errors import APIError, ClientError, ConnectError, WaitTimeout
    from client._events import Event
    from client._models import Health, Message, Peer, RawResponse, Version, WhoAmI
    from client._probe import probe
    from client.wait import wait_for_socket

__all__ = [
    "DEFAULT_ADDRESS",
    "APIError",
    "AddressError",
    "AsyncClient",
    "Client",
    "ClientError",
    "ConnectError",
    "Event",
    "Health",
    "Message",
    "Peer",
    "RawResponse",
    "UsageError",
    "Version",
    "WaitTimeout",
    "WhoAmI",
    "parse_address",
    "probe",
    "resolve_socket",
    "wait_for_socket",
]

_LAZY = {
    "_client": ("AsyncClient", "Client"),
    "_errors": ("APIError", "ClientError", "ConnectError", "WaitTimeout"),
    "_events": ("Event",),
    "_models": ("Health", "Message", "Peer", "RawResponse", "Version", "WhoAmI"),
    "_probe": ("probe",),
    "wait": ("wait_for_socket",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"client.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
