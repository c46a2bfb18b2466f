"""``uds-client docs --output DIR`` and ``uds-client openapi --output FILE`` against a real server.

Rendering from ``file://`` in Chromium is checked in tests/browser/test_docs_browser.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from client.cli.docs_export import ASSETS, assets_directory, render
from tests.client.conftest import answering, json_answer, raw_server
from tests.support import http_over_uds, run_cli, short_tmpdir

_SPEC_TAG = re.compile(r'<script id="openapi-spec" type="application/json">(.*?)</script>', re.S)
_URL_ATTR = re.compile(r"""(?:src|href)\s*=\s*["']?([^"' >]+)""", re.I)


def served_spec(path: str) -> dict[str, object]:
    status, body = http_over_uds(path, "GET", "/openapi.json")
    assert status == 200
    spec: dict[str, object] = json.loads(body)
    return spec


def test_export_writes_pages_spec_and_assets(server_path: str, tmp_path: Path) -> None:
    out = tmp_path / "docs"
    result = run_cli("--socket", server_path, "docs", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    index, redoc = out / "index.html", out / "redoc.html"
    assert result.stdout.splitlines() == [
        f"Wrote {index}, {redoc}, {out / 'openapi.json'}, {out / 'assets'}",
        f"Open {index.as_uri()} (Swagger UI) or {redoc.as_uri()} (ReDoc)",
    ]
    spec = served_spec(server_path)
    assert json.loads((out / "openapi.json").read_text()) == spec
    for page, script in ((index, "assets/swagger-ui-bundle.js"), (redoc, "assets/redoc.standalone.js")):
        text = page.read_text()
        found = _SPEC_TAG.search(text)
        assert found, page
        assert json.loads(found.group(1)) == spec  # the spec is inlined, nothing is fetched
        assert f'src="{script}"' in text
        urls = _URL_ATTR.findall(text)
        assert urls, page
        assert all(u.startswith("assets/") for u in urls), urls  # only files next to the page
        markup = _SPEC_TAG.sub("", text)  # the spec's own prose may mention URLs; the page may not
        assert "http://" not in markup
        assert "https://" not in markup
    assert "supportedSubmitMethods: []" in index.read_text()  # no server behind a file:// page
    for name in ASSETS:
        assert (out / "assets" / name).read_bytes() == (assets_directory() / name).read_bytes(), name


def test_export_twice_replaces_the_files(server_path: str, tmp_path: Path) -> None:
    out = tmp_path / "docs"
    assert run_cli("--socket", server_path, "docs", "-o", str(out)).returncode == 0
    (out / "index.html").write_text("stale")
    assert run_cli("--socket", server_path, "docs", "-o", str(out)).returncode == 0
    assert "SwaggerUIBundle" in (out / "index.html").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["assets", "index.html", "openapi.json", "redoc.html"]


def test_spec_text_cannot_break_out_of_the_script_element() -> None:
    spec = {
        "openapi": "3.1.0",
        "info": {"title": "<b>T</b> & co", "version": "1"},
        "paths": {},
        "x-note": "</script><script>alert(1)</script><!-- \u2028 \u2029",
    }
    found = _SPEC_TAG.search(render(spec, "swagger"))
    assert found
    text = found.group(1)
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert json.loads(text) == spec
    for page in (render(spec, "swagger"), render(spec, "redoc")):
        assert page.count("</script>") == 3
        assert "<title>&lt;b&gt;T&lt;/b&gt; &amp; co - " in page
        found = _SPEC_TAG.search(page)
        assert found
        assert json.loads(found.group(1)) == spec


def test_unreachable_socket_exits_3(tmp_path: Path) -> None:
    directory = short_tmpdir("dx")
    path = str(directory / "none.sock")
    result = run_cli("--socket", path, "docs", "--output", str(tmp_path / "d"))
    assert result.returncode == 3
    assert result.stderr == f"Error: cannot connect to unix://{path} (no such file). Is the server running?\n"
    assert not (tmp_path / "d").exists()
    directory.rmdir()


def test_output_that_is_a_file_exits_2(server_path: str, tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    result = run_cli("--socket", server_path, "docs", "--output", str(target))
    assert result.returncode == 2
    assert result.stderr == f"Error: --output {str(target)!r} is a file, not a directory; name a directory\n"


def test_output_is_required() -> None:
    result = run_cli("--socket", "/tmp/x.sock", "docs")
    assert result.returncode == 2
    assert "--output" in result.stderr


def test_an_answer_that_is_not_openapi_exits_1(tmp_path: Path, tmp_short: Path) -> None:
    not_a_spec = json_answer(200, b'{"openapi": 3, "hello": "world"}', "OK")
    with raw_server(str(tmp_short / "spec.sock"), answering(not_a_spec)) as path:
        result = run_cli("--socket", path, "docs", "--output", str(tmp_path / "d"))
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: unix://{path} answered /openapi.json with something that is not an OpenAPI document\n"
    )


@pytest.mark.parametrize("flag", ["--output", "-o"])
def test_openapi_command_writes_the_served_spec(server_path: str, tmp_path: Path, flag: str) -> None:
    target = tmp_path / "openapi.json"
    result = run_cli("--socket", server_path, "openapi", flag, str(target))
    assert result.returncode == 0, result.stderr
    assert json.loads(target.read_text()) == served_spec(server_path)
