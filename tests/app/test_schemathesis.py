"""Property-based API testing with schemathesis against the app in-process.

Every operation in ``/openapi.json`` gets at least 200 generated requests, valid and invalid
(positive and negative generation), and every response is held to all of schemathesis's checks:
no 500s, documented status codes, content types and headers, responses matching their schemas,
invalid data rejected and valid data accepted.

The document is the versioned one: each API operation once, under ``/v1``, plus the unversioned
``/_ping``, probes and metrics. ``GET /v1/events`` is left out of generation: an event stream
follows live and never ends, so a generated call would never return (tests/app/test_events*.py
cover it, over real sockets).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from app.config import Settings
from app.main import create_app

EXAMPLES = 200

# A small history and key memory so generated traffic also runs into the bounds.
SETTINGS = Settings(history_size=50, idempotency_keys=20, max_text_length=64, store="memory")
APP = create_app(SETTINGS)
DOCUMENT = schemathesis.openapi.from_asgi("/openapi.json", APP)
STREAMS = {("GET", "/v1/events")}
schema = DOCUMENT.exclude(path=[path for _, path in STREAMS])
schema.config.generation.update(max_examples=EXAMPLES)


def _operations(document: Any) -> set[tuple[str, str]]:
    return {(op.method.upper(), op.path) for op in (r.ok() for r in document.get_all_operations())}


def test_every_operation_is_exercised() -> None:
    assert _operations(DOCUMENT) == {
        ("POST", "/v1/messages"),
        ("GET", "/v1/messages"),
        ("GET", "/v1/messages/{message_id}"),
        ("GET", "/v1/version"),
        ("GET", "/v1/events"),
        ("GET", "/v1/whoami"),
        ("GET", "/_ping"),
        ("HEAD", "/_ping"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/metrics"),
    }
    assert _operations(schema) == _operations(DOCUMENT) - STREAMS


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate()


class Workflow(schema.as_state_machine()):  # type: ignore[misc]
    """Sequences of calls following the OpenAPI links (POST /messages, then GET /messages/{id})."""

    def setup(self) -> None:
        """Each sequence starts from an empty server (a fresh app), so replays see the same state."""
        self.app = create_app(SETTINGS)

    def call(self, case: schemathesis.Case, **kwargs: Any) -> Any:
        return case.call(app=self.app, **kwargs)


@pytest.mark.slow
class TestStatefulWorkflow(Workflow.TestCase):  # type: ignore[name-defined,misc]
    settings = settings(
        max_examples=100, deadline=None, stateful_step_count=8, suppress_health_check=list(HealthCheck)
    )
