"""``GET /metrics`` on the socket: the Prometheus exposition, for ``curl --unix-socket``.

Unversioned, like the probes: its format is Prometheus', versioned by its content type, and the
same path serves it on the TCP port of ``--metrics-listen``. Unlike the probes it is subject to the
peer allowlist, like the API.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from app.api.errors import error_responses
from app.metrics.core import METRICS_PATH, Metrics

__all__ = ["install"]


def install(app: FastAPI, metrics: Metrics | None = None) -> Metrics:
    """Give ``app`` its :class:`Metrics` (``app.state.metrics``) and the ``GET /metrics`` route."""
    if metrics is None:
        settings = getattr(app.state, "settings", None)
        metrics = Metrics(shown_uids=settings.metrics_uid if settings is not None else ())
    app.state.metrics = metrics
    events = getattr(app.state, "events", None)
    if events is not None:
        metrics.event_streams = lambda: int(events.open)

    async def get_metrics(request: Request) -> Response:
        """Prometheus metrics of the server (all workers)."""
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, 200, {"cache-control": "no-store"}, content_type)

    app.router.routes.append(
        APIRoute(
            METRICS_PATH,
            get_metrics,
            methods=["GET"],
            tags=["metrics"],
            operation_id="get_metrics",
            summary="Prometheus metrics",
            description=(
                "Request counts and durations by route template, messages stored, open connections "
                "and event streams, requests by the peer uids `--metrics-uid` names, and the process "
                "metrics, in Prometheus' text format (or OpenMetrics, if `Accept` asks for it), as "
                "collected at most a second ago. With `--workers`, the sum over all workers, collected "
                "afresh. `--metrics-listen HOST:PORT` serves the same over TCP for Prometheus."
            ),
            response_model=None,
            responses={
                200: {
                    "description": "The metrics.",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **error_responses(403),
            },
        )
    )
    return metrics
