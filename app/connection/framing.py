"""What the protocol refuses in a request's framing (RFC 9112), and the error each refusal answers."""

from __future__ import annotations

import re

Refusal = tuple[int, str, str]  # status, error code, message

MAX_HEADERS = 100  # header fields in a request, and trailer fields after a chunked body (gunicorn's)
MAX_HEADER_BYTES = 32 * 1024  # request line and headers, and trailer section (nginx's)

HEAD_TOO_LARGE = (431, "headers_too_large", f"the request head is over {MAX_HEADER_BYTES} bytes")
TOO_MANY_HEADERS = (431, "headers_too_large", f"the request has more than {MAX_HEADERS} header fields")
TRAILERS_TOO_LARGE = (431, "headers_too_large", f"the trailer fields are over {MAX_HEADER_BYTES} bytes")
TOO_MANY_TRAILERS = (431, "headers_too_large", f"the request has more than {MAX_HEADERS} trailer fields")
CODING = (
    501,
    "not_implemented",
    "the only transfer coding accepted is chunked; send Transfer-Encoding: chunked or Content-Length",
)
NO_HOST = (400, "bad_request", "the request has no Host header; HTTP/1.1 requires one (Host: localhost)")
HOSTS = (400, "bad_request", "the request has more than one Host header; send exactly one")
BAD_HOST = (400, "bad_request", "the Host header is not a valid host[:port]; send Host: localhost")
FULL = (503, "unavailable", "the server is at its connection limit; try again shortly")
HELD_FULL = (
    503,
    "unavailable",
    "too much pipelined input is waiting on the server; wait for the answers before sending more",
)
BODIES_FULL = (
    503,
    "unavailable",
    "the server is receiving too many request bodies at once (from your uid or in all); try again shortly",
)
# RFC 3986 ``host [":" port]``: an IP literal, an IPv4 address or a reg-name (possibly empty).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def check_host(host: bytes | None, hosts: int, http_version: str) -> Refusal | None:
    """Exactly one valid ``Host`` (HTTP/1.0 may omit it), else the refusal."""
    if hosts > 1:
        return HOSTS
    if host is None:
        return None if http_version == "1.0" else NO_HOST
    return None if _HOST.fullmatch(host) else BAD_HOST


def parse_refusal(exc: Exception) -> Refusal:
    """The answer to an httptools parse error."""
    reason = str(exc).replace("`", "")
    if "Transfer-Encoding" in reason and "Content-Length" not in reason:
        return CODING
    return (400, "bad_request", f"the request is not valid HTTP/1.1 ({reason or type(exc).__name__})")
