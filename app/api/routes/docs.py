"""Offline API docs: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, every asset served locally
from ``fastapi-offline``'s static directory (no CDN, no web fonts). How the pages carry the proxy's
token: docs/internals.md, "The docs pages"."""

import base64
import hashlib
import json
import re
from functools import cache, partial
from html import escape
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"

# Only what this server serves (ReDoc hard-codes an image on cdn.redoc.ly), and only the scripts
# admitted by hash (%(scripts)s): markup that got into a page could not read the token in its address.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src %(scripts)s; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
    "frame-ancestors 'none'"
)
# The header of ``uds-client proxy``'s token (the proxy removes it before the socket); not a secret.
TOKEN_HEADER = "Uds-Proxy-Token"  # noqa: S105

_PAGES = resources.files("app.api") / "pages"  # templates with %(name)s placeholders, and loader.js


def _page(template: str, title: str, openapi_url: str, redirect_url: str = "") -> str:
    """One docs page; values go in as JSON literals (quoted for a script) or escaped text."""

    def literal(value: str) -> str:
        return json.dumps(value).replace("<", "\\u003c")

    names = {"header": literal(TOKEN_HEADER), "assets": literal(ASSETS_URL)}
    loader = _PAGES.joinpath("loader.js").read_text() % names
    return _PAGES.joinpath(template).read_text() % {
        "title": escape(title),
        "loader": loader,
        "openapi": literal(openapi_url),
        "redirect": literal(redirect_url),
    }


def _headers(page: str, assets: list[str]) -> dict[str, str]:
    """A CSP admitting the page's inline script and named assets by hash; no Referer (token in the URL)."""
    inline = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    # fetch(...).text() decodes UTF-8 and drops a byte order mark; the hash is of that text.
    texts = [(assets_directory() / name).read_text(encoding="utf-8-sig") for name in assets]
    hashes = [base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() for text in [*inline, *texts]]
    scripts = " ".join(f"'sha256-{digest}'" for digest in hashes)
    policy = CONTENT_SECURITY_POLICY % {"scripts": scripts}
    return {"Content-Security-Policy": policy, "Referrer-Policy": "no-referrer"}


_SCRIPTS = {"swagger.html": "swagger-ui-bundle.js", "redoc.html": "redoc.standalone.js"}


def _built(
    template: str, tool: str, title: str, openapi_url: str, redirect_url: str
) -> tuple[str, dict[str, str]]:
    """A docs page and its headers."""
    page = _page(template, f"{title} - {tool}", openapi_url, redirect_url)
    return page, _headers(page, [_SCRIPTS[template]])


def assets_directory() -> Path:
    """Where ``fastapi-offline`` keeps Swagger UI, ReDoc and the favicon."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the docs pages and their assets from this app."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_directory()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = f"{docs_url}/oauth2-redirect"
    # Built at the first request: hashing the two scripts (2.6 MB) would slow every start.
    swagger = cache(partial(_built, "swagger.html", "Swagger UI", app.title, openapi_url, redirect_url))
    redoc = cache(partial(_built, "redoc.html", "ReDoc", app.title, openapi_url, ""))

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page, headers = swagger()
        return HTMLResponse(page, headers=headers)

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc_page() -> HTMLResponse:
        page, headers = redoc()
        return HTMLResponse(page, headers=headers)
