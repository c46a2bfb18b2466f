"""uds-example client: a typed library and the uds-client command for a Unix-socket REST server.
Names load on first use (PEP 562), so the lean ``uds-client health`` probe imports no httpx2."""

from __future__ import annotations

import importlib

from client._errors import APIError, ClientError, ConnectError, UsageError, WaitTimeout
from client.address import DEFAULT_ADDRESS, AddressError, parse_address, resolve_socket

# Not typing.TYPE_CHECKING: ``uds-client health`` should not import typing; mypy honours this name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from client._client import AsyncClient, Client
    from client._models import Event, Health, Message, Peer, RawResponse, Version, WhoAmI
    from client.wait import probe, wait_for_socket

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
    "_models": ("Event", "Health", "Message", "Peer", "RawResponse", "Version", "WhoAmI"),
    "wait": ("probe", "wait_for_socket"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> object:
    if name not in _WHERE:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"client.{_WHERE[name]}"), name)
