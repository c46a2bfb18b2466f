"""The API docs in a real browser: Swagger UI and ReDoc through the proxy, and the offline export.

Each page must render the operations and request nothing from outside the machine. The proxy lets
the browser in by its uid, or with ``--token-only`` by the token the page sends from its printed URL,
and turns away a rebinding host name and a foreign origin. Screenshots land in artifacts/browser/.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser.conftest import LOCAL_HOSTS, REBIND_HOST, network, off_machine, requested_urls, screenshot
from tests.client.test_proxy import Proxy
from tests.support import ServerProcess, http_over_uds, run_cli

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RENDER_TIMEOUT = 30
SWAGGER_POST = '.opblock-post .opblock-summary-path[data-path="/v1/messages"]'
SWAGGER_GET_ONE = '.opblock-get .opblock-summary-path[data-path="/v1/messages/{message_id}"]'
REDOC_HEADING = "//h2[normalize-space()='{}']"
# ReDoc 2 hard-codes Redocly's logo from its CDN; a Content-Security-Policy must block it.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"
# URLs a page loads by itself: src of any element, href of <link>. (An <a href> is only a link.)
_ATTR_URL = re.compile(r"""<(?:[a-z]+[^>]*?\ssrc|link[^>]*?\shref)\s*=\s*["']([^"']+)""", re.I)


def wait_for_css(driver: webdriver.Chrome, selector: str) -> None:
    WebDriverWait(driver, RENDER_TIMEOUT).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, selector)),
        f"{selector} never rendered in {driver.current_url}",
    )


def wait_for_xpath(driver: webdriver.Chrome, xpath: str) -> None:
    WebDriverWait(driver, RENDER_TIMEOUT).until(
        ec.presence_of_element_located((By.XPATH, xpath)), f"{xpath} never rendered in {driver.current_url}"
    )


def assert_local_markup(html: str) -> None:
    """Every URL the markup loads is relative or on this machine; no CDN is named anywhere."""
    for url in _ATTR_URL.findall(html):
        parts = urlsplit(url)
        assert not parts.netloc or parts.hostname in LOCAL_HOSTS, url
    for cdn in ("cdn.jsdelivr.net", "unpkg.com", "cdnjs", "fonts.googleapis.com", "fonts.gstatic.com"):
        assert cdn not in html, cdn


_ASSET_NAME = re.compile(r'"/?([\w.-]+\.(?:js|css|png))"')


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_served_html_names_no_cdn(docs_server: ServerProcess, page: str) -> None:
    assert docs_server.socket_path is not None
    status, body = http_over_uds(docs_server.socket_path, "GET", page)
    assert status == 200
    html = body.decode()
    # The page fetches its assets (with the proxy's token, when its address has one) and runs
    # them: nothing loads by attribute, and every asset it names is a file of this server.
    assert _ATTR_URL.findall(html) == []
    assert '"/docs-assets"' in html
    names = _ASSET_NAME.findall(html)
    assert "favicon.png" in names
    for name in names:
        assert http_over_uds(docs_server.socket_path, "GET", f"/docs-assets/{name}")[0] == 200, name
    assert_local_markup(html)


def test_swagger_ui_renders_through_the_proxy_offline(chrome: webdriver.Chrome, proxy_port: int) -> None:
    base = f"http://127.0.0.1:{proxy_port}"
    chrome.get(f"{base}/docs")
    wait_for_css(chrome, SWAGGER_POST)
    wait_for_css(chrome, SWAGGER_GET_ONE)
    shot = screenshot(chrome, "swagger-ui")
    assert shot.stat().st_size > 10_000
    urls = requested_urls(chrome)
    assert f"{base}/openapi.json" in urls
    assert any(u.endswith("/swagger-ui-bundle.js") for u in urls), urls
    assert off_machine(urls) == []
    assert_local_markup(chrome.page_source)
    chrome.find_element(By.CSS_SELECTOR, SWAGGER_POST).click()
    wait_for_css(chrome, ".opblock-post .try-out__btn")  # served from the API: "Try it out" is on


def test_the_browser_can_call_the_api_through_the_proxy(chrome: webdriver.Chrome, proxy_port: int) -> None:
    chrome.get(f"http://127.0.0.1:{proxy_port}/docs")
    wait_for_css(chrome, SWAGGER_POST)
    status, body = chrome.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        fetch("/messages", {method: "POST", headers: {"Content-Type": "application/json"},
                            body: JSON.stringify({text: "Hello from client"})})
          .then(r => r.json().then(j => done([r.status, j])))
          .catch(e => done([0, String(e)]));
        """
    )
    assert status == 201, body
    assert body["reply"] == "Hello from server via UDS"
    # The server saw the proxy's credentials on the socket, and the proxy named the browser behind it:
    # the Chromium process that owns the TCP connection.
    forwarded = body["peer"]["forwarded_for"]
    assert forwarded["uid"] == os.geteuid()
    assert psutil.Process(forwarded["pid"]).name().startswith("chrom"), forwarded
    assert off_machine(requested_urls(chrome)) == []


_POST_MESSAGE = """
    const done = arguments[arguments.length - 1];
    fetch(arguments[0], {method: "POST", headers: {"Content-Type": "application/json"},
                         body: JSON.stringify({text: "Hello from client"})})
      .then(r => r.json().then(j => done([r.status, j])))
      .catch(e => done([0, String(e)]));
"""


def test_a_token_only_proxy_opens_with_its_url_and_no_cookie(
    chrome: webdriver.Chrome, token_proxy: Proxy
) -> None:
    base = f"http://127.0.0.1:{token_proxy.port}"
    chrome.get(f"{base}/docs")
    assert '"error":"forbidden"' in chrome.page_source  # no token yet: nothing of the API
    chrome.get(f"{base}/docs?token={token_proxy.token}")
    wait_for_css(chrome, SWAGGER_POST)
    # The token stays in the tab's address, where only this page reads it, and in no cookie or
    # storage: a cookie would reach every port of 127.0.0.1.
    assert chrome.current_url == f"{base}/docs?token={token_proxy.token}"
    assert chrome.get_cookies() == []
    assert chrome.execute_script("return [localStorage.length, sessionStorage.length]") == [0, 0]
    # Without the header, the page's own origin gets nothing either.
    status, body = chrome.execute_async_script(_POST_MESSAGE, "/messages")
    assert status == 403, body
    chrome.get(f"{base}/redoc?token={token_proxy.token}")  # ReDoc fetches the spec with it too
    wait_for_xpath(chrome, REDOC_HEADING.format("Send a message"))
    assert chrome.get_cookies() == []
    screenshot(chrome, "token-redoc")


def test_a_rebinding_host_name_gets_nothing(chrome: webdriver.Chrome, proxy: Proxy) -> None:
    # The browser resolves rebind.example to 127.0.0.1, as after a DNS-rebinding attack.
    chrome.get(f"http://{REBIND_HOST}:{proxy.port}/docs")
    assert '"error":"misdirected_request"' in chrome.page_source
    status, body = chrome.execute_async_script(_POST_MESSAGE, "/messages")
    assert status == 421, body
    assert f"refused 421 GET /docs: this proxy does not answer for host '{REBIND_HOST}:{proxy.port}'" in (
        proxy.output
    )


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<!doctype html><title>another site</title><p>another site</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_page_of_another_origin_cannot_use_the_proxy(
    chrome: webdriver.Chrome, proxy: Proxy, docs_server: ServerProcess
) -> None:
    assert docs_server.socket_path is not None
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        chrome.get(f"http://127.0.0.1:{site.server_address[1]}/")
        _, before = http_over_uds(docs_server.socket_path, "GET", "/messages?limit=1000")
        # A "simple" cross-origin request (no preflight) that the same user's browser sends.
        status, _ = chrome.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            fetch(arguments[0], {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                 body: '{"text": "from another site"}'})
              .then(r => done([r.status, r.type])).catch(e => done([0, String(e)]));
            """,
            f"http://127.0.0.1:{proxy.port}/messages",
        )
        assert status == 0  # opaque either way; what matters is below
        proxy.wait_output(
            r"refused 403 POST /messages: cross-origin requests are refused "
            rf"\(Origin 'http://127\.0\.0\.1:{site.server_address[1]}'\)"
        )
        _, after = http_over_uds(docs_server.socket_path, "GET", "/messages?limit=1000")
        assert after == before
    finally:
        site.shutdown()
        site.server_close()
        thread.join(10)


def test_redoc_renders_through_the_proxy(chrome: webdriver.Chrome, proxy_port: int) -> None:
    base = f"http://127.0.0.1:{proxy_port}"
    chrome.get(f"{base}/redoc")
    wait_for_xpath(chrome, REDOC_HEADING.format("Send a message"))
    wait_for_xpath(chrome, REDOC_HEADING.format("Get one message"))
    shot = screenshot(chrome, "redoc")
    assert shot.stat().st_size > 10_000
    urls = requested_urls(chrome)
    assert f"{base}/openapi.json" in urls
    assert any(u.endswith("/redoc.standalone.js") for u in urls), urls
    assert off_machine(urls) == [], urls
    assert_local_markup(chrome.page_source)


def test_served_redoc_requests_nothing_off_the_machine(chrome: webdriver.Chrome, proxy_port: int) -> None:
    chrome.get(f"http://127.0.0.1:{proxy_port}/redoc")
    wait_for_xpath(chrome, REDOC_HEADING.format("Send a message"))
    assert off_machine(requested_urls(chrome)) == []


@pytest.fixture(scope="module")
def exported(docs_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline export of ``docs_server``'s docs, written by ``uds-client docs``."""
    assert docs_server.socket_path is not None
    out = tmp_path_factory.mktemp("export")
    result = run_cli("--socket", docs_server.socket_path, "docs", "--output", str(out))
    assert result.returncode == 0, result.stderr
    return out


def no_network(urls: list[str]) -> list[str]:
    return [u for u in urls if not u.startswith(("file://", "data:", "blob:", "about:"))]


def test_exported_swagger_ui_renders_from_file(chrome: webdriver.Chrome, exported: Path) -> None:
    page = (exported / "index.html").as_uri()
    chrome.get(page)
    wait_for_css(chrome, SWAGGER_POST)
    wait_for_css(chrome, SWAGGER_GET_ONE)
    screenshot(chrome, "export-swagger-ui")
    seen = network(chrome)
    assert page in seen.sent
    assert no_network(seen.sent) == []
    assert seen.blocked == []
    # Read-only: an opened operation offers no "Try it out", since no server is behind the page.
    chrome.find_element(By.CSS_SELECTOR, SWAGGER_POST).click()
    wait_for_css(chrome, ".opblock-post .opblock-body .opblock-section")
    assert chrome.find_elements(By.CSS_SELECTOR, ".try-out__btn") == []


def test_exported_redoc_renders_from_file(chrome: webdriver.Chrome, exported: Path) -> None:
    page = (exported / "redoc.html").as_uri()
    chrome.get(page)
    wait_for_xpath(chrome, REDOC_HEADING.format("Send a message"))
    wait_for_xpath(chrome, REDOC_HEADING.format("Get one message"))
    screenshot(chrome, "export-redoc")
    seen = network(chrome)
    assert page in seen.sent
    assert no_network(seen.sent) == []
    # The page's Content-Security-Policy stopped ReDoc's one remote image before it was sent.
    assert set(seen.blocked) <= {REDOC_LOGO}, seen.blocked
