"""A real Prometheus (Debian's ``prometheus`` package) scrapes a real ``uds-server --metrics-listen``.

Both run on loopback ports with a temporary configuration and storage directory, offline. The test
polls Prometheus' HTTP API until the target is up and the POST counter equals the POSTs sent.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks._spawn import free_port
from tests.support import http_over_uds, require_tool, running_server, wait_until

POSTS = 25
CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: uds-example
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


@contextlib.contextmanager
def prometheus(target_port: int) -> Iterator[int]:
    """Run Prometheus scraping ``127.0.0.1:target_port`` every second; yield its API port."""
    binary = require_tool("prometheus")
    work = Path(tempfile.mkdtemp(prefix="uds-prom-"))
    (work / "prometheus.yml").write_text(CONFIG.format(port=target_port))
    port = free_port()
    with (work / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={work / 'prometheus.yml'}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
        try:
            wait_until(lambda: query(port, "up") is not None, timeout=60, what="Prometheus' API")
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(work, ignore_errors=True)


def query(port: int, expression: str) -> list[dict[str, object]] | None:
    """The instant vector of ``expression`` from Prometheus' HTTP API (None until it answers)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            data = json.load(answer)
    except urllib.error.HTTPError as exc:  # 503 while it starts
        exc.close()
        return None
    if data.get("status") != "success":
        return None
    result: list[dict[str, object]] = data["data"]["result"]
    return result


def value(port: int, expression: str) -> float | None:
    result = query(port, expression)
    if not result:
        return None
    sample = result[0]["value"]
    assert isinstance(sample, list)
    return float(sample[1])


@pytest.mark.parametrize("mode", [["--store", "memory"], ["--workers", "2"]], ids=["one-process", "workers"])
def test_prometheus_scrapes_the_server(mode: list[str]) -> None:
    metrics_port = free_port()
    with running_server(*mode, "--metrics-listen", f"127.0.0.1:{metrics_port}") as server:
        assert server.socket_path is not None
        for number in range(POSTS):
            status, _ = http_over_uds(
                server.socket_path,
                "POST",
                "/v1/messages",
                json.dumps({"text": f"message {number}"}).encode(),
                {"Content-Type": "application/json"},
            )
            assert status == 201
        with prometheus(metrics_port) as api:
            wait_until(lambda: value(api, 'up{job="uds-example"}') == 1, timeout=60, what="up == 1")
            posts = 'uds_requests_total{method="POST",route="/v1/messages",status="201"}'
            wait_until(lambda: value(api, posts) == POSTS, timeout=60, what=f"{posts} == {POSTS}")
            assert value(api, "uds_messages_stored_total") == POSTS
            assert (
                value(api, 'uds_request_duration_seconds_count{method="POST",route="/v1/messages"}') == POSTS
            )
            assert (value(api, "process_resident_memory_bytes") or 0) > 0
