"""Offline API docs: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, every asset served locally
from ``fastapi-offline``'s static directory (no CDN, no web fonts).

Each page fetches its assets, the spec and every call, adding ``Uds-Proxy-Token`` when its address
carries ``?token=`` (how ``uds-client proxy`` admits a browser, with no cookie); a ``<script src>``
cannot carry a header, so the scripts run inline, admitted by their hashes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from html import escape
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "CONTENT_SECURITY_POLICY", "TOKEN_HEADER", "assets_directory", "install"]

ASSETS_URL = "/docs-assets"

# The pages may load only what this server serves: ReDoc 2 hard-codes one image on its CDN
# (cdn.redoc.ly), which the browser must not fetch from an offline Pod or an air-gapped laptop.
# Scripts: only the page's own and the assets it runs, by hash (%(scripts)s); no other inline
# script or handler runs, so markup that got into a page could not read the token in its address.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src %(scripts)s; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'"
)


TOKEN_HEADER = "Uds-Proxy-Token"  # noqa: S105 - a header name, not a secret
"""The header that carries ``uds-client proxy``'s token (the proxy removes it before the socket)."""

_PAGES = resources.files("app.api") / "pages"
"""The pages' templates (``%(name)s`` placeholders) and the loader script both run."""


def _page(template: str, title: str, openapi_url: str, redirect_url: str = "") -> str:
    """One docs page; values go in as JSON literals (quoted for a script) or escaped text."""

    def literal(value: str) -> str:
        return json.dumps(value).replace("<", "\\u003c")

    loader = _PAGES.joinpath("loader.js").read_text() % {
        "header": literal(TOKEN_HEADER),
        "assets": literal(ASSETS_URL),
    }
    page = _PAGES.joinpath(template).read_text() % {
        "title": escape(title),
        "loader": loader,
        "openapi": literal(openapi_url),
        "redirect": literal(redirect_url),
    }
    return page


def _script_hash(text: str) -> str:
    """The CSP source that admits an inline script whose text is ``text``."""
    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


def _policy(page: str, assets: list[str]) -> str:
    """The page's Content-Security-Policy: its own inline script and the named assets it runs."""
    inline = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    # fetch(...).text() decodes UTF-8 and drops a byte order mark; the hash is of that text.
    texts = [(assets_directory() / name).read_text(encoding="utf-8-sig") for name in assets]
    return CONTENT_SECURITY_POLICY % {"scripts": " ".join(map(_script_hash, [*inline, *texts]))}


def _offline(page: HTMLResponse, policy: str) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = policy
    # Requests from the page carry no Referer: its address may hold the proxy's token.
    page.headers["Referrer-Policy"] = "no-referrer"
    return page


def assets_directory() -> Path:
    """Where ``fastapi-offline`` keeps Swagger UI, ReDoc and the favicon."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the docs pages and their assets from this app."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_directory()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = f"{docs_url}/oauth2-redirect"
    swagger_page = _page("swagger.html", f"{app.title} - Swagger UI", openapi_url, redirect_url)
    redoc_page = _page("redoc.html", f"{app.title} - ReDoc", openapi_url)
    swagger_policy = _policy(swagger_page, ["swagger-ui-bundle.js"])
    redoc_policy = _policy(redoc_page, ["redoc.standalone.js"])

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        """Swagger UI, served offline."""
        return _offline(HTMLResponse(swagger_page), swagger_policy)

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        """Swagger UI's OAuth2 redirect page."""
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        """ReDoc, served offline and without web fonts."""
        return _offline(HTMLResponse(redoc_page), redoc_policy)
