"""How the metrics are wired: ``app.metrics`` imports nothing from the layers above it, and the
``Metrics`` object is passed in, never looked up on the application."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

from app.config import Settings
from app.main import create_app
from app.metrics.exposition import Metrics
from tests.app.conftest import ASGIClient

METRICS = Path(__file__).resolve().parents[2] / "app" / "metrics"
ABOVE = ("app.connection", "app.storage", "app.api", "app.main", "app.serving", "app.__main__", "app.demo")


def test_the_metrics_package_imports_no_layer_above_it() -> None:
    """Before, ``app.metrics`` imported ``app.serving.workers``, which imports the server, which
    imports the metrics: a circle, hidden in a function and under TYPE_CHECKING."""
    found = []
    for path in sorted(METRICS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {name}" for name in names if name.startswith(ABOVE)]
    assert len(list(METRICS.glob("*.py"))) >= 4
    assert found == []


def test_the_app_shows_the_metrics_it_was_given(make_client: Callable[..., ASGIClient]) -> None:
    metrics = Metrics(shown_uids=[1000])
    metrics.recorder.refused("GET", 400, metrics.recorder.peer(1000))  # counted outside the app
    client = make_client(app=create_app(Settings(store="memory"), metrics=metrics))
    body = client.get("/metrics").text
    assert 'uds_requests_total{method="GET",route="unmatched",status="400"} 1.0' in body
    assert 'uds_peer_requests_total{uid="1000"} 1.0' in body
    assert not hasattr(client.app.state, "metrics")  # passed in, not parked on the app
