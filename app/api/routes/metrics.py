"""``GET /metrics`` on the socket: the Prometheus exposition, for ``curl --unix-socket``.

Unversioned, like the probes (its format is versioned by its content type); unlike them it is
subject to the access policy.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.errors import error_responses
from app.metrics.core import METRICS_PATH
from app.metrics.exposition import Metrics

__all__ = ["build_router"]

DESCRIPTION = (
    "Request counts and durations by route template, messages stored, open connections and event "
    "streams, requests by the peer uids `--metrics-uid` names, and the process metrics, in "
    "Prometheus' text format (or OpenMetrics, if `Accept` asks for it), as collected at most a "
    "second ago. With `--workers`, the sum over all workers, collected afresh. `--metrics-listen "
    "HOST:PORT` serves the same over TCP for Prometheus."
)


def build_router(metrics: Metrics) -> APIRouter:
    """The ``GET /metrics`` route, showing ``metrics``."""
    router = APIRouter(tags=["metrics"])

    @router.get(
        METRICS_PATH,
        operation_id="get_metrics",
        summary="Prometheus metrics",
        description=DESCRIPTION,
        response_model=None,
        responses={
            200: {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **error_responses(403),
        },
    )
    async def get_metrics(request: Request) -> Response:
        headers, body = metrics.rendered.render(request.headers.get("accept"), None)
        return Response(body, 200, {"cache-control": "no-store", **dict(headers)})

    return router
