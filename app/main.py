"""The FastAPI application: ``create_app(settings)`` builds it; nothing happens at import.

``uvicorn app.main:app`` also works: the module-level ``app`` is built from the environment on
first access (PEP 562 module ``__getattr__``, which uvicorn's ``getattr`` lookup triggers), so
importing this module reads no settings and builds nothing.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI

from app import __version__
from app.access import PeerAllowlist
from app.config import Settings
from app.errors import install as install_errors
from app.routes import docs, health, messages
from app.store import MessageStore

__all__ = ["create_app"]

DESCRIPTION = """\
Pod-local REST over a Unix domain socket. Clients in the same Pod reach it through the shared
socket (default `unix:///csi/csi.sock`), e.g. `curl --unix-socket /csi/csi.sock http://localhost/healthz`.

Every error has one JSON shape: `{"error": "<code>", "message": "<one line>", "status": <int>}`,
plus `details` for validation errors (422).

`POST /messages` takes an optional `Idempotency-Key` header: a retry with the same key and text
returns the stored message (200) instead of storing it again; the same key with another text is a
conflict (409). Keys belong to the peer uid that sent them: the same key from another uid is
another key.

With a peer allowlist (`UDS_ALLOW_UID` / `UDS_ALLOW_GID`), only processes whose uid or gid is listed
(read from the socket with SO_PEERCRED) may call the API; others get 403. `/healthz` and `/readyz`
stay open for probes. A connection without peer credentials (TCP) is refused: the allowlist fails
closed.
"""


def create_app(settings: Settings) -> FastAPI:
    """Build the application for these settings."""
    app = FastAPI(
        title="uds-example",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        # FastAPI's built-in OpenTelemetry hooks check the global providers on every request;
        # this server logs instead, so they are off (no per-request cost).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        openapi_tags=[
            {"name": "messages", "description": "Send messages and read the recent history."},
            {"name": "health", "description": "Probes and versions."},
        ],
    )
    app.state.settings = settings
    app.state.draining = False
    store = MessageStore(settings.history_size, settings.idempotency_keys)
    app.state.store = store
    install_errors(app)
    for router in (messages.build_router(settings, store), health.build_router()):
        _add_routes(app, router)
    docs.install(app)
    app.state.method_routes = list(app.routes)
    if settings.allow_uid or settings.allow_gid:
        app.add_middleware(PeerAllowlist, allow_uid=settings.allow_uid, allow_gid=settings.allow_gid)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """Put a router's routes (prefix and tags already applied) straight into the app's route table.

    ``include_router`` would add a lazy inclusion layer that every request is matched through
    again (about 9 µs a request, a third of the hot path); these routers use no router-level
    dependencies, so the routes work the same either way and appear the same in OpenAPI.
    """
    app.router.routes.extend(router.routes)


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    global _app
    if name == "app":
        if _app is None:
            settings = Settings.from_env()
            # The plain `uvicorn app.main:app --uds ...` form has no entry point of ours to set up
            # logging, so the demo lines would be lost below uvicorn's WARNING root: do it here.
            from app.logs import configure

            configure(
                settings.log_level, settings.log_format, debug=settings.debug, access_log=settings.access_log
            )
            _app = create_app(settings)
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
