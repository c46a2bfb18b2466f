"""Probes and versions: ``/healthz``, ``/readyz`` and ``/_ping`` (unversioned, open to every peer)
and ``/version`` (an API route, under ``/v{N}``)."""

import platform
from collections.abc import Sequence
from functools import cache
from importlib import metadata

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from app import __version__
from app.api.errors import JSON, error_responses
from app.api.models import PARTS, HealthStatus, ReadyStatus, VersionInfo, answer, operation
from app.storage.events import EventHub

SERVER = f"uds-example/{__version__}"  # the ``Server`` header of ``/_ping``
_OK = {"text/plain": {"schema": {"type": "string", "enum": ["OK"]}, "example": "OK"}}


@cache
def versions() -> dict[str, str]:
    """The server's version and those of the stack under it (computed once)."""
    info = {"app": __version__, "python": platform.python_version()}
    for name in ("uvicorn", "fastapi", "starlette", "pydantic", "orjson", "httptools", "uvloop"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = "not installed"
    info["platform"] = f"{platform.system().lower()}/{platform.machine()}"
    return info


def build_router(hub: EventHub, api_versions: Sequence[int]) -> APIRouter:
    """The probes and ``/_ping``; ``/readyz`` answers 503 once ``hub`` drains (SIGTERM)."""
    router = APIRouter(tags=["health"])
    ping_headers = {
        "api-version": str(api_versions[-1]),
        "min-api-version": str(api_versions[0]),
        "server": SERVER,
        "cache-control": "no-cache, no-store, must-revalidate",
    }

    async def ping() -> Response:
        return Response(b"OK", 200, ping_headers, "text/plain")

    ok = {"description": "The server answers.", "headers": PARTS["ping_headers"], "content": _OK}
    for method, operation_id in (("GET", "ping"), ("HEAD", "ping_head")):
        words = {**operation("ping"), "operation_id": operation_id}
        router.add_api_route("/_ping", ping, methods=[method], **words, responses={200: ok})

    @router.get("/healthz", **operation("healthz"), responses={200: answer(HealthStatus, {"status": "ok"})})
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', 200, None, JSON)

    @router.get(
        "/readyz",
        **operation("readyz"),
        responses={
            200: answer(ReadyStatus, {"status": "ready"}),
            503: answer(ReadyStatus, {"status": "draining"}, "Shutting down."),
        },
    )
    async def readyz() -> Response:
        if hub.draining:
            return Response(b'{"status":"draining"}', 503, None, JSON)
        return Response(b'{"status":"ready"}', 200, None, JSON)

    return router


def build_versioned_router(api_versions: Sequence[int]) -> APIRouter:
    """``/version``, for :func:`app.api.versions.add_versioned`."""
    router = APIRouter(tags=["health"])
    api = {"api_version": str(api_versions[-1]), "min_api_version": str(api_versions[0])}
    responses = {200: answer(VersionInfo, PARTS["version"]), **error_responses(403)}

    @router.get("/version", **operation("version"), responses=responses)
    async def version() -> Response:
        return Response(orjson.dumps({**versions(), **api}), 200, None, JSON)

    return router
