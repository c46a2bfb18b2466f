"""Whether the proxy forwards a request: a pure function of its head, its caller and the rules
(docs/internals.md, "The proxy": Host, Origin, then the caller's uid or the token)."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from client.cli.proxy.caller import Caller

FORWARDED_HEADER = b"uds-forwarded-peer"  # names the caller to the server, which records it
TOKEN_HEADER = b"uds-proxy-token"  # carries the token (the docs pages send it); never forwarded
MAX_HEAD_BYTES = 32 * 1024  # the server's own limits
MAX_HEADERS = 100


@dataclass(frozen=True, slots=True)
class Rules:
    """The ``Host`` values answered, the token, whether uids count, the socket's URL (for refusals)."""

    hosts: frozenset[str]
    token: str
    token_only: bool = False
    url: str = ""


@dataclass(frozen=True, slots=True)
class Admit:
    target: bytes  # without the token
    by: str  # "uid" or "token"


@dataclass(frozen=True, slots=True)
class Refuse:
    status: int
    reason: str


def decide(
    method: bytes,
    target: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    rules: Rules,
    caller: Caller | None = None,
    may_connect: bool = False,  # whether the socket's permissions let ``caller`` connect
    permissions: str = "",  # those permissions, quoted in a refusal
) -> Admit | Refuse:
    """Admit or refuse a request (lower-case header names) of ``caller`` (None: not of this machine)."""
    fields = list(headers)
    last = dict(fields)  # the last value of each name
    if len(fields) > MAX_HEADERS:
        return Refuse(431, f"the request has more than {MAX_HEADERS} header fields")
    # h11 bounds a head that arrives in pieces; one that arrived whole is measured here.
    if len(method) + len(target) + 11 + sum(len(n) + len(v) + 4 for n, v in fields) > MAX_HEAD_BYTES:
        return Refuse(431, f"the request head is over {MAX_HEAD_BYTES} bytes")
    host, origin = last.get(b"host"), last.get(b"origin")
    if host is None:
        return Refuse(400, "the request has no Host header; send Host: 127.0.0.1:PORT")
    # RFC 9112 section 6.1: both framings are a sign of request smuggling.
    if b"content-length" in last and b"transfer-encoding" in last:
        return Refuse(400, "the request has both Content-Length and Transfer-Encoding; send one")
    if host.decode("latin-1").lower() not in rules.hosts:
        why = f"this proxy does not answer for host {shown(host)!r}; use {' or '.join(sorted(rules.hosts))}"
        return Refuse(421, f"{why} (or start it with --allow-host)")
    if origin is not None and origin.decode("latin-1").lower() not in {f"http://{h}" for h in rules.hosts}:
        why = f"cross-origin requests are refused (Origin {shown(origin)!r})"
        return Refuse(403, f"{why}; open the page from the proxy's own address")
    in_url, target = split_token(target)
    given = last.get(TOKEN_HEADER, in_url)
    # Admitted (and named) by uid, token or not: the docs page sends the token with every request.
    if not rules.token_only and caller is not None and may_connect:
        return Admit(target, "uid")
    if given is not None:
        if not hmac.compare_digest(given, rules.token.encode()):
            return Refuse(403, "wrong token; open the URL the proxy printed at start")
        return Admit(target, "token")
    if rules.token_only:
        why = "this proxy admits only requests with its token"
    elif caller is None:
        why = "the proxy cannot tell who opened this connection (not a socket of this machine)"
    else:
        why = f"uid {caller.uid} may not connect to {rules.url} ({permissions}; groups {_groups(caller)})"
    return Refuse(403, f"{why}; open the URL with the token that the proxy printed at start")


def _groups(caller: Caller) -> str:
    if caller.source == "skipped":
        return "not looked up: none would let it in"
    if caller.groups is None:
        return "unknown: its process is not visible to the proxy, so the group's bits do not count"
    return f"{','.join(map(str, sorted(caller.groups))) or 'none'} of its process"


def split_token(target: bytes) -> tuple[bytes | None, bytes]:
    """The last ``token=`` of ``target``'s query (read as ``URLSearchParams`` does), and the rest."""
    path, sep, query = target.partition(b"?")
    if not sep or (b"token" not in query and b"%" not in query):
        return None, target
    given = None
    kept = []
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if unquote_to_bytes(name.replace(b"+", b" ")) == b"token":
            given = unquote_to_bytes(value.replace(b"+", b" "))
        else:
            kept.append(pair)
    if given is None:
        return None, target
    return given, path + (b"?" + b"&".join(kept) if kept else b"")


def shown(value: bytes | str, limit: int = 200) -> str:
    """Text from outside as it goes into one log line or message: control characters escaped, cut."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
