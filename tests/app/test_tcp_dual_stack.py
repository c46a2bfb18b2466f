"""uds-server --host :: keeps the system's dual-stack default: IPv4 clients reach it too."""

from __future__ import annotations

import socket

from app.serving import sockets


def test_an_ipv6_wildcard_listener_takes_ipv4_clients_as_the_system_does() -> None:
    with open("/proc/sys/net/ipv6/bindv6only") as f:
        system_v6only = int(f.read())
    bound = sockets.bind_tcp("::", 0)
    try:
        assert bound.sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == system_v6only
        port = bound.sock.getsockname()[1]
        if not system_v6only:  # the Linux default: an IPv4 client reaches [::] as ::ffff:127.0.0.1
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
    finally:
        bound.close()
