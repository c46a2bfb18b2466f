"""Offline API docs: Swagger UI at ``/docs`` and ReDoc at ``/redoc``, every asset served locally.

The JavaScript, CSS and favicon come from the ``fastapi-offline`` package's static directory (not
copied into this repository); ReDoc is told not to load Google Fonts. No page references a CDN.

Each page loads its assets, the spec and (Swagger UI's "Try it out") every call with ``fetch``, and
adds a ``Uds-Proxy-Token`` header when its address carries ``?token=``: that is how ``uds-client
proxy`` admits a browser it cannot identify, with no cookie (a cookie would reach every port of
the host). A ``<script src>`` cannot carry a header, so the scripts are fetched and run inline.
"""

from __future__ import annotations

import json
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

# Shared by both pages: the token from the address, a fetch that sends it, and the loader that runs
# the fetched assets inline (a script element's src cannot carry a header).
_LOADER = """
const tokenHeaders = {};
const token = new URLSearchParams(window.location.search).get("token");
if (token) tokenHeaders[%(header)s] = token;
async function fetchOk(url) {
  const response = await fetch(url, {headers: tokenHeaders, credentials: "omit"});
  if (!response.ok) throw new Error(url + " answered " + response.status + ": " + await response.text());
  return response;
}
async function load(names) {
  const fetched = names.map((name) => fetchOk(%(assets)s + "/" + name).then((r) => r.text()));
  const texts = await Promise.all(fetched);
  texts.forEach((text, i) => {
    const element = document.createElement(names[i].endsWith(".css") ? "style" : "script");
    element.textContent = text;
    document.head.append(element);
    if (element.tagName === "SCRIPT") element.remove();  // it has run
  });
  fetchOk(%(assets)s + "/favicon.png").then((r) => r.blob()).then((blob) => {
    const reader = new FileReader();
    reader.onload = () => {
      const icon = document.createElement("link");
      icon.rel = "icon";
      icon.href = reader.result;
      document.head.append(icon);
    };
    reader.readAsDataURL(blob);
  }).catch(() => {});
}
function failed(error) {
  const message = document.createElement("pre");
  message.textContent = "The API docs could not be loaded: " + error.message;
  document.body.replaceChildren(message);
}
"""

_SWAGGER = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>%(title)s</title>
</head>
<body>
<div id="swagger-ui"></div>
<script>%(loader)s
load(["swagger-ui.css", "swagger-ui-bundle.js"]).then(() => {
  window.ui = SwaggerUIBundle({
    url: %(openapi)s,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    oauth2RedirectUrl: window.location.origin + %(redirect)s,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    requestInterceptor: (request) => {
      Object.assign(request.headers, tokenHeaders);
      return request;
    },
  });
}).catch(failed);
</script>
</body>
</html>
"""

_REDOC = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%(title)s</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<noscript>ReDoc requires JavaScript to show the API docs.</noscript>
<div id="redoc"></div>
<script>%(loader)s
Promise.all([load(["redoc.standalone.js"]), fetchOk(%(openapi)s).then((r) => r.json())])
  .then(([, spec]) => Redoc.init(spec, {}, document.getElementById("redoc")))
  .catch(failed);
</script>
</body>
</html>
"""


def _page(template: str, title: str, openapi_url: str, redirect_url: str = "") -> str:
    """One docs page; values go in as JSON literals (quoted for a script) or escaped text."""
    from html import escape

    def literal(value: str) -> str:
        return json.dumps(value).replace("<", "\\u003c")

    loader = _LOADER % {"header": literal(TOKEN_HEADER), "assets": literal(ASSETS_URL)}
    page = template % {
        "title": escape(title),
        "loader": loader,
        "openapi": literal(openapi_url),
        "redirect": literal(redirect_url),
    }
    return page


def _script_hash(text: str) -> str:
    """The CSP source that admits an inline script whose text is ``text``."""
    import base64
    import hashlib

    digest = base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()
    return f"'sha256-{digest}'"


def _policy(page: str, assets: list[str]) -> str:
    """The page's Content-Security-Policy: its own inline script and the named assets it runs."""
    import re

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
    swagger_page = _page(_SWAGGER, f"{app.title} - Swagger UI", openapi_url, redirect_url)
    redoc_page = _page(_REDOC, f"{app.title} - ReDoc", openapi_url)
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
