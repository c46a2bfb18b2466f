"""``GET /whoami``: the caller's uid, gid, pid, groups and scopes; open to every peer (what a
caller runs after a 403)."""

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.access import Access
from app.api.errors import JSON
from app.api.models import PARTS, WhoAmI, answer, operation


def build_router(access: Access) -> APIRouter:
    router = APIRouter(prefix="/whoami", tags=["access"])

    @router.get("", **operation("whoami"), responses={200: answer(WhoAmI, PARTS["whoami_answer"])})
    async def whoami(request: Request) -> Response:
        return Response(orjson.dumps(access.whoami(request.scope)), 200, None, JSON)

    return router
