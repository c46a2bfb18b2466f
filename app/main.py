"""The FastAPI application: ``create_app(settings, store=, hub=, metrics=, access=)`` builds it.
Nothing happens at import; ``uvicorn app.main:app`` builds ``app`` from the environment on first use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import cache

from fastapi import FastAPI

from app import __version__
from app.api import errors
from app.api.access import Access, PeerAllowlist
from app.api.models import describe
from app.api.routes import docs, events, health, messages, whoami
from app.api.routes import metrics as metrics_route
from app.api.versions import API_VERSIONS, add_unsupported_route, add_versioned
from app.config import Settings
from app.metrics.exposition import Metrics
from app.storage.events import EventHub, stream_capacity
from app.storage.sqlite import SqliteStore, build_store
from app.storage.store import Store

TAGS = [
    {"name": "messages", "description": "Send messages and read the recent history."},
    {"name": "health", "description": "Probes and versions."},
    {"name": "events", "description": "Stored messages as a live Server-Sent Events stream."},
    {"name": "access", "description": "Who the caller is and the scopes it holds."},
]


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    hub: EventHub | None = None,
    metrics: Metrics | None = None,
    access: Access | None = None,
    api_versions: Sequence[int] = API_VERSIONS,
) -> FastAPI:
    """The application; each dependency not given is built from ``settings`` (default: the
    environment). No I/O but reading the policy file (a bad one raises PolicyError)."""
    settings = Settings.from_env() if settings is None else settings
    versions = tuple(sorted(set(api_versions)))
    store = build_store(settings) if store is None else store
    hub = EventHub(store, stream_capacity(settings.max_streams, settings.workers)) if hub is None else hub
    access = Access(settings, versions) if access is None else access
    metrics = Metrics(shown_uids=settings.metrics_uid) if metrics is None else metrics
    metrics.event_streams = lambda: len(hub.streams)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """Each (worker) process opens its own connections to the durable store."""
        async with AsyncExitStack() as stack:
            if isinstance(store, SqliteStore):
                store.open()
                stack.push_async_callback(store.aclose)
            yield

    app = FastAPI(
        title="uds-example",
        version=__version__,
        description=describe("app"),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        # This server logs instead: no per-request check of the OpenTelemetry providers.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        openapi_tags=TAGS,
    )
    errors.install(app)
    # Routes go straight into the table, no include_router layer: see docs/internals.md, "API".
    (spec,) = app.router.routes  # FastAPI's /openapi.json, put back behind the API routes below
    app.router.routes.clear()
    add_versioned(app, messages.build_router(settings, store), versions)
    add_versioned(app, health.build_versioned_router(versions), versions)
    add_versioned(app, events.build_router(hub), versions)
    add_versioned(app, whoami.build_router(access), versions)
    app.router.routes.extend(health.build_router(hub, versions).routes)
    docs.install(app)
    app.router.routes.extend(metrics_route.build_router(metrics).routes)  # GET /metrics (unversioned)
    app.router.routes.append(spec)
    add_unsupported_route(app, versions)  # last: only requests no route matched reach it
    if access.installed:
        app.add_middleware(PeerAllowlist, access=access)
    return app


@cache
def __getattr__(name: str) -> FastAPI:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # The plain `uvicorn app.main:app` has no entry point of ours: set up logging (else the demo
    # lines are lost below uvicorn's WARNING root) and the store (uds-server does both).
    from app.logs import configure
    from app.storage.schema import prepare_store

    s = Settings.from_env()
    configure(s.log_level, s.log_format, debug=s.debug, access_log=s.access_log)
    prepare_store(s)
    return create_app(s)
