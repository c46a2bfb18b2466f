"""API versions: every API route lives under ``/v{N}``, and its unversioned path is an alias of the
current version (like Docker's ``/v1.47/containers/json`` and ``/containers/json``). The probes,
``/_ping``, ``/openapi.json`` and the docs stay unversioned. Why: docs/internals.md, "API"."""

import copy
import re
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Route, compile_path

from app.api.errors import error_response

API_VERSIONS: tuple[int, ...] = (1,)  # the API versions this server serves, oldest first


def add_versioned(app: FastAPI, router: APIRouter, versions: Sequence[int]) -> None:
    """Copy ``router``'s routes under ``/v{N}``; only the newest is documented and answers unversioned."""
    for route in router.routes:
        assert isinstance(route, APIRoute), f"add_versioned takes API routes; {route!r} is not one"
        for version in reversed(versions):
            moved = copy.copy(route)  # shares the endpoint, its dependant and its handler
            moved.path = f"/v{version}{route.path}"
            moved.path_regex, moved.path_format, moved.param_convertors = compile_path(moved.path)
            current = version == versions[-1]
            if current:  # "^(?:/v1)?/messages$"
                bare = compile_path(route.path)[0].pattern
                moved.path_regex = re.compile(f"^(?:{re.escape(f'/v{version}')})?{bare[1:]}")
            moved.include_in_schema = route.include_in_schema and current
            app.router.routes.append(moved)


def add_unsupported_route(app: FastAPI, versions: Sequence[int]) -> None:
    """Answer 400 at ``/v{N}/...`` for every version not served (added last: free for the others)."""
    low, high = versions[0], versions[-1]
    served = f"API version {low}" if low == high else f"API versions {low} to {high}"
    pattern = "|".join(str(v) for v in versions)

    async def unsupported_version(request: Request) -> Response:
        asked = request.path_params["version"]
        return error_response(
            400,
            f"API version {asked!r} is not supported; this server supports {served}: use "
            f"/v{high}/... or the unversioned paths (GET /_ping tells the versions)",
            error="unsupported_api_version",
        )

    route = Route("/v{version}", unsupported_version, include_in_schema=False)
    route.path_regex = re.compile(rf"^/v(?!(?:{pattern})(?:/|$))(?P<version>[0-9][^/]*)(?:/.*)?$")
    route.methods = None  # Starlette makes a function endpoint GET-only; the version is what is wrong
    app.router.routes.append(route)
