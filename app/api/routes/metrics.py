"""``GET /metrics`` on the socket: the Prometheus exposition, for ``curl --unix-socket``. Unversioned,
like the probes (its content type versions its format), but subject to the access policy."""

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.errors import error_responses
from app.api.models import operation
from app.metrics.core import METRICS_PATH
from app.metrics.exposition import Metrics

_TEXT = {"text/plain": {"schema": {"type": "string"}}}


def build_router(metrics: Metrics) -> APIRouter:
    router = APIRouter(tags=["metrics"])
    responses = {200: {"description": "The metrics.", "content": _TEXT}, **error_responses(403)}

    @router.get(METRICS_PATH, **operation("get_metrics"), responses=responses)
    async def get_metrics(request: Request) -> Response:
        headers, body = metrics.rendered.render(request.headers.get("accept"), None)
        return Response(body, 200, {"cache-control": "no-store", **dict(headers)})

    return router
