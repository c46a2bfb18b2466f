"""``/messages``: send a message (the hot path), list recent ones, fetch one by id.

``POST /messages`` reads, size-checks, parses (orjson) and validates its body itself and answers
with pre-encoded bytes: FastAPI's body and response-model machinery costs more than the work it
does. Its schema is still the pydantic ``MessageIn``/``Message`` in OpenAPI, and the tests prove
the hand-written checks agree with that model.
"""

# No ``from __future__ import annotations``: the route signatures refer to per-app limits in
# closures, which FastAPI must see as real objects, not strings.

import logging
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from app.config import Settings
from app.errors import error_response, error_responses, summarize
from app.forwarded import HEADER as FORWARDED_HEADER
from app.forwarded import with_forwarded
from app.models import EXAMPLE_MESSAGE, Message, MessageList, message_in_model
from app.store import MessageStore

__all__ = ["MAX_KEY_LENGTH", "LeanRoute", "build_router", "check_text_body"]

log = logging.getLogger("app.messages")

MAX_KEY_LENGTH = 255
"""Idempotency-Key values are 1..255 visible ASCII characters (bounded memory per key)."""
LOGGED_TEXT = 200
"""Longer texts are cut in the log line (logs never carry whole bodies)."""
JSON = "application/json"

_MISSING = {"type": "missing", "loc": ["body", "text"], "msg": "Field required"}
_NOT_STR = {"type": "string_type", "loc": ["body", "text"], "msg": "Input should be a valid string"}
_TOO_SHORT = {
    "type": "string_too_short", "loc": ["body", "text"], "msg": "String should have at least 1 character",
}
_EXTRA = "Extra inputs are not permitted"
_NOT_OBJECT = {"type": "model_type", "loc": ["body"], "msg": "Input should be an object"}


def check_text_body(data: object, max_length: int) -> tuple[str | None, list[dict[str, Any]]]:
    """Validate a parsed body like ``MessageIn`` does: ``(text, [])`` or ``(None, details)``."""
    if type(data) is not dict:
        return None, [_NOT_OBJECT]
    text = data.get("text", _MISSING)
    if len(data) == 1 and type(text) is str and 1 <= len(text) <= max_length:
        return text, []
    details: list[dict[str, Any]] = []
    if text is _MISSING:
        details.append(_MISSING)
    elif type(text) is not str:
        details.append(_NOT_STR)
    elif not text:
        details.append(_TOO_SHORT)
    elif len(text) > max_length:
        details.append({
            "type": "string_too_long", "loc": ["body", "text"],
            "msg": f"String should have at most {max_length} character{'s' if max_length != 1 else ''}",
        })
    for key in data:
        if key != "text":
            details.append({"type": "extra_forbidden", "loc": ["body", key], "msg": _EXTRA})
    return (text if not details and type(text) is str else None), details


_GET_IT = {"GetMessage": {
    "operationId": "get_message", "parameters": {"message_id": "$response.body#/id"},
    "description": "The `id` in the answer is the `message_id` of `GET /messages/{message_id}`.",
}}


def _json_content_type(value: bytes) -> bool:
    """``application/json`` or ``application/<anything>+json``, parameters such as charset allowed."""
    media = value.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= MAX_KEY_LENGTH and all(0x21 <= ord(c) <= 0x7E for c in key)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _shown(text: str) -> str:
    """The text as it goes into one log line: control characters escaped, long texts cut."""
    if len(text) > LOGGED_TEXT:
        text = f"{text[:LOGGED_TEXT]}… ({len(text)} characters)"
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text


def _request_schema(settings: Settings) -> dict[str, Any]:
    schema = message_in_model(settings.max_text_length).model_json_schema()
    return {
        "parameters": [{
            "name": "Idempotency-Key", "in": "header", "required": False,
            "description": (
                "Makes the request safe to retry: the first request with a key stores the message (201); "
                "a repeat with the same key and text returns that message again (200) without storing it "
                "twice; the same key with a different text is a conflict (409). The server remembers the "
                f"last {settings.idempotency_keys} keys."
            ),
            "schema": {"type": "string", "pattern": f"^[!-~]{{1,{MAX_KEY_LENGTH}}}$"},
            "example": "9f1c2b6e-0a4e-4c57-9d3c-2a1f5e7b8c90",
        }],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": schema, "example": {"text": "Hello from client"}}},
        },
    }


class LeanRoute(APIRoute):
    """An ``APIRoute`` whose endpoint takes the raw ``Request`` and returns a ``Response``.

    It is documented like any route (``openapi_extra``, ``responses``) but skips dependency
    solving and body/response models: the endpoint does its own parsing and validation.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint
        return endpoint


def build_router(settings: Settings, store: MessageStore) -> APIRouter:
    """The ``/messages`` router, bound to this app's settings and store."""
    router = APIRouter(prefix="/messages", tags=["messages"])
    max_body = settings.max_body_bytes
    max_text = settings.max_text_length
    reply = settings.reply
    default_limit = min(100, settings.history_size)

    async def create_message(request: Request) -> Response:
        """Store a message and answer with the server's reply."""
        scope = request.scope
        content_type = content_length = key_raw = forwarded_raw = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
            elif name == b"idempotency-key":
                key_raw = value
            elif name == FORWARDED_HEADER:  # set by uds-client proxy: the caller behind it
                forwarded_raw = value
        if content_type is None or not _json_content_type(content_type):
            return error_response(415, "unsupported content type; send Content-Type: application/json")
        if content_length is not None:
            if not content_length.isdigit():
                return error_response(400, "invalid Content-Length header; it must be a number of bytes")
            if int(content_length) > max_body:
                return _too_large(max_body)
        key: str | None = None
        if key_raw is not None:
            key = key_raw.decode("latin-1")
            if not _valid_key(key):
                return error_response(
                    400, f"invalid Idempotency-Key: use 1 to {MAX_KEY_LENGTH} visible ASCII characters"
                )

        receive = request.receive
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return error_response(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > max_body:
                    return _too_large(max_body)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if not body:
            return _invalid_json("the request body is empty; send a JSON object like {\"text\": \"hi\"}")
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return _invalid_json(f"the body is not valid JSON: {exc.args[0] if exc.args else exc}")
        text, details = check_text_body(data, max_text)
        if text is None:
            return error_response(422, summarize(details), error="validation_error", details=details)

        extensions = scope.get("extensions")
        peer = extensions.get("uds.peer") if extensions else None
        if forwarded_raw is not None and peer is not None:
            peer = with_forwarded(peer, forwarded_raw)
            if peer is None:
                return error_response(400, "invalid Uds-Forwarded-Peer header; send uid=U gid=G pid=P")
        if key is not None:
            earlier = store.by_key(key)
            if earlier is not None:
                if earlier["text"] != text:
                    return error_response(
                        409, "this Idempotency-Key was already used with a different text; use a new key",
                        error="idempotency_key_reused",
                    )
                return Response(orjson.dumps(earlier), 200, None, JSON)
        record = store.add(text, reply, _now(), peer, key)
        log.info("📩 Server received: %s", _shown(text), extra={"peer": peer, "message_id": record["id"]})
        return Response(orjson.dumps(record), 201, {"location": f"/messages/{record['id']}"}, JSON)

    router.add_api_route(
        "",
        create_message,
        methods=["POST"],
        route_class_override=LeanRoute,
        operation_id="create_message",
        status_code=201,
        summary="Send a message",
        description=(
            f"Stores the message (the last {settings.history_size} are kept) and answers with the "
            "server's reply and the sender's peer credentials (null over TCP). The body is JSON "
            f"(`application/json` or `application/*+json`), at most {max_body} bytes."
        ),
        response_model=None,
        openapi_extra=_request_schema(settings),
        responses={
            201: {"model": Message, "description": "Stored.", "headers": {
                "Location": {"description": "The new message's URL.", "schema": {"type": "string"}}},
                "content": {JSON: {"example": EXAMPLE_MESSAGE}}, "links": _GET_IT},
            200: {"model": Message, "description": "Already stored under this Idempotency-Key.",
                  "content": {JSON: {"example": EXAMPLE_MESSAGE}}, "links": _GET_IT},
            **error_responses(400, 403, 409, 413, 415, 422),
        },
    )

    @router.get(
        "",
        summary="List recent messages",
        operation_id="list_messages",
        description="The most recent `limit` messages still in the bounded history, oldest first.",
        response_model=None,
        responses={200: {"model": MessageList, "description": "Recent messages, oldest first."},
                   **error_responses(403, 422)},
    )
    async def list_messages(
        limit: Annotated[int, Query(
            ge=1, le=settings.history_size, description="How many of the most recent messages to return.",
        )] = default_limit,
    ) -> Response:
        """List the most recent messages, oldest first."""
        return Response(orjson.dumps({"messages": store.recent(limit)}), 200, None, JSON)

    @router.get(
        "/{message_id}",
        summary="Get one message",
        operation_id="get_message",
        description="The message with this id, while it is still in the bounded history; 404 otherwise.",
        response_model=None,
        responses={200: {"model": Message, "description": "The message.",
                         "content": {JSON: {"example": EXAMPLE_MESSAGE}}},
                   **error_responses(403, 404, 422)},
    )
    async def get_message(
        message_id: Annotated[int, Path(description="The id `POST /messages` answered with.")],
    ) -> Response:
        """Get one message by id."""
        record = store.get(message_id)
        if record is None:
            return error_response(
                404, f"no message with id {message_id} (unknown or no longer in the history)"
            )
        return Response(orjson.dumps(record), 200, None, JSON)

    return router


def _too_large(limit: int) -> Response:
    return error_response(
        413, f"the request body is larger than {limit} bytes; send a shorter text",
        headers={"connection": "close"},
    )


def _invalid_json(message: str) -> Response:
    details = [{"type": "json_invalid", "loc": ["body"], "msg": message}]
    return error_response(422, message, error="invalid_json", details=details)
