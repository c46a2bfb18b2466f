"""The project's JSON error shape, as a body and as a whole HTTP/1.1 response."""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any


def error_body(status: int, error: str, message: str, details: Any = None) -> bytes:
    """``{"error", "message", "status"[, "details"]}`` as compact JSON."""
    shape: dict[str, Any] = {"error": error, "message": message, "status": status}
    if details is not None:
        shape["details"] = details
    return json.dumps(shape, separators=(",", ":"), ensure_ascii=False).encode()


def error_response(
    status: int, error: str, message: str, *, headers: Iterable[tuple[str, str]] = (), head_only: bool = False
) -> bytes:
    """:func:`error_body` in a whole response, ``headers`` after its own (``head_only``: no body)."""
    body = error_body(status, error, message)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json"]
    lines += [f"content-length: {len(body)}", *(f"{name}: {value}" for name, value in headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
