"""Headless Chromium for the docs tests: Debian's chromium and chromedriver, driven by selenium.

Every test gets a fresh profile and a performance log, from which :func:`requested_urls` reads
every URL the page asked for (CDP ``Network.requestWillBeSent``). A missing browser fails the
test: it never skips. The browser resolves ``rebind.example`` to 127.0.0.1, as a DNS-rebinding
attacker's name would.

The proxy admits the browser by uid (the tests run as root, who owns the server's socket), or, with
``--token-only``, by the token that the docs page, opened at the proxy's tokened URL, sends.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from tests.client.test_proxy import Proxy
from tests.support import ROOT, ServerProcess, require_tool, running_server, short_tmpdir

ARTIFACTS = ROOT / "artifacts" / "browser"
REBIND_HOST = "rebind.example"
CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1280,1600",
    "--disable-dev-shm-usage",
    f"--host-resolver-rules=MAP {REBIND_HOST} 127.0.0.1",
)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def docs_server() -> Iterator[ServerProcess]:
    """A real uds-server on a short socket."""
    with running_server() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(docs_server: ServerProcess) -> Iterator[Proxy]:
    """``uds-client proxy`` on a free loopback port in front of ``docs_server``."""
    assert docs_server.socket_path is not None
    with Proxy(docs_server.socket_path) as running:
        running.wait_listening()
        yield running
        assert running.stop() == 0


@pytest.fixture(scope="module")
def proxy_port(proxy: Proxy) -> int:
    """The port of :func:`proxy`."""
    return proxy.port


@pytest.fixture(scope="module")
def token_proxy(docs_server: ServerProcess) -> Iterator[Proxy]:
    """``uds-client proxy --token-only`` in front of ``docs_server``: only its token opens it."""
    assert docs_server.socket_path is not None
    with Proxy(docs_server.socket_path, "--token-only") as running:
        running.wait_listening()
        yield running
        assert running.stop() == 0


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile and network events in its performance log."""
    binary = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    profile = short_tmpdir("chrome")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        # Leave the start page and drop its (internal chrome://) requests from the log.
        driver.get("about:blank")
        requested_urls(driver)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Network:
    """What the page asked for: ``sent`` went out; ``blocked`` the browser refused by policy (CSP)."""

    sent: list[str]
    blocked: list[str]


def network(driver: webdriver.Chrome) -> Network:
    """The page's requests since the last call, read from CDP Network events (the log is drained)."""
    urls: list[tuple[str, str]] = []
    blocked: set[str] = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            urls.append((params["requestId"], params["request"]["url"]))
        elif method == "Network.webSocketCreated":
            urls.append((params["requestId"], params["url"]))
        elif method == "Network.loadingFailed" and params.get("blockedReason"):
            blocked.add(params["requestId"])
    return Network(
        sent=[u for r, u in urls if r not in blocked], blocked=[u for r, u in urls if r in blocked]
    )


def requested_urls(driver: webdriver.Chrome) -> list[str]:
    """Every URL the page sent a request for since the last call (blocked attempts left out)."""
    return network(driver).sent


def off_machine(urls: list[str]) -> list[str]:
    """The URLs that would leave the machine (anything but loopback, file:, data: and blob:)."""
    bad = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("file", "data", "blob", "about"):
            continue
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname in LOCAL_HOSTS:
            continue
        bad.append(url)
    return bad


def screenshot(driver: webdriver.Chrome, name: str) -> Path:
    """Save a PNG of the page under artifacts/browser/ and return its path."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"could not save {path}"
    return path
