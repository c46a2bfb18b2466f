"""Probes and versions: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/version``."""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata

from fastapi import APIRouter, Request
from starlette.responses import Response

from app import __version__
from app.errors import error_responses
from app.models import HealthStatus, ReadyStatus, VersionInfo

__all__ = ["build_router", "versions"]

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


def build_router() -> APIRouter:
    """The probe and version routes (open to every peer, unlike the rest)."""
    router = APIRouter(tags=["health"])

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

    @router.get(
        "/version",
        summary="Server and stack versions",
        operation_id="version",
        description="Versions of the server, Python, uvicorn, FastAPI, Starlette, pydantic and orjson.",
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
                        }
                    }
                },
            },
            **error_responses(403),
        },
    )
    async def version() -> Response:
        """Report the versions of the server and its stack."""
        import orjson

        return Response(orjson.dumps(versions()), 200, None, JSON)

    return router
