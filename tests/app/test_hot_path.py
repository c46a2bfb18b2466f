"""The lean ``POST /messages`` path answers exactly as its documented pydantic model would.

The endpoint parses with orjson and validates by hand; these tests hold it to ``MessageIn``
(the schema in OpenAPI) on generated corpora of valid and invalid bodies: same verdict, same
status, same error types and locations. The one deliberate difference: the lean path follows
RFC 8259 strictly, so ``NaN``/``Infinity`` literals (which pydantic's JSON parser tolerates) are
``invalid_json``; the answer is a 422 either way.
"""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.config import Settings
from app.main import create_app
from app.models import Message, message_in_model
from app.routes.messages import LeanRoute, check_text_body
from tests.app.conftest import PEER, ASGIClient

MAX = 5
MODEL = message_in_model(MAX)

finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=4), inner, max_size=3), max_leaves=6)
edges = st.sampled_from(["", "a", "x" * MAX, "x" * (MAX + 1), "é" * MAX])
texts = st.text(min_size=0, max_size=MAX + 2) | edges
keys = st.sampled_from(["text", "extra", "Text", "text ", ""]) | st.text(max_size=4)
objects = st.dictionaries(keys, json_values | texts, max_size=4) | st.fixed_dictionaries(
    {"text": texts | json_values}, optional={"extra": json_values, "id": st.integers()}
)
bodies = objects | json_values


def pydantic_verdict(raw: bytes) -> tuple[str | None, list[tuple[str, tuple[Any, ...]]]]:
    """What ``MessageIn`` says: ``(text, [])`` or ``(None, [(type, ("body", *loc)), ...])``."""
    try:
        return MODEL.model_validate_json(raw).text, []
    except pydantic.ValidationError as exc:
        return None, [(e["type"], ("body", *e["loc"])) for e in exc.errors()]


def lean_verdict(data: object) -> tuple[str | None, list[tuple[str, tuple[Any, ...]]]]:
    text, details = check_text_body(data, MAX)
    return text, [(d["type"], tuple(d["loc"])) for d in details]


@settings(max_examples=1500, deadline=None)
@given(bodies)
@example({"text": "x" * MAX, "extra": 1})
@example({"text": 5, "other": None})
@example({})
@example([])
@example("text")
@example({"text": ""})
@example({"text": "x" * (MAX + 1)})
@example({"text": "\U0001f600" * MAX})
def test_hand_validation_matches_the_model(data: Any) -> None:
    raw = json.dumps(data).encode()
    assert lean_verdict(data) == pydantic_verdict(raw), raw


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies, st.booleans())
def test_endpoint_answers_like_the_model(data: Any, ascii_only: bool) -> None:
    raw = json.dumps(data, ensure_ascii=ascii_only).encode()
    expected_text, expected_errors = pydantic_verdict(raw)
    client = ASGIClient(create_app(Settings(max_text_length=MAX)), PEER)
    try:
        response = client.post("/messages", content=raw, headers={"content-type": "application/json"})
    finally:
        client.close()
    if expected_text is not None:
        assert response.status_code == 201, response.text
        Message.model_validate_json(response.content, strict=True)
        assert response.json()["text"] == expected_text
    else:
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "validation_error"
        assert [(d["type"], tuple(d["loc"])) for d in body["details"]] == expected_errors


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40) | bodies.map(lambda d: json.dumps(d).encode()).flatmap(
    lambda raw: st.integers(0, max(len(raw) - 1, 0)).map(lambda i: raw[:i] + raw[i + 1:])))
def test_any_bytes_get_the_models_verdict(raw: bytes) -> None:
    """Arbitrary and truncated bodies: accepted exactly when the model accepts them, else a 422."""
    expected_text, _ = pydantic_verdict(raw)
    client = ASGIClient(create_app(Settings(max_text_length=MAX)), PEER)
    try:
        response = client.post("/messages", content=raw, headers={"content-type": "application/json"})
    finally:
        client.close()
    if expected_text is not None and not _has_nonstandard_literal(raw):
        assert response.status_code == 201, (raw, response.text)
        assert response.json()["text"] == expected_text
    else:
        assert response.status_code == 422, (raw, response.text)
        assert response.json()["error"] in {"invalid_json", "validation_error"}


def _has_nonstandard_literal(raw: bytes) -> bool:
    """True when the body only parses thanks to NaN/Infinity (not JSON by RFC 8259)."""
    def refuse(name: str) -> float:
        raise ValueError(name)

    try:
        json.loads(raw, parse_constant=refuse)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("raw", [b'{"text": NaN}', b'{"text": "a", "x": Infinity}'])
def test_nan_and_infinity_are_invalid_json(client: ASGIClient, raw: bytes) -> None:
    response = client.post("/messages", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_json"


def test_the_hot_route_is_a_documented_lean_route() -> None:
    app = create_app(Settings())
    routes = [r for r in app.routes
              if isinstance(r, APIRoute) and r.path == "/messages" and "POST" in r.methods]
    assert len(routes) == 1
    route = routes[0]
    assert isinstance(route, LeanRoute)
    assert route.dependant.dependencies == []
    assert route.body_field is None
    assert app.user_middleware == [], "no middleware on the hot path when no allowlist is set"
    body = app.openapi()["paths"]["/messages"]["post"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    assert schema == message_in_model(4096).model_json_schema()

