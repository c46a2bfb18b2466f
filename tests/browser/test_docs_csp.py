"""The served docs pages run only their own scripts: markup injected into them cannot run any.

Swagger UI and ReDoc render text from the OpenAPI document and from the API's answers; should
either ever let markup through, a script it ran would read the proxy's token from the page's
address and call the API as the proxy's user. The pages' Content-Security-Policy admits their
own scripts by hash, not every inline script.
"""

from __future__ import annotations

import pytest
from selenium import webdriver

from tests.browser.test_docs_browser import REDOC_HEADING, SWAGGER_POST, wait_for_css, wait_for_xpath
from tests.client.test_proxy import Proxy

pytestmark = [pytest.mark.browser, pytest.mark.slow]

_INJECT = """
const done = arguments[arguments.length - 1];
window.injected = [];
const probe = document.createElement("div");
probe.innerHTML = '<img src="data:," onerror="window.injected.push(\\'onerror\\')">';
document.body.append(probe);
const script = document.createElement("script");
script.textContent = "window.injected.push('script')";
document.body.append(script);
setTimeout(() => done(window.injected), 500);
"""


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_injected_markup_runs_no_script_in_the_docs_pages(
    chrome: webdriver.Chrome, token_proxy: Proxy, page: str
) -> None:
    """Before: both the handler and the script ran (``'unsafe-inline'``), with the token in reach."""
    chrome.get(f"http://{token_proxy.host}{page}?token={token_proxy.token}")
    if page == "/docs":
        wait_for_css(chrome, SWAGGER_POST)
    else:
        wait_for_xpath(chrome, REDOC_HEADING.format("Send a message"))
    assert chrome.execute_async_script(_INJECT) == []
