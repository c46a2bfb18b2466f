"""Probes and versions: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/_ping`` (API versions,
unversioned like Docker's) and ``/version`` (under ``/v{N}``, with its unversioned alias)."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from functools import cache
from importlib import metadata

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app import __version__
from app.api.errors import error_responses
from app.api.models import HealthStatus, ReadyStatus, VersionInfo
from app.api.versions import API_VERSIONS

__all__ = ["SERVER", "build_router", "build_versioned_router", "versions"]

SERVER = f"uds-example/{__version__}"
"""The ``Server`` header of ``/_ping``."""

JSON = "application/json"
_OK = b'{"status":"ok"}'
_READY = b'{"status":"ready"}'
_DRAINING = b'{"status":"draining"}'


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


def build_router(api_versions: Sequence[int] = API_VERSIONS) -> APIRouter:
    """The unversioned routes open to every peer: the probes and ``/_ping``."""
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

    ping_description = (
        "Answers `OK` with the newest API version this server serves in `Api-Version` (what the "
        "unversioned paths mean) and the oldest in `Min-Api-Version`; a client uses the highest "
        "version both sides support, under `/v{N}/...`. Unversioned, and never restricted by the "
        "peer allowlist."
    )
    text = {"schema": {"type": "string", "enum": ["OK"]}, "example": "OK"}
    ping_responses: dict[int | str, dict[str, object]] = {
        200: {
            "description": "The server answers.",
            "headers": {
                "Api-Version": {
                    "description": "The newest API version served.",
                    "schema": {"type": "string"},
                },
                "Min-Api-Version": {
                    "description": "The oldest API version served.",
                    "schema": {"type": "string"},
                },
                "Server": {"description": "This server and its version.", "schema": {"type": "string"}},
            },
            "content": {"text/plain": text},
        }
    }
    for method, operation_id in (("GET", "ping"), ("HEAD", "ping_head")):
        router.add_api_route(
            "/_ping",
            ping,
            methods=[method],
            operation_id=operation_id,
            summary="Ping, with the API versions",
            description=ping_description,
            response_model=None,
            responses=ping_responses,
        )

    @router.get(
        "/healthz",
        summary="Liveness probe",
        operation_id="healthz",
        description="200 while the process can answer HTTP. Never restricted by the peer allowlist.",
        response_model=None,
        responses={200: {"model": HealthStatus, "content": {JSON: {"example": {"status": "ok"}}}}},
    )
    async def healthz() -> Response:
        """Answer 200 while the process serves HTTP."""
        return Response(_OK, 200, None, JSON)

    @router.get(
        "/readyz",
        summary="Readiness probe",
        operation_id="readyz",
        description=(
            "200 `ready` while the server takes work; 503 `draining` once shutdown has begun, so "
            "Kubernetes stops sending traffic. Never restricted by the peer allowlist."
        ),
        response_model=None,
        responses={
            200: {"model": ReadyStatus, "content": {JSON: {"example": {"status": "ready"}}}},
            503: {
                "model": ReadyStatus,
                "description": "Shutting down.",
                "content": {JSON: {"example": {"status": "draining"}}},
            },
        },
    )
    async def readyz(request: Request) -> Response:
        """Answer 200 while serving, 503 while draining."""
        if request.app.state.draining:
            return Response(_DRAINING, 503, None, JSON)
        return Response(_READY, 200, None, JSON)

    return router


def build_versioned_router(api_versions: Sequence[int] = API_VERSIONS) -> APIRouter:
    """``/version``: an API route, added under each version by :func:`app.api.versions.add_versioned`."""
    router = APIRouter(tags=["health"])
    api = {"api_version": str(api_versions[-1]), "min_api_version": str(api_versions[0])}

    @router.get(
        "/version",
        summary="Server, stack and API versions",
        operation_id="version",
        description=(
            "Versions of the server, Python, uvicorn, FastAPI, Starlette, pydantic and orjson, and the "
            "newest and oldest API versions served (as in `GET /_ping`)."
        ),
        response_model=None,
        responses={
            200: {
                "model": VersionInfo,
                "content": {
                    JSON: {
                        "example": {
                            "app": "1.0.0",
                            "python": "3.11.2",
                            "uvicorn": "0.54.0",
                            "fastapi": "0.165.0",
                            "starlette": "1.10.0",
                            "pydantic": "2.14.4",
                            "orjson": "3.13.0",
                            "api_version": "1",
                            "min_api_version": "1",
                        }
                    }
                },
            },
            **error_responses(403),
        },
    )
    async def version() -> Response:
        """Report the versions of the server, its stack and its API."""
        return Response(orjson.dumps({**versions(), **api}), 200, None, JSON)

    return router
