"""Request and response schemas: the one definition of the API that OpenAPI, the validation of
``POST /messages`` (:func:`message_in_model`) and the tests share."""

import json
import tomllib
from functools import cache, lru_cache
from importlib import resources
from string import Template
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model


@cache
def _words() -> dict[str, Any]:
    return tomllib.loads(resources.files("app.api").joinpath("openapi.toml").read_text("utf-8"))


def describe(name: str, **values: object) -> str:
    """The OpenAPI text ``name`` of ``app/api/openapi.toml``, its ``$placeholders`` filled in."""
    return Template(_words()[name]).substitute(values)


def operation(name: str, **values: object) -> dict[str, Any]:
    """A route's ``operation_id`` (``name``), ``summary`` and ``description`` (as :func:`describe`)."""
    words = _words()[name]
    description = Template(words["description"]).substitute(values)
    return {"operation_id": name, "summary": words["summary"], "description": description}


def answer(
    model: type[BaseModel], example: Any, description: str = "Successful Response", **more: Any
) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry: ``model`` as its JSON schema, with ``example`` (and ``more``)."""
    content = {"application/json": {"example": example}}
    return {"model": model, "description": description, "content": content, **more}


# The OpenAPI examples, links and headers of ``app/api/openapi-parts.json``.
PARTS: dict[str, Any] = json.loads(
    resources.files("app.api").joinpath("openapi-parts.json").read_text("utf-8")
)


class MessageIn(BaseModel):
    """What a client sends to ``POST /messages``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"text": "Hello from client"}]})

    text: str


@lru_cache(maxsize=8)
def message_in_model(max_text_length: int) -> type[MessageIn]:
    """``MessageIn`` with the server's text limit (the model the server documents and validates with)."""
    text_type = Annotated[str, StringConstraints(min_length=1, max_length=max_text_length)]
    description = "The message, 1 to max_text_length characters."
    text = (text_type, Field(description=description))
    return create_model("MessageIn", __base__=MessageIn, __doc__=MessageIn.__doc__, text=text)


_VIA_PROXY = "Set when the peer is `uds-client proxy`: the user it admitted."


class ForwardedPeer(BaseModel):
    """The caller a proxy on the socket named (``Uds-Forwarded-Peer``); a claim made by that peer."""

    uid: int
    gid: int = Field(description="-1 when the proxy could not see the caller's groups.")
    pid: int = Field(description="0 when the proxy could not see the caller's process.")


class Peer(BaseModel):
    """Credentials of the process on the other end of the Unix socket (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    forwarded_for: ForwardedPeer | None = Field(default=None, description=_VIA_PROXY)


class ForwardedCaller(ForwardedPeer):
    """The user behind a proxy, with the scopes it holds itself (by uid and gid)."""

    scopes: list[str]


class WhoAmI(BaseModel):
    """The caller as the server sees it, and the scopes it holds (``GET /whoami``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [PARTS["whoami"]]})

    uid: int | None = Field(description="SO_PEERCRED; null over TCP.")
    gid: int | None
    pid: int | None
    groups: list[int] = Field(description="Supplementary groups, as the kernel reports them (SO_PEERGROUPS).")
    scopes: list[str] = Field(
        description="Scopes this call holds (read, write, events, metrics); through a proxy, those "
        "both the proxy and the user behind it hold."
    )
    forwarded_for: ForwardedCaller | None = Field(default=None, description=_VIA_PROXY)


class Message(BaseModel):
    """A stored message and the server's reply."""

    model_config = ConfigDict(json_schema_extra={"examples": [PARTS["message"]]})

    id: int = Field(description="Increasing number, unique for the server's lifetime.")
    text: str = Field(description="The text the client sent.")
    reply: str = Field(description="The server's answer.")
    received_at: str = Field(description="When the server stored it, RFC 3339 in UTC.")
    peer: Peer | None = Field(description="The sender's pid/uid/gid; null over TCP.")


class MessageList(BaseModel):
    """The most recent messages, oldest first."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"messages": [PARTS["message"]]}]})

    messages: list[Message]


class HealthStatus(BaseModel):
    """Liveness: the process answers."""

    status: Literal["ok"]


class ReadyStatus(BaseModel):
    """Readiness: ``ready``, or ``draining`` while the server shuts down."""

    status: Literal["ready", "draining"]


class VersionInfo(BaseModel):
    """Versions of the server, the stack under it, and the API versions it serves."""

    model_config = ConfigDict(extra="allow")

    app: str
    python: str
    uvicorn: str
    fastapi: str
    starlette: str
    pydantic: str
    orjson: str
    api_version: str = Field(description="The newest API version served (`Api-Version` of `/_ping`).")
    min_api_version: str = Field(description="The oldest API version served (`Min-Api-Version` of `/_ping`).")


class ErrorDetail(BaseModel):
    """One validation problem: where (``loc``), what kind (``type``) and a sentence (``msg``)."""

    type: str
    loc: list[str | int]
    msg: str


class ErrorBody(BaseModel):
    """The one shape of every error the API answers."""

    error: str = Field(description="Short machine-readable code, e.g. not_found.")
    message: str = Field(description="One line for a person: what failed and what to do.")
    status: int = Field(description="The HTTP status code, repeated.")
    details: list[ErrorDetail] | None = Field(default=None, description="Validation problems (422 only).")
