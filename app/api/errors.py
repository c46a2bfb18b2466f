"""The one JSON error shape, ``{"error", "message", "status"[, "details"]}``, for every route:
:func:`install` routes Starlette's and FastAPI's errors through it; code that answers an error
itself uses :func:`error_response`."""

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute

from app.api.models import PARTS, ErrorBody, answer
from client.net import answers

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
}  # each error status's code and default message
JSON = "application/json"
_PHRASES = {status.value: status.phrase for status in HTTPStatus}


def error_response(
    status: int,
    message: str | None = None,
    *,
    error: str | None = None,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """The error document; ``error`` defaults to the status's code, ``message`` to its default."""
    code, default = _ERRORS.get(status, ("error", "request failed"))
    return Response(
        answers.error_body(status, error or code, message or default, details), status, headers, JSON
    )


def validation_error(errors: Sequence[Any], *, under: tuple[str, ...] = (), empty: bool = False) -> Response:
    """422 naming the first of pydantic's ``errors``, listing each without its input (bodies stay private)."""
    details = [{"type": err["type"], "loc": [*under, *err["loc"]], "msg": err["msg"]} for err in errors]
    first = details[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    message = f"invalid request: {where}: {first['msg']}{more}"
    invalid_json = any(detail["type"] == "json_invalid" for detail in details)
    code = "invalid_json" if invalid_json else "validation_error"
    if invalid_json and empty:
        message = 'the request body is empty; send a JSON object like {"text": "hi"}'
    return error_response(422, message, error=code, details=details)


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
        code, text = _ERRORS[status]
        example = PARTS["invalid"] if status == 422 else {"error": code, "message": text, "status": status}
        out[status] = answer(ErrorBody, example, text[:1].upper() + text[1:] + ".")
    return out


def install(app: FastAPI) -> None:
    """Route every error of ``app`` through the one JSON shape."""
    routes = app.router.routes

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        status, headers = exc.status_code, exc.headers
        detail = exc.detail if isinstance(exc.detail, str) else None
        generic = detail is None or detail == _PHRASES.get(status)
        if status == 404 and generic:
            message = f"no route {_shown_path(request)}; see /docs for the routes"
            return error_response(404, message, headers=headers)
        if status == 405 and generic:
            allow = _allowed_methods(routes, request.scope["path"]) or (headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed on {_shown_path(request)}; allowed: {allow}"
            return error_response(405, message, headers={**(headers or {}), "Allow": allow})
        return error_response(status, None if generic else detail, headers=headers)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return validation_error(exc.errors())

    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s %s: %r", request.method, request.url.path, exc)
        return error_response(500)

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)
