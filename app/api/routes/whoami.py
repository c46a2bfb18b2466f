"""``GET /whoami``: the caller's uid, gid, pid, groups and scopes; open to every peer (what a caller
runs after a 403)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.access import Access
from app.api.models import WhoAmI, describe

__all__ = ["build_router"]

JSON = "application/json"
EXAMPLE = {"uid": 1000, "gid": 1000, "pid": 42, "groups": [1000], "scopes": ["read"], "forwarded_for": None}


def build_router(access: Access) -> APIRouter:
    """The ``/whoami`` route, answering from the rules in force in ``access``."""
    router = APIRouter(prefix="/whoami", tags=["access"])

    @router.get(
        "",
        summary="Who am I, and what may I do",
        operation_id="whoami",
        description=describe("whoami"),
        response_model=None,
        responses={200: {"model": WhoAmI, "content": {JSON: {"example": EXAMPLE}}}},
    )
    async def whoami(request: Request) -> Response:
        """Answer with the caller's identity and scopes."""
        return Response(orjson.dumps(access.whoami(request.scope)), 200, None, JSON)

    return router
