"""The FastAPI application: ``create_app(settings)`` builds it; nothing happens at import.

``uvicorn app.main:app`` also works: the module-level ``app`` is built from the environment on
first access (PEP 562 module ``__getattr__``, which uvicorn's ``getattr`` lookup triggers), so
importing this module reads no settings and builds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import APIRouter, FastAPI

from app import __version__
from app.api.access import Access, PeerAllowlist
from app.api.errors import install as install_errors
from app.api.routes import docs, events, health, messages, whoami
from app.api.routes import metrics as metrics_routes
from app.api.versions import API_VERSIONS, add_unsupported_route, add_versioned
from app.config import Settings
from app.metrics.exposition import Metrics
from app.storage.events import EventHub, stream_capacity
from app.storage.sqlite import build_store, store_lifespan

__all__ = ["create_app"]

DESCRIPTION = """\
Pod-local REST over a Unix domain socket. Clients in the same Pod reach it through the shared
socket (default `unix:///csi/csi.sock`), e.g. `curl --unix-socket /csi/csi.sock http://localhost/healthz`.

The API is versioned like Docker's: every operation lives under `/v{N}/...` (this document lists
version 1), and the same path without the prefix is an alias of the current version. `GET /_ping`
answers `OK` with the headers `Api-Version` (current) and `Min-Api-Version` (oldest served); a path
under a version the server does not serve (`/v9/messages`) gets 400. The probes (`/healthz`,
`/readyz`) and `/_ping` are unversioned.

Every error has one JSON shape: `{"error": "<code>", "message": "<one line>", "status": <int>}`,
plus `details` for validation errors (422).

`POST /messages` takes an optional `Idempotency-Key` header: a retry with the same key and text
returns the stored message (200) instead of storing it again; the same key with another text is a
conflict (409). Keys belong to the peer uid that sent them: the same key from another uid is
another key.

With a peer allowlist (`UDS_ALLOW_UID` / `UDS_ALLOW_GID`), only processes whose uid or gid is listed
(read from the socket with SO_PEERCRED) may call the API; others get 403. `/healthz`, `/readyz`
and `/_ping` stay open for probes and version negotiation. A connection without peer credentials
(TCP) is refused: the allowlist fails closed.

With a policy (`UDS_POLICY`, a TOML file of rules), each call needs a scope: `read` (GET and HEAD
of messages, version, docs, this document), `write` (POST of messages), `events` (the event
stream) or `metrics` (`/metrics`); a caller without it gets 403 naming the scope. `GET /whoami`
needs none: it shows the caller's uid, gid, groups and the scopes it holds.
"""


def create_app(
    settings: Settings, *, api_versions: Sequence[int] = API_VERSIONS, metrics: Metrics | None = None
) -> FastAPI:
    """Build the application for these settings.

    ``api_versions`` (oldest first) are the API versions served under ``/v{N}``; the default is
    :data:`app.api.versions.API_VERSIONS`. Only tests pass others, to stand in for older or newer servers.
    """
    app = FastAPI(
        title="uds-example",
        version=__version__,
        description=DESCRIPTION,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=store_lifespan,  # each (worker) process opens its own connections to the store
        # FastAPI's built-in OpenTelemetry hooks check the global providers on every request;
        # this server logs instead, so they are off (no per-request cost).
        telemetry={"tracing": False, "metrics": False, "logs": False},
        openapi_tags=[
            {"name": "messages", "description": "Send messages and read the recent history."},
            {"name": "health", "description": "Probes and versions."},
            {"name": "events", "description": "Stored messages as a live Server-Sent Events stream."},
            {"name": "access", "description": "Who the caller is and the scopes it holds."},
        ],
    )
    app.state.settings = settings
    app.state.api_versions = tuple(sorted(set(api_versions)))
    app.state.draining = False
    store = build_store(settings)  # not opened yet: create_app does no I/O
    app.state.store = store
    install_errors(app)
    # API routes under /v{N} and their unversioned aliases (app.api.versions); every API router joins
    # the table through add_versioned. The probes and /_ping stay unversioned.
    add_versioned(app, messages.build_router(settings, store))
    add_versioned(app, health.build_versioned_router(app.state.api_versions))
    # One event hub per process; the server's signal handler tells it to end the streams on SIGTERM.
    app.state.events = EventHub(store, stream_capacity(settings.max_streams, settings.workers))
    add_versioned(app, events.build_router(app.state.events))
    # The policy file is read here: a bad one raises PolicyError (uds-server checks it before binding).
    access = Access(settings, app.state.api_versions)
    app.state.access = access  # the server reloads it on SIGHUP and flushes its audit log each tick
    add_versioned(app, whoami.build_router(access))
    _add_routes(app, health.build_router(app.state.api_versions))
    docs.install(app)
    metrics = metrics or Metrics(shown_uids=settings.metrics_uid)
    hub = app.state.events
    metrics.event_streams = lambda: int(hub.open)
    _add_routes(app, metrics_routes.build_router(metrics))  # GET /metrics (unversioned)
    _spec_after_the_api(app)
    add_unsupported_route(app)  # last: only requests no route matched reach it
    app.state.method_routes = list(app.routes)
    if access.installed:
        app.add_middleware(PeerAllowlist, access=access)
    return app


def _add_routes(app: FastAPI, router: APIRouter) -> None:
    """Put a router's routes (prefix and tags already applied) straight into the app's route table.

    ``include_router`` would add a lazy inclusion layer that every request is matched through
    again (about 9 µs a request, a third of the hot path); these routers use no router-level
    dependencies, so the routes work the same either way and appear the same in OpenAPI.
    """
    app.router.routes.extend(router.routes)


def _spec_after_the_api(app: FastAPI) -> None:
    """Move ``/openapi.json`` behind the API routes.

    FastAPI puts it first in the table, so every request missed it before reaching its own route:
    one ``matches`` call, 0.46 µs, about 4% of ``POST /messages`` driven in process.
    """
    routes = app.router.routes
    spec = [route for route in routes if getattr(route, "path", None) == app.openapi_url]
    for route in spec:
        routes.remove(route)
        routes.append(route)


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
            from app.storage.sqlite import prepare_store

            prepare_store(settings)  # uds-server does this before binding; here uvicorn has bound
            _app = create_app(settings)
        return _app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
