"""The one JSON error shape, ``{"error", "message", "status"[, "details"]}``, for every route.

:func:`install` routes Starlette's HTTP errors, FastAPI's validation errors and anything unexpected
through it; code that answers an error itself uses :func:`error_response`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute

from app.api.models import ErrorBody
from client.net import answers

__all__ = ["CODES", "error_body", "error_response", "error_responses", "install", "public_details"]

log = logging.getLogger("app.api.errors")

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("bad_request", "the request is malformed"),
    403: ("forbidden", "you are not allowed to use this API"),
    404: ("not_found", "no such resource; see /docs for the routes"),
    405: ("method_not_allowed", "method not allowed here; see the Allow header"),
    408: ("request_timeout", "the request took too long to arrive; send it again"),
    409: ("conflict", "this Idempotency-Key was already used with a different text; use a new key"),
    413: ("payload_too_large", "the request body is too large"),
    415: ("unsupported_media_type", "unsupported content type; send Content-Type: application/json"),
    422: ("validation_error", "the request is invalid"),
    500: ("internal_error", "internal server error; the server log has the details"),
    503: ("unavailable", "the server is not available; try again shortly"),
    507: ("insufficient_storage", "the server's disk is full; nothing was stored; retry once space is freed"),
}
"""Each error status's code and default message."""
CODES = {status: code for status, (code, _) in _ERRORS.items()}
_MESSAGES = {status: message for status, (_, message) in _ERRORS.items()}
JSON = "application/json"


def error_body(
    status: int, message: str, *, error: str | None = None, details: Sequence[Mapping[str, Any]] | None = None
) -> bytes:
    """The encoded error document; ``error`` defaults to the status's code."""
    return answers.error_body(status, error or CODES.get(status, "error"), message, details and list(details))


def error_response(
    status: int,
    message: str | None = None,
    *,
    error: str | None = None,
    details: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A ``Response`` carrying :func:`error_body` (the status's default message if none is given)."""
    text = message or _MESSAGES.get(status, "request failed")
    return Response(error_body(status, text, error=error, details=details), status, headers, JSON)


def public_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic errors reduced to ``type``, ``loc`` and ``msg`` (never the input: bodies stay private)."""
    return [
        {
            "type": str(err.get("type", "value_error")),
            "loc": [part if isinstance(part, int) else str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
        }
        for err in errors
    ]


def summarize(details: Sequence[Mapping[str, Any]]) -> str:
    """One line naming the first problem and how many more there are."""
    if not details:
        return "the request is invalid"
    first = details[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"invalid request: {where}: {first['msg']}{more}"


def _shown_path(request: Request) -> str:
    """The path as the client sent it (still percent-encoded, so it stays on one line)."""
    raw = request.scope.get("raw_path")
    if isinstance(raw, bytes):
        return raw.decode("latin-1")
    return request.url.path.encode("unicode_escape").decode("ascii")


def _allowed_methods(routes: Sequence[BaseRoute], path: str) -> str:
    """Every method some route serves at ``path`` (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in routes:
        regex = getattr(route, "path_regex", None)  # a Mount has one, a plain BaseRoute may not
        if regex is not None and regex.match(path):
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, each with the error model and an example."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        text = _MESSAGES.get(status, "request failed")
        example: dict[str, Any] = {"error": CODES.get(status, "error"), "message": text, "status": status}
        if status == 422:
            msg = "String should have at least 1 character"
            example["message"] = f"invalid request: text: {msg}"
            example["details"] = [{"type": "string_too_short", "loc": ["body", "text"], "msg": msg}]
        description = _MESSAGES.get(status, "the request is invalid")
        out[status] = {
            "model": ErrorBody,
            "description": description[:1].upper() + description[1:] + ".",
            "content": {JSON: {"example": example}},
        }
    return out


def install(app: FastAPI) -> None:
    """Route every error of ``app`` through the one JSON shape."""
    routes = app.router.routes

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status, headers = exc.status_code, exc.headers
        detail = exc.detail if isinstance(exc.detail, str) else None
        try:
            generic = detail is None or detail == HTTPStatus(status).phrase
        except ValueError:  # a status http.HTTPStatus does not name
            generic = False
        if status == 404 and generic:
            message = f"no route {_shown_path(request)}; see /docs for the routes"
            return error_response(404, message, headers=headers)
        if status == 405 and generic:
            allow = _allowed_methods(routes, request.scope["path"]) or (headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {_shown_path(request)}; allowed: {allow}"
            return error_response(405, message, headers={**(headers or {}), "Allow": allow})
        return error_response(status, None if generic else detail, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        details = public_details(exc.errors())
        code = "invalid_json" if any(d["type"] == "json_invalid" for d in details) else "validation_error"
        return error_response(422, summarize(details), error=code, details=details)

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        return error_response(500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
