"""``/messages``: send a message (the hot path), list recent ones, fetch one by id. Bodies and long
lists draw on server-wide budgets. Why it is written this way: docs/internals.md, "API"."""

import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.responses import Response

from app.api.audit import MESSAGE_ID
from app.api.errors import JSON, error_response, error_responses, validation_error
from app.api.forwarded import HEADER as FORWARDED_HEADER
from app.api.forwarded import key_owner, parse_forwarded_peer
from app.api.models import PARTS, Message, MessageList, answer, describe, message_in_model, operation
from app.api.routes import ReleasingStream
from app.config import Settings
from app.connection.capacity import Budget
from app.connection.peer import PEER_KEY
from app.logs import escaped
from app.storage.events import PEER_SHARE
from app.storage.store import KeyConflict, Store, StoreError, StoreFull
from client.net.throttle import Throttle

log = logging.getLogger("app.messages")

MAX_KEY_LENGTH = 255  # Idempotency-Key: 1..255 visible ASCII characters (bounded memory per key)
LOGGED_TEXT = 200  # longer texts are cut in the log line
BODY_BUDGET = 8 * 1024 * 1024  # bytes that requests waiting for their bodies may hold at once, server-wide
REQUEST_COST = 24 * 1024  # what a request waiting for its body holds besides the body (scope, task, frames)
LIST_CHUNK = 16 * 1024  # ``GET /messages`` answers are written in chunks of this size (plus a message)
LIST_STREAMS = 32  # most ``GET /messages`` answers longer than one chunk being written at once, server-wide

_RETRY = {"retry-after": "1"}
_HOW_MANY = "How many of the most recent messages to return."


def _request_schema(settings: Settings) -> dict[str, Any]:
    description = describe("idempotency_key", keys=settings.idempotency_keys)
    pattern = {"type": "string", "pattern": f"^[!-~]{{1,{MAX_KEY_LENGTH}}}$"}
    key = {**PARTS["idempotency_key"], "description": description, "schema": pattern}
    body = {JSON: {"schema": message_in_model(settings.max_text_length).model_json_schema()}}
    body[JSON]["example"] = {"text": "Hello from client"}
    return {"parameters": [key], "requestBody": {"required": True, "content": body}}


class LeanRoute(APIRoute):
    """A documented route whose endpoint takes the raw ``Request``: no dependencies, no models."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint


def build_router(settings: Settings, store: Store) -> APIRouter:
    router = APIRouter(prefix="/messages", tags=["messages"])
    max_body = settings.max_body_bytes
    validate_json = message_in_model(settings.max_text_length).model_validate_json
    reply = settings.reply
    default_limit = min(100, settings.history_size)
    bodies = Budget(BODY_BUDGET, max(1, BODY_BUDGET // PEER_SHARE))
    busy_log = Throttle(log)
    store_errors = Throttle(log)
    streams = Budget(LIST_STREAMS, max(1, LIST_STREAMS // PEER_SHARE))

    async def create_message(request: Request) -> Response:
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
                if forwarded_raw is not None:
                    return error_response(400, "more than one Uds-Forwarded-Peer header; send one")
                forwarded_raw = value
        # application/json or application/<anything>+json, parameters such as charset allowed
        media = content_type.split(b";", 1)[0].strip().lower() if content_type is not None else b""
        if media != b"application/json" and not (
            media.startswith(b"application/") and media.endswith(b"+json")
        ):
            return error_response(415, "unsupported content type; send Content-Type: application/json")
        size = 0
        if content_length is not None:
            if not content_length.isdigit():
                return error_response(400, "invalid Content-Length header; it must be a number of bytes")
            size = int(content_length)
            if size > max_body:
                return _too_large(max_body)
        taken = REQUEST_COST + size
        extensions = scope.get("extensions")  # inline, not _peer(): the hot path
        peer = extensions.get(PEER_KEY) if extensions else None
        uid = peer["uid"] if peer else None
        if not bodies.take(taken, uid):
            return _busy(uid, busy_log)
        try:
            key: str | None = None
            if key_raw is not None:
                key = key_raw.decode("latin-1")
                if not 0 < len(key) <= MAX_KEY_LENGTH or not all(0x21 <= ord(c) <= 0x7E for c in key):
                    return error_response(
                        400, f"invalid Idempotency-Key: use 1 to {MAX_KEY_LENGTH} visible ASCII characters"
                    )
            receive = request.receive
            chunks: list[bytes] = []
            size = REQUEST_COST
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return error_response(400, "the client went away before sending the whole body")
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > taken:  # chunked transfer: draw on the budget as the body arrives
                        if size - REQUEST_COST > max_body:
                            return _too_large(max_body)
                        if not bodies.take(size - taken, uid):
                            return _busy(uid, busy_log)
                        taken = size
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            try:
                text: str = validate_json(body).text
            except ValidationError as exc:
                errors = exc.errors(include_url=False, include_context=False, include_input=False)
                return validation_error(errors, under=("body",), empty=not body.strip())
        finally:
            bodies.give(taken, uid)

        if forwarded_raw is not None and peer is not None:
            forwarded = parse_forwarded_peer(forwarded_raw)
            if forwarded is None:
                return error_response(400, "invalid Uds-Forwarded-Peer header; send uid=U gid=G pid=P")
            peer = {**peer, "forwarded_for": forwarded}
        if key is not None and peer is not None:
            # Keys belong to the peer uid that sent them: another uid learns nothing of the first
            key = f"{key_owner(peer)}:{key}"
        try:
            now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            stored = await store.put(text, reply, now, peer, key)
        except KeyConflict:  # the default message of 409 says what to do
            return error_response(409, error="idempotency_key_reused")
        except StoreFull as exc:
            return error_response(507, str(exc))
        except StoreError as exc:  # e.g. the file changed under the server: the transaction rolled back
            store_errors.log(logging.ERROR, "Cannot store a message: %s", escaped(str(exc)))
            return error_response(503, f"{exc}; nothing was stored")
        scope[MESSAGE_ID] = stored.id  # for the audit line
        if not stored.created:
            return Response(stored.document, 200, None, JSON)
        message_id = stored.id
        if len(text) > LOGGED_TEXT:  # logs never carry whole bodies
            text = f"{text[:LOGGED_TEXT]}… ({len(text)} characters)"
        log.info("📩 Server received: %s", escaped(text), extra={"peer": peer, "message_id": message_id})
        # Under the version it was posted to: /v1/messages/7, or /messages/7 through the alias.
        return Response(stored.document, 201, {"location": f"{scope['path']}/{message_id}"}, JSON)

    get_it, stored = PARTS["get_it"], PARTS["message"]
    responses = {
        201: answer(Message, stored, "Stored.", headers={"Location": PARTS["location"]}, links=get_it),
        200: answer(Message, stored, "Already stored under this Idempotency-Key.", links=get_it),
        **error_responses(400, 403, 409, 413, 415, 422, 503, 507),
    }
    sizes = {"history_size": settings.history_size, "max_body": max_body, "budget_mib": BODY_BUDGET >> 20}
    router.add_api_route(
        "",
        create_message,
        methods=["POST"],
        route_class_override=LeanRoute,
        status_code=201,
        **operation("create_message", **sizes),
        openapi_extra=_request_schema(settings),
        responses=responses,
    )

    @router.get(
        "",
        **operation("list_messages", chunk_kib=LIST_CHUNK // 1024, streams=LIST_STREAMS),
        responses={
            200: {"model": MessageList, "description": "Recent messages, oldest first."},
            **error_responses(403, 422, 503),
        },
    )
    async def list_messages(
        request: Request,
        limit: Annotated[int, Query(ge=1, le=settings.history_size, description=_HOW_MANY)] = default_limit,
    ) -> Response:
        chunks = _list_chunks(store, store.recent_ids(limit))
        first = next(chunks)
        second = next(chunks, None)
        if second is None:
            return Response(first, 200, None, JSON)
        peer = request.scope.get("extensions", {}).get(PEER_KEY)
        uid = peer["uid"] if peer else None
        if not streams.take(1, uid):
            why = "all %d slots (or peer uid %s's share) are taken by answers being sent"
            busy_log.log(logging.WARNING, "Refused a long list with 503: " + why, LIST_STREAMS, uid)
            busy = f"{LIST_STREAMS} long lists (or {streams.per_peer} for your uid) are being sent already"
            return error_response(
                503, f"{busy}; try again shortly, or ask for fewer with ?limit=", headers=_RETRY
            )
        return ReleasingStream(_resume([first, second], chunks), lambda: streams.give(1, uid), JSON, {})

    found = {200: answer(Message, stored, "The message."), **error_responses(403, 404, 422)}

    @router.get("/{message_id}", **operation("get_message"), responses=found)
    async def get_message(
        message_id: Annotated[int, Path(description="The id `POST /messages` answered with.")],
    ) -> Response:
        document = store.get(message_id)
        if document is None:
            return error_response(
                404, f"no message with id {message_id} (unknown or no longer in the history)"
            )
        return Response(document, 200, None, JSON)

    return router


def _list_chunks(store: Store, ids: Sequence[int]) -> Iterator[bytes]:
    """``{"messages": [...]}`` for ``ids[0]..ids[-1]`` in chunks of about LIST_CHUNK, each read when made."""
    parts, separator = [b'{"messages":['], b""
    after, last = (ids[0] - 1, ids[-1]) if ids else (0, 0)
    size = read = read_bytes = 0
    want = 8  # rows per read: then about one chunk's worth
    while after < last and (rows := store.since(after, min(want, last - after))):
        for message_id, data in rows:
            if message_id > last:
                after = last
                break
            after = message_id
            parts += (separator, data)
            separator = b","
            size += len(data) + 1
            read += 1
            read_bytes += len(data) + 1
            if size >= LIST_CHUNK:
                yield b"".join(parts)
                parts, size = [], 0
        del rows
        want = max(1, min(256, (LIST_CHUNK - size) * read // max(read_bytes, 1) + 1))
    parts.append(b"]}")
    yield b"".join(parts)


async def _resume(ready: list[bytes], rest: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The chunks already made, then the rest; a chunk once sent is no longer referenced here."""
    while ready:
        yield ready.pop(0)
    for chunk in rest:
        yield chunk


def _too_large(limit: int) -> Response:
    message = f"the request body is larger than {limit} bytes; send a shorter text"
    return error_response(413, message, headers={"connection": "close"})


def _busy(uid: int | None, throttle: Throttle) -> Response:
    why = "the body budget (or peer uid %s's share) is taken by requests still receiving theirs"
    throttle.log(logging.WARNING, "Refused a request body with 503: " + why, uid)
    busy = "the server is receiving too many request bodies at once (from your uid or in all)"
    return error_response(503, f"{busy}; try again shortly", headers={**_RETRY, "connection": "close"})
