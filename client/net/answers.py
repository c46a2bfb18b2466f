"""The project's JSON error shape, as a body and as a whole HTTP/1.1 response."""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

__all__ = ["error_body", "error_response"]


def error_body(status: int, error: str, message: str, details: Any = None) -> bytes:
    """``{"error", "message", "status"[, "details"]}`` as JSON bytes."""
    shape: dict[str, Any] = {"error": error, "message": message, "status": status}
    if details is not None:
        shape["details"] = details
    return json.dumps(shape, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(
    status: int, error: str, message: str, *, headers: Iterable[tuple[str, str]] = (), head_only: bool = False
) -> bytes:
    """A whole HTTP/1.1 response carrying :func:`error_body`, with ``headers`` (such as
    ``("connection", "close")``) after its content headers; ``head_only``: without the body
    (the answer to a HEAD request)."""
    body = error_body(status, error, message)
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
