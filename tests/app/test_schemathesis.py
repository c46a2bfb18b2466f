"""Property-based API testing with schemathesis against the app in-process.

Every operation in ``/openapi.json`` gets at least 200 generated requests, valid and invalid
(positive and negative generation), and every response is held to all of schemathesis's checks:
no 500s, documented status codes, content types and headers, responses matching their schemas,
invalid data rejected and valid data accepted.
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
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(max_examples=EXAMPLES)


def test_every_operation_is_exercised() -> None:
    operations = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert operations == {
        ("POST", "/messages"),
        ("GET", "/messages"),
        ("GET", "/messages/{message_id}"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/version"),
    }


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
