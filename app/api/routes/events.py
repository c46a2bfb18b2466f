"""``GET /events``: every stored message as a Server-Sent Event, live (``docker events``): a
response around the hub's byte stream (why not a generator: docs/internals.md)."""

import json
import logging
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from pydantic import WithJsonSchema
from starlette.responses import Response

from app.api.errors import error_response, error_responses
from app.api.models import describe, operation
from app.api.routes import ReleasingStream
from app.connection.peer import PEER_KEY
from app.storage.events import BUFFER, CHUNK, HEARTBEAT_INTERVAL, EventHub, StreamsFull
from client.net.throttle import Throttle

log = logging.getLogger("app.storage.events")

_NO_CACHE = {"cache-control": "no-cache"}
_AN_ID = WithJsonSchema({"type": "integer", "minimum": 0})  # optional, never null: null is a 422
_SINCE = "Replay the messages after this id first (like `Last-Event-ID`)."
_LAST = "The id of the last event received."


def build_router(hub: EventHub) -> APIRouter:
    router = APIRouter(prefix="/events", tags=["events"])
    refusals = Throttle(log)

    # The 200's itemSchema, written out: FastAPI writes one only for a generator path operation.
    item = json.loads(resources.files("app.api").joinpath("event-schema.json").read_text("utf-8"))
    stream = {"text/event-stream": {"itemSchema": item, "example": describe("events_example")}}
    responses = {
        200: {"description": "The event stream.", "content": stream},
        **error_responses(403, 422, 503),
    }
    words = operation(
        "stream_events", chunk_kib=CHUNK // 1024, heartbeat=f"{HEARTBEAT_INTERVAL:g}", buffer=BUFFER
    )

    # A class without a media type: no ``schema`` beside the ``itemSchema`` (docs/internals.md).
    @router.get("", **words, response_class=Response, responses=responses)
    async def stream_events(
        request: Request,
        since: Annotated[int | None, _AN_ID, Query(ge=0, description=_SINCE)] = None,
        last_event_id: Annotated[
            int | None, _AN_ID, Header(alias="last-event-id", ge=0, description=_LAST)
        ] = None,
    ) -> Response:
        try:
            peer = request.scope.get("extensions", {}).get(PEER_KEY)
            subscriber = hub.subscribe(peer["uid"] if peer else None)
        except StreamsFull as exc:
            refusals.log(logging.WARNING, "Refused an event stream with 503: %s", exc)
            return error_response(503, f"{exc}; try again shortly", headers={"retry-after": "1"})
        since = last_event_id if last_event_id is not None else since
        chunks = hub.stream(subscriber, since, request.is_disconnected)
        return ReleasingStream(chunks, lambda: hub.unsubscribe(subscriber), "text/event-stream", _NO_CACHE)

    return router
