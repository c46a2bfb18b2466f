"""Probes and versions: ``/healthz``, ``/readyz`` and ``/_ping`` (unversioned, open to every peer)
and ``/version`` (an API route, under ``/v{N}``)."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from functools import cache
from importlib import metadata
from typing import Any

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from app import __version__
from app.api.errors import error_responses
from app.api.models import HealthStatus, ReadyStatus, VersionInfo, describe
from app.storage.events import EventHub

__all__ = ["SERVER", "build_router", "build_versioned_router", "versions"]

SERVER = f"uds-example/{__version__}"
"""The ``Server`` header of ``/_ping``."""
JSON = "application/json"
_STRING = {"schema": {"type": "string"}}
_VERSION_EXAMPLE = dict(app="1.0.0", python="3.11.2", uvicorn="0.54.0", fastapi="0.165.0", starlette="1.10.0")
_VERSION_EXAMPLE.update(pydantic="2.14.4", orjson="3.13.0", api_version="1", min_api_version="1")


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


def _json(doc: dict[str, str], model: Any, description: str | None = None) -> dict[str, Any]:
    entry = {"model": model, "content": {JSON: {"example": doc}}}
    return {**entry, "description": description} if description else entry


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
        """Answer OK with the API versions this server serves."""
        return Response(b"OK", 200, ping_headers, "text/plain")

    headers = {
        "Api-Version": {"description": "The newest API version served.", **_STRING},
        "Min-Api-Version": {"description": "The oldest API version served.", **_STRING},
        "Server": {"description": "This server and its version.", **_STRING},
    }
    t = {"schema": {"type": "string", "enum": ["OK"]}, "example": "OK"}
    for method, operation_id in (("GET", "ping"), ("HEAD", "ping_head")):
        router.add_api_route(
            "/_ping",
            ping,
            methods=[method],
            operation_id=operation_id,
            summary="Ping, with the API versions",
            description=describe("ping"),
            response_model=None,
            responses={
                200: {"description": "The server answers.", "headers": headers, "content": {"text/plain": t}}
            },
        )

    @router.get(
        "/healthz",
        summary="Liveness probe",
        operation_id="healthz",
        description="200 while the process can answer HTTP. Never restricted by the peer allowlist.",
        response_model=None,
        responses={200: _json({"status": "ok"}, HealthStatus)},
    )
    async def healthz() -> Response:
        """Answer 200 while the process serves HTTP."""
        return Response(b'{"status":"ok"}', 200, None, JSON)

    @router.get(
        "/readyz",
        summary="Readiness probe",
        operation_id="readyz",
        description=describe("readyz"),
        response_model=None,
        responses={
            200: _json({"status": "ready"}, ReadyStatus),
            503: _json({"status": "draining"}, ReadyStatus, "Shutting down."),
        },
    )
    async def readyz() -> Response:
        """Answer 200 while serving, 503 while draining."""
        if hub.draining:
            return Response(b'{"status":"draining"}', 503, None, JSON)
        return Response(b'{"status":"ready"}', 200, None, JSON)

    return router


def build_versioned_router(api_versions: Sequence[int]) -> APIRouter:
    """``/version``, for :func:`app.api.versions.add_versioned`."""
    router = APIRouter(tags=["health"])
    api = {"api_version": str(api_versions[-1]), "min_api_version": str(api_versions[0])}

    @router.get(
        "/version",
        summary="Server, stack and API versions",
        operation_id="version",
        description=describe("version"),
        response_model=None,
        responses={200: _json(_VERSION_EXAMPLE, VersionInfo), **error_responses(403)},
    )
    async def version() -> Response:
        """Report the versions of the server, its stack and its API."""
        return Response(orjson.dumps({**versions(), **api}), 200, None, JSON)

    return router
