"""The proxy's access decision, without sockets: each case is a request head, a caller and the rules."""

from __future__ import annotations

import pytest

from client.cli.proxy.access import Admit, Refuse, Rules, decide, split_token
from client.cli.proxy.caller import Caller

HOST = b"127.0.0.1:8080"
TOKEN = "s3cret"
RULES = Rules(frozenset({"127.0.0.1:8080", "localhost:8080", "[::1]:8080"}), TOKEN, url="unix:///s.sock")
TOKEN_ONLY = Rules(RULES.hosts, TOKEN, token_only=True, url=RULES.url)
ROOT = Caller(uid=0, gid=0, pid=42, groups=frozenset({0}), source="process")
STRANGER = Caller(uid=65534, gid=-1, pid=0, groups=None, source="none")
SKIPPED = Caller(uid=65534, gid=-1, pid=0, groups=None, source="skipped")
MEMBER = Caller(uid=4000, gid=4000, pid=7, groups=frozenset({4000, 12}), source="process")
MODE = "mode 0660, owner 0, group 12"


def head(target: bytes = b"/messages", **fields: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"host", HOST), *((name.replace("_", "-").encode(), value) for name, value in fields.items())]


CASES = [
    # (case, target, header fields, caller, may_connect, rules, expected)
    ("uid admitted", b"/m", head(), ROOT, True, RULES, Admit(b"/m", "uid")),
    ("uid first, a wrong token ignored", b"/m", head(uds_proxy_token=b"x"), ROOT, True, RULES,
     Admit(b"/m", "uid")),
    ("token header", b"/m", head(uds_proxy_token=b"s3cret"), STRANGER, False, RULES, Admit(b"/m", "token")),
    ("token in the URL, removed", b"/m?a=1&token=s3cret", head(), None, False, RULES,
     Admit(b"/m?a=1", "token")),
    ("header wins over the URL", b"/m?token=x", head(uds_proxy_token=b"s3cret"), None, False, RULES,
     Admit(b"/m", "token")),
    ("token-only ignores the uid", b"/m", head(), ROOT, True, TOKEN_ONLY,
     Refuse(403, "this proxy admits only requests with its token; open the URL with the token that the proxy "
            "printed at start")),
    ("token-only with the token", b"/m?token=s3cret", head(), ROOT, True, TOKEN_ONLY, Admit(b"/m", "token")),
    ("wrong token", b"/m", head(uds_proxy_token=b"s3cre"), STRANGER, False, RULES,
     Refuse(403, "wrong token; open the URL the proxy printed at start")),
    ("wrong token in the URL", b"/m?%74oken=no", head(), None, False, RULES,
     Refuse(403, "wrong token; open the URL the proxy printed at start")),
    ("unknown caller", b"/m", head(), None, False, RULES,
     Refuse(403, "the proxy cannot tell who opened this connection (not a socket of this machine); open the "
            "URL with the token that the proxy printed at start")),
    ("groups unknown", b"/m", head(), STRANGER, False, RULES,
     Refuse(403, f"uid 65534 may not connect to unix:///s.sock ({MODE}; groups unknown: its process is not "
            "visible to the proxy, so the group's bits do not count); open the URL with the token that the "
            "proxy printed at start")),
    ("groups not looked up", b"/m", head(), SKIPPED, False, RULES,
     Refuse(403, f"uid 65534 may not connect to unix:///s.sock ({MODE}; groups not looked up: none would let "
            "it in); open the URL with the token that the proxy printed at start")),
    ("groups of its process", b"/m", head(), MEMBER, False, RULES,
     Refuse(403, f"uid 4000 may not connect to unix:///s.sock ({MODE}; groups 12,4000 of its process); open "
            "the URL with the token that the proxy printed at start")),
    ("no Host", b"/m", [], ROOT, True, RULES,
     Refuse(400, "the request has no Host header; send Host: 127.0.0.1:PORT")),
    ("foreign Host", b"/m", [(b"host", b"evil.example")], ROOT, True, RULES,
     Refuse(421, "this proxy does not answer for host 'evil.example'; use 127.0.0.1:8080 or [::1]:8080 or "
            "localhost:8080 (or start it with --allow-host)")),
    ("Host case does not matter", b"/m", [(b"host", b"LOCALHOST:8080")], ROOT, True, RULES,
     Admit(b"/m", "uid")),
    ("Host with control characters is escaped", b"/m", [(b"host", b"a\x1b[2J")], ROOT, True, RULES,
     Refuse(421, "this proxy does not answer for host 'a\\\\x1b[2J'; use 127.0.0.1:8080 or [::1]:8080 or "
            "localhost:8080 (or start it with --allow-host)")),
    ("own Origin", b"/m", head(origin=b"http://localhost:8080"), ROOT, True, RULES, Admit(b"/m", "uid")),
    ("cross Origin, even with the token", b"/m?token=s3cret", head(origin=b"http://evil.example"), ROOT, True,
     RULES, Refuse(403, "cross-origin requests are refused (Origin 'http://evil.example'); open the page "
                   "from the proxy's own address")),
    ("https Origin is not the proxy's", b"/m", head(origin=b"https://127.0.0.1:8080"), ROOT, True, RULES,
     Refuse(403, "cross-origin requests are refused (Origin 'https://127.0.0.1:8080'); open the page from "
            "the proxy's own address")),
    ("null Origin", b"/m", head(origin=b"null"), ROOT, True, RULES,
     Refuse(403, "cross-origin requests are refused (Origin 'null'); open the page from the proxy's own "
            "address")),
    ("both framings", b"/m", head(content_length=b"1", transfer_encoding=b"chunked"), ROOT, True, RULES,
     Refuse(400, "the request has both Content-Length and Transfer-Encoding; send one")),
    ("101 fields", b"/m", head() + [(b"x-%d" % i, b"1") for i in range(100)], ROOT, True, RULES,
     Refuse(431, "the request has more than 100 header fields")),
    ("a head over 32 KiB", b"/m", head(x_big=b"a" * 32_768), ROOT, True, RULES,
     Refuse(431, "the request head is over 32768 bytes")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "fields", "caller", "may_connect", "rules", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    target: bytes,
    fields: list[tuple[bytes, bytes]],
    caller: Caller | None,
    may_connect: bool,
    rules: Rules,
    expected: Admit | Refuse,
) -> None:
    permissions = MODE if caller is not None and not may_connect else ""
    got = decide(b"GET", target, fields, rules, caller, may_connect=may_connect, permissions=permissions)
    assert got == expected


def test_the_head_size_counts_the_request_line_and_every_field() -> None:
    # "GET /abc HTTP/1.1\r\n" + "host: ...\r\n" + "x: yyy...\r\n": method, target and 11; name, value and 4.
    room = 32_768 - (3 + 4 + 11 + (4 + len(HOST) + 4) + (1 + 0 + 4))

    def judged(size: int) -> Admit | Refuse:
        return decide(b"GET", b"/abc", [(b"host", HOST), (b"x", b"y" * size)], RULES, ROOT, may_connect=True)

    assert judged(room) == Admit(b"/abc", "uid")
    assert judged(room + 1) == Refuse(431, "the request head is over 32768 bytes")
    assert judged(100) == Admit(b"/abc", "uid")


@pytest.mark.parametrize(
    ("target", "token", "rest"),
    [
        (b"/docs", None, b"/docs"),
        (b"/docs?token=t", b"t", b"/docs"),
        (b"/h?a=%FF&%74oken=t&b=x+y&c", b"t", b"/h?a=%FF&b=x+y&c"),
        (b"/h?tok%65n=t&d=%2F%20", b"t", b"/h?d=%2F%20"),
        (b"/h?token=a&token=b", b"b", b"/h"),
        (b"/h?to+ken=t", None, b"/h?to+ken=t"),
        (b"/h?token=a%2Bb+c", b"a+b c", b"/h"),
        (b"/h?tokens=t", None, b"/h?tokens=t"),
    ],
)
def test_split_token_reads_names_as_a_page_does(target: bytes, token: bytes | None, rest: bytes) -> None:
    assert split_token(target) == (token, rest)
