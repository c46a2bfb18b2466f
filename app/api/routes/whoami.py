"""``GET /whoami``: the caller's uid, gid, pid, groups and scopes; open to every peer (what a caller
runs after a 403)."""

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.access import Access
from app.api.models import WhoAmI, operation

JSON = "application/json"
EXAMPLE = {"uid": 1000, "gid": 1000, "pid": 42, "groups": [1000], "scopes": ["read"], "forwarded_for": None}


def build_router(access: Access) -> APIRouter:
    """The ``/whoami`` route, answering from the rules in force in ``access``."""
    router = APIRouter(prefix="/whoami", tags=["access"])
    example = {"model": WhoAmI, "content": {JSON: {"example": EXAMPLE}}}

    @router.get("", **operation("whoami"), responses={200: example})
    async def whoami(request: Request) -> Response:
        """Answer with the caller's identity and scopes."""
        return Response(orjson.dumps(access.whoami(request.scope)), 200, None, JSON)

    return router
