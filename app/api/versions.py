"""API versions: every API route lives under ``/v{N}``, and its unversioned path is an alias of the
current version (like Docker's ``/v1.47/containers/json`` and ``/containers/json``).

The one place that knows the versions. :data:`API_VERSIONS` lists those this server serves,
:data:`CURRENT` is the newest (what the unversioned paths mean), :data:`MIN` the oldest.
``GET|HEAD /_ping`` reports them in ``Api-Version`` and ``Min-Api-Version``; the client pings once
and uses the highest version both sides support.

Adding a router (how every API router joins the table)::

    from app.api.versions import add_versioned

    def create_app(settings):
        ...
        add_versioned(app, events.build_router(...))   # router = APIRouter(prefix="/events", ...)

Give the router its unversioned paths (``prefix="/events"``), an ``operation_id`` on every
route, and no router-level dependencies. :func:`add_versioned` puts each route into the app's
table under ``/v1/events`` (documented, once), which also answers ``/events`` (the alias, not
documented), and under every other version the app serves. A route that changes in a later
version is added under that version only, with ``versions=``.

What stays unversioned: the probes ``/healthz`` and ``/readyz`` and ``/_ping``, like Docker's
``/_ping``. They belong to the process's life, not to the API contract: the kubelet's probes and a
client that has not negotiated yet must find them at one path whatever versions a server speaks.
``/openapi.json`` and the docs pages describe the whole table, so they are unversioned too.

Why copies, not ``include_router``: FastAPI's ``include_router`` adds a lazy inclusion layer that
every request is matched through again (about 9 µs a request, a third of the hot path). A copy of
an ``APIRoute`` with its path recompiled (``starlette.routing.compile_path``, as FastAPI does for
a mounted app) shares the endpoint, its dependant and its handler.

Why the alias is not a route of its own: the router tries its routes in order, and each miss is a
call to ``APIRoute.matches`` (measured: 0.46 µs). An alias placed after ``POST /v1/messages`` made
``POST /messages`` 5% slower in process (the whole app driven through ASGI, CPU time, batches
interleaved: 14.00 against 13.45 µs). The current version's route matches both paths with one
pattern instead (``^(?:/v1)?/messages$``, 0.04 µs more per test than ``^/messages$``), so both
paths are tried first and the table keeps its length: 0.98x and 0.99x the table without versions.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import Route, compile_path

from app.api.errors import error_response

__all__ = [
    "API_VERSIONS",
    "CURRENT",
    "MIN",
    "add_unsupported_route",
    "add_versioned",
    "prefix",
    "served",
    "supported_range",
]

API_VERSIONS: tuple[int, ...] = (1,)
"""The API versions this server serves, oldest first."""
CURRENT = API_VERSIONS[-1]
"""The newest version: the unversioned paths are its aliases."""
MIN = API_VERSIONS[0]
"""The oldest version still served."""


def prefix(version: int) -> str:
    """The path prefix of an API version: ``/v1``."""
    return f"/v{version}"


def served(app: FastAPI) -> tuple[int, ...]:
    """The versions ``app`` serves (:data:`API_VERSIONS` unless ``create_app`` was given others)."""
    versions: tuple[int, ...] = getattr(app.state, "api_versions", API_VERSIONS)
    return versions


def supported_range(versions: Sequence[int]) -> str:
    """``"API version 1"`` or ``"API versions 1 to 3"``: the versions as a person reads them."""
    low, high = versions[0], versions[-1]
    return f"API version {low}" if low == high else f"API versions {low} to {high}"


def add_versioned(app: FastAPI, router: APIRouter, versions: Sequence[int] | None = None) -> None:
    """Put a router's routes into ``app``'s table under each version's prefix.

    ``router`` is an ``APIRouter`` whose routes carry their unversioned paths (prefix applied).
    ``versions`` defaults to every version the app serves. Only the current version's copy is
    documented, and it also answers the unversioned path (the alias).
    """
    served_versions = served(app)
    current = served_versions[-1]
    chosen = served_versions if versions is None else tuple(versions)
    table = app.router.routes
    for route in router.routes:
        if not isinstance(route, APIRoute):
            raise TypeError(f"add_versioned takes API routes; {route!r} is not one")
        for version in sorted(chosen, reverse=True):
            table.append(_moved(route, version, current=version == current))


def _moved(route: APIRoute, version: int, *, current: bool) -> APIRoute:
    """A shallow copy of ``route`` at ``/v{version}`` + its path, documented only for the current
    version, whose copy also answers the unversioned path."""
    moved = copy.copy(route)
    versioned = prefix(version)
    moved.path = versioned + route.path
    moved.path_regex, moved.path_format, moved.param_convertors = compile_path(moved.path)
    if current:
        bare = compile_path(route.path)[0].pattern  # "^/messages$"
        moved.path_regex = re.compile(f"^(?:{re.escape(versioned)})?{bare[1:]}")
    moved.include_in_schema = route.include_in_schema and current
    return moved


def add_unsupported_route(app: FastAPI) -> None:
    """Answer 400 (the one error shape) at ``/v{N}/...`` for every version the app does not serve.

    One route at the very end of the table: a request reaches it only after every real route has
    failed to match, so it costs the hot path nothing. Its pattern excludes the served versions, so
    ``/v1/nowhere`` stays a 404 and a wrong method on ``/v1/messages`` stays a 405.
    """
    versions = served(app)
    text = supported_range(versions)
    served_alternatives = "|".join(str(v) for v in versions)
    pattern = re.compile(rf"^/v(?!(?:{served_alternatives})(?:/|$))(?P<version>[0-9][^/]*)(?:/.*)?$")

    async def unsupported_version(request: Request) -> Response:
        """Refuse a path under an API version this server does not serve."""
        asked = request.path_params["version"]
        return error_response(
            400,
            f"API version {asked!r} is not supported; this server supports {text}: use "
            f"/v{versions[-1]}/... or the unversioned paths (GET /_ping tells the versions)",
            error="unsupported_api_version",
        )

    route = Route("/v{version}", unsupported_version, include_in_schema=False)
    route.path_regex = pattern
    route.methods = None  # Starlette makes a function endpoint GET-only; the version is what is wrong
    app.router.routes.append(route)
