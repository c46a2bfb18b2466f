"""The yardstick for the server: a bare Starlette route doing the same work as ``POST /messages``.

It parses the JSON body, checks one string, logs one line, and answers JSON with an id, the text,
the reply and a timestamp, served by uvicorn with the production settings of ``uds-server``
(httptools, uvloop, no access log). Run: ``python benchmarks/bare_app.py --socket /tmp/b.sock``
or ``--port 8081``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

log = logging.getLogger("bare")
_ids = itertools.count(1)
REPLY = "Hello from server via UDS"


async def post_message(request: Request) -> JSONResponse:
    """Parse, validate one string, log one line, answer JSON."""
    try:
        payload = json.loads(await request.body())
    except ValueError:
        return JSONResponse({"error": "invalid_json", "message": "body is not JSON", "status": 400}, 400)
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str) or not 1 <= len(text) <= 4096:
        problem = {"error": "validation_error", "message": "text: 1..4096 characters", "status": 422}
        return JSONResponse(problem, 422)
    log.info("📩 Server received: %s", text)
    now = datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")
    body = {"id": next(_ids), "text": text, "reply": REPLY, "received_at": now, "peer": None}
    return JSONResponse(body, 201)


async def healthz(request: Request) -> JSONResponse:
    """Liveness."""
    return JSONResponse({"status": "ok"})


def create_app() -> Starlette:
    return Starlette(routes=[Route("/messages", post_message, methods=["POST"]), Route("/healthz", healthz)])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="serve on this Unix socket path")
    where.add_argument("--port", type=int, help="serve TCP on 127.0.0.1:PORT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    config = uvicorn.Config(
        create_app(),
        uds=args.socket,
        host="127.0.0.1",
        port=args.port or 8000,
        http="httptools",
        loop="uvloop",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
