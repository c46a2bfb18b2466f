"""The hand-run examples of the README and docs/api.md work as written: each `$ command` in their
console blocks is run against a fresh `uds-server --socket <short path>` (one per file) and its
output compared with the page's.

Values that differ from run to run (timestamps, the peer's ids, versions) are compared by type.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, require_tool, running_server, short_tmpdir

README = ROOT / "README.md"
API_DOC = ROOT / "docs" / "api.md"
README_SOCKET = "/tmp/x/csi.sock"
VARIABLE_KEYS = {"received_at", "pid", "uid", "gid"}


def console_examples(page: Path) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) for every `$ ` line of the page's console blocks."""
    text = page.read_text(encoding="utf-8")
    examples: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```console\n(.*?)```", text, flags=re.DOTALL):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:], []))
            elif examples:
                examples[-1][1].append(line)
    return examples


def normalise(value: Any, key: str | None = None, *, versions: bool = False) -> Any:
    if isinstance(value, dict):
        is_versions = "uvicorn" in value and "fastapi" in value
        return {k: normalise(v, k, versions=is_versions) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    if versions or key in VARIABLE_KEYS:
        return type(value).__name__
    return value


def same_output(expected: str, actual: str) -> bool:
    if expected == actual:
        return True
    try:
        return bool(normalise(json.loads(expected)) == normalise(json.loads(actual)))
    except ValueError:
        return False


def test_docs_have_examples_for_every_endpoint() -> None:
    commands = " ".join(command for page in (README, API_DOC) for command, _ in console_examples(page))
    for path in (
        "/healthz",
        "/readyz",
        "/version",
        "/messages",
        "/messages/1",
        "/openapi.json",
        "/docs",
        "/redoc",
        "Idempotency-Key",
    ):
        assert path in commands, f"neither the README nor docs/api.md has a curl example for {path}"


@pytest.mark.parametrize(("page", "at_least"), [(README, 5), (API_DOC, 15)], ids=["README", "api"])
def test_console_examples_work_verbatim(page: Path, at_least: int) -> None:
    require_tool("curl")
    examples = console_examples(page)
    assert len(examples) >= at_least, f"the console examples of {page.name} were not found"
    tmp = short_tmpdir()
    socket_path = str(tmp / "csi.sock")
    bin_dir = str(Path(os.environ.get("VIRTUAL_ENV", "")) / "bin") if os.environ.get("VIRTUAL_ENV") else None
    env = dict(os.environ)
    import sys

    env["PATH"] = os.pathsep.join(p for p in (str(Path(sys.executable).parent), bin_dir, env["PATH"]) if p)
    with running_server(tmp=tmp) as server:
        # running_server picks s.sock; the pages name csi.sock: serve that name too.
        assert server.socket_path
        os.symlink(server.socket_path, socket_path)
        for command, expected_lines in examples:
            assert README_SOCKET in command or "/nonexistent/" in command, command
            run = command.replace(README_SOCKET, socket_path)
            result = subprocess.run(
                ["bash", "-c", run + " 2>&1"],
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
                check=False,
            )
            actual_lines = result.stdout.replace(socket_path, README_SOCKET).splitlines()
            assert len(actual_lines) == len(expected_lines), (command, result.stdout)
            for expected, actual in zip(expected_lines, actual_lines, strict=True):
                assert same_output(expected, actual), f"{command}\nexpected: {expected}\nactual:   {actual}"


@pytest.mark.parametrize("command", ["./scripts/demo", "./scripts/test"])
def test_quick_start_commands_exist(command: str) -> None:
    text = README.read_text(encoding="utf-8")
    assert f"{command} " in text
    path = ROOT / command
    assert path.is_file()
    assert os.access(path, os.X_OK)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "exec scripts/test" in ci
