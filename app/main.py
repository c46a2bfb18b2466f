"""The FastAPI application: ``create_app(settings, store=, hub=, metrics=, access=)`` builds it.

Nothing happens at import. ``uvicorn app.main:app`` builds the module-level ``app`` from the
environment on first access (a PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import errors
from app.api.access import Access, PeerAllowlist
from app.api.routes import docs, events, health, messages, whoami
from app.api.routes import metrics as metrics_route
from app.api.versions import API_VERSIONS, add_unsupported_route, add_versioned
from app.config import Settings
from app.metrics.core import Metrics
from app.storage.events import EventHub, stream_capacity
from app.storage.sqlite import SqliteStore, build_store
from app.storage.store import Store

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
    """Build the application; each dependency not given is built from ``settings`` (default: the
    environment). Building does no I/O beyond reading the policy file (a bad one raises
    PolicyError). ``api_versions`` (served under ``/v{N}``) differ only in tests."""
    settings = Settings.from_env() if settings is None else settings
    versions = tuple(sorted(set(api_versions)))
    store = build_store(settings) if store is None else store
    hub = EventHub(store, stream_capacity(settings.max_streams, settings.workers)) if hub is None else hub
    access = Access(settings, versions) if access is None else access

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """Each (worker) process opens its own connections to the durable store."""
        if not isinstance(store, SqliteStore):
            yield
            return
        store.open()
        try:
            yield
        finally:
            await store.aclose()

    app = FastAPI(
        title="uds-example",
        version=__version__,
        description=DESCRIPTION,
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
    app.state.settings, app.state.events, app.state.access = settings, hub, access  # serving reads these
    metrics_route.install(app)
    app.router.routes.append(spec)
    add_unsupported_route(app, versions)  # last: only requests no route matched reach it
    if access.installed:
        app.add_middleware(PeerAllowlist, access=access)
    return app


_app: FastAPI | None = None


def __getattr__(name: str) -> FastAPI:
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        # The plain `uvicorn app.main:app` has no entry point of ours: set up logging (else the demo
        # lines are lost below uvicorn's WARNING root) and the store (uds-server does both).
        from app.logs import configure
        from app.storage.sqlite import prepare_store

        s = Settings.from_env()
        configure(s.log_level, s.log_format, debug=s.debug, access_log=s.access_log)
        prepare_store(s)
        _app = create_app(s)
    return _app
