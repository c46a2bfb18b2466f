"""``GET /events``: every stored message as a Server-Sent Event, live (``docker events``): an
``EventSourceResponse`` around the hub's byte stream (why not a generator: docs/internals.md)."""

# No ``from __future__ import annotations``: FastAPI reads the route signature's annotations.

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.sse import EventSourceResponse
from pydantic import WithJsonSchema
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from app.api.errors import error_response, error_responses
from app.logs import Throttle
from app.storage.events import BUFFER, CHUNK, HEARTBEAT_INTERVAL, EventHub, StreamsFull, Subscriber

__all__ = ["EVENT_SCHEMA", "build_router"]

log = logging.getLogger("app.storage.events")

_DESCRIPTION = f"""\
A `text/event-stream` (Server-Sent Events) of every message stored from now on, by any worker
process: event `message`, `id` the message id, data the message as `GET /messages/{{id}}` answers it.

**Resuming.** With `Last-Event-ID` (sent by browsers' `EventSource` on reconnection) or
`?since=ID`, the stream first replays the messages after that id still in the history, then goes on
live: nothing is lost or repeated across a reconnection. The header wins when both are given.
When some of those messages have left the history (or the id is unknown to the server), event
`reset` comes first: its data names the `oldest` id kept; list the messages again
(`GET /messages`), and the stream goes on from that oldest message. The replay goes as fast as
the reader takes it: the server reads the next {CHUNK // 1024} KiB of it only once the last went out.

**Heartbeats.** An idle stream gets a comment line (`: heartbeat`) every {HEARTBEAT_INTERVAL:g} s.

**Ends.** A reader that falls more than {BUFFER} events behind gets event `overflow` and the stream
ends; on shutdown every stream gets event `shutdown` and ends. Both carry `last_id`: reconnect with
`Last-Event-ID` to go on without a gap.

At most `--max-streams` streams are open at once (with `--workers N`, each worker process holds its
share), and one peer uid holds at most a quarter of them; past that the answer is 503 with
`Retry-After`.
"""

_EXAMPLE = (
    "retry: 1000\n\n"
    "event: message\n"
    'data: {"id":7,"text":"hi","reply":"Hello from server via UDS",'
    '"received_at":"2026-01-01T00:00:00.000000Z","peer":{"pid":42,"uid":1000,"gid":1000}}\n'
    "id: 7\n\n"
    ": heartbeat\n\n"
)


_AN_ID = WithJsonSchema({"type": "integer", "minimum": 0})  # optional, never null: null is a 422


def _json_data(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "string", "contentMediaType": "application/json", "contentSchema": schema}


_LAST_ID = {"type": "integer", "minimum": 0, "description": "Reconnect with `Last-Event-ID` set to it."}
_TEXT = {"type": "string", "description": "What happened and what to do, for a person."}

EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One event, as OpenAPI 3.2 describes a `text/event-stream` item.",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["message", "reset", "overflow", "shutdown"]},
        "data": {"type": "string"},
        "id": {"type": "string", "pattern": "^[0-9]+$"},
        "retry": {"type": "integer", "minimum": 0},
    },
    "oneOf": [
        {
            "properties": {
                "event": {"const": "message"},
                "data": _json_data({"$ref": "#/components/schemas/Message"}),
            },
            "required": ["id"],
        },
        {
            "properties": {
                "event": {"const": "reset"},
                "data": _json_data(
                    {
                        "type": "object",
                        "required": ["oldest", "message"],
                        "properties": {
                            "oldest": {"type": "integer", "description": "The id the stream goes on from."},
                            "message": _TEXT,
                        },
                    }
                ),
            },
            "required": ["id"],
        },
        {
            "properties": {
                "event": {"enum": ["overflow", "shutdown"]},
                "data": _json_data(
                    {
                        "type": "object",
                        "required": ["last_id", "message"],
                        "properties": {"last_id": _LAST_ID, "message": _TEXT},
                    }
                ),
            },
        },
    ],
}
"""The 200's ``itemSchema`` (FastAPI writes one only for a generator path operation)."""


class _EventStream(EventSourceResponse):
    """An event stream that gives its slot back however it ends (done, failed, client gone)."""

    def __init__(self, hub: EventHub, subscriber: Subscriber, since: int | None, request: Request) -> None:
        super().__init__(
            hub.stream(subscriber, since, request.is_disconnected), headers={"cache-control": "no-cache"}
        )
        self._hub = hub
        self._subscriber = subscriber

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._hub.unsubscribe(self._subscriber)


def build_router(hub: EventHub) -> APIRouter:
    """The ``/events`` router, bound to this process's hub."""
    router = APIRouter(prefix="/events", tags=["events"])
    refusals = Throttle(log)

    stream = {"text/event-stream": {"itemSchema": EVENT_SCHEMA, "example": _EXAMPLE}}
    responses = {
        200: {"description": "The event stream.", "content": stream},
        **error_responses(403, 422, 503),
    }

    @router.get(
        "",
        summary="Stream events",
        operation_id="stream_events",
        description=_DESCRIPTION,
        # A class without a media type: FastAPI adds no ``schema`` beside the ``itemSchema`` (OpenAPI
        # 3.2 would read it as the schema of the whole stream).
        response_class=Response,
        response_model=None,
        responses=responses,
    )
    async def stream_events(
        request: Request,
        since: Annotated[
            int | None,
            _AN_ID,
            Query(ge=0, description="Replay the messages after this id first (like `Last-Event-ID`)."),
        ] = None,
        last_event_id: Annotated[
            int | None,
            _AN_ID,
            Header(alias="last-event-id", ge=0, description="The id of the last event received."),
        ] = None,
    ) -> Response:
        """Stream stored messages as Server-Sent Events."""
        try:
            peer = request.scope.get("extensions", {}).get("uds.peer")
            subscriber = hub.subscribe(peer["uid"] if peer else None)
        except StreamsFull as exc:
            refusals.log(logging.WARNING, "Refused an event stream with 503: %s", exc)
            return error_response(503, f"{exc}; try again shortly", headers={"retry-after": "1"})
        return _EventStream(hub, subscriber, last_event_id if last_event_id is not None else since, request)

    return router
