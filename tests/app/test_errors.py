"""One JSON error shape for every error, whatever the route."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from app.api.errors import error_response, validation_error
from app.config import Settings
from app.main import create_app
from tests.app.conftest import ASGIClient, assert_error


@pytest.mark.parametrize(
    "path", ["/nope", "/messages/1/extra", "/docs-assets/missing.js", "/", "/%00", "/a%0Ab", "/%E2%80%A8x"]
)
def test_unknown_route_is_404_json(client: ASGIClient, path: str) -> None:
    body = assert_error(client.get(path), 404, "not_found")
    assert "/docs" in body["message"]
    assert body["message"].isprintable(), body["message"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/messages", {"GET", "POST"}),
        ("PUT", "/messages", {"GET", "POST"}),
        ("PATCH", "/messages/1", {"GET"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/readyz", {"GET"}),
        ("POST", "/version", {"GET"}),
        ("POST", "/openapi.json", {"GET", "HEAD"}),
        ("POST", "/docs", {"GET"}),
        ("OPTIONS", "/messages", {"GET", "POST"}),
    ],
)
def test_wrong_method_is_405_with_allow(client: ASGIClient, method: str, path: str, allow: set[str]) -> None:
    response = client.request(method, path)
    body = assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["allow"].split(", ")) == allow
    assert method in body["message"]
    assert path in body["message"]


def test_validation_error_has_details(client: ASGIClient) -> None:
    body = assert_error(client.post("/messages", json={"text": 1, "extra": True}), 422, "validation_error")
    assert body["details"] == [
        {"type": "string_type", "loc": ["body", "text"], "msg": "Input should be a valid string"},
        {"type": "extra_forbidden", "loc": ["body", "extra"], "msg": "Extra inputs are not permitted"},
    ]
    assert body["message"] == "invalid request: text: Input should be a valid string (and 1 more)"


def test_validation_details_never_echo_the_input(client: ASGIClient) -> None:
    secret = "s3cr3t-value"
    for response in (
        client.post("/messages", json={"text": secret * 1000}),
        client.get(f"/messages?limit={secret}"),
        client.get(f"/messages/{secret}"),
    ):
        body = assert_error(response, 422)
        assert secret not in response.text, body


def test_unexpected_exception_is_500_json_without_internals(make_client: Callable[..., ASGIClient]) -> None:
    app = create_app(Settings(store="memory"))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("database password is hunter2")

    response = make_client(app=app, raise_app_exceptions=False).get("/boom")
    body = assert_error(response, 500, "internal_error")
    assert "hunter2" not in response.text
    assert "server log" in body["message"]


def test_http_exception_detail_is_the_message(make_client: Callable[..., ASGIClient]) -> None:
    from fastapi import HTTPException

    app = create_app(Settings(store="memory"))

    @app.get("/teapot")
    async def teapot() -> None:
        raise HTTPException(503, "warming up; try again in a second")

    body = assert_error(make_client(app=app).get("/teapot"), 503, "unavailable")
    assert body["message"] == "warming up; try again in a second"


def test_error_response_helpers() -> None:
    import orjson

    expected = {"error": "payload_too_large", "message": "too big", "status": 413}
    assert orjson.loads(error_response(413, "too big").body) == expected
    assert orjson.loads(error_response(418, "odd").body) == {
        "error": "error",
        "message": "odd",
        "status": 418,
    }
    with_details = orjson.loads(
        error_response(422, "bad", details=[{"type": "t", "loc": ["body"], "msg": "m"}]).body
    )
    assert with_details["details"] == [{"type": "t", "loc": ["body"], "msg": "m"}]
    raw = [{"type": "missing", "loc": ("body", "text"), "msg": "Field required", "input": {}}]
    invalid = orjson.loads(validation_error(raw).body)
    assert invalid["details"] == [{"type": "missing", "loc": ["body", "text"], "msg": "Field required"}]
    assert invalid["message"] == "invalid request: text: Field required"
    assert orjson.loads(error_response(422).body)["message"] == "the request is invalid"
    for status in (400, 403, 404, 405, 408, 413, 415, 422, 500, 503):
        assert orjson.loads(error_response(status).body)["error"] not in ("", "error"), status
