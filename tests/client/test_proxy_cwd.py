"""The proxy judges an absolute socket path without its working directory, which may be gone."""

from __future__ import annotations

import shutil

from tests.client.test_proxy import Proxy, http_get, unix_server
from tests.support import short_tmpdir


def test_a_proxy_whose_working_directory_was_removed_still_admits_by_uid() -> None:
    workdir = short_tmpdir("cwd")
    with unix_server() as server, Proxy(server.path, wrapper=("env", "-C", str(workdir))) as proxy:
        proxy.wait_listening()
        shutil.rmtree(workdir)  # the directory the proxy was started in goes away
        status, body = http_get(proxy.port, "/healthz")
        assert (status, body) == (200, {"status": "ok", "target": "/healthz"}), proxy.output
        proxy.wait_output(r"GET /healthz -> \S+ \(admitted by uid\)")
