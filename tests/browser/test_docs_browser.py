"""The API docs in a real browser: Swagger UI and ReDoc through the proxy, and the offline export.

Each page must render the operations and request nothing from outside the machine.
Screenshots land in artifacts/browser/.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser.conftest import LOCAL_HOSTS, network, off_machine, requested_urls, screenshot
from tests.support import ServerProcess, http_over_uds, run_cli

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RENDER_TIMEOUT = 30
SWAGGER_POST = '.opblock-post .opblock-summary-path[data-path="/messages"]'
SWAGGER_GET_ONE = '.opblock-get .opblock-summary-path[data-path="/messages/{message_id}"]'
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


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_served_html_names_no_cdn(docs_server: ServerProcess, page: str) -> None:
    assert docs_server.socket_path is not None
    status, body = http_over_uds(docs_server.socket_path, "GET", page)
    assert status == 200
    html = body.decode()
    assert _ATTR_URL.findall(html), "the page loads its assets from somewhere"
    for url in _ATTR_URL.findall(html):
        assert url.startswith("/"), f"{page} loads {url}, not a local path"
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
    assert body["peer"] is not None  # the server saw the proxy's credentials on the socket
    assert off_machine(requested_urls(chrome)) == []


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
