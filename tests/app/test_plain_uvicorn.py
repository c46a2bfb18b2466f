"""The plain ``uvicorn app.main:app --uds PATH`` form serves the same API, settings from the env."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

from tests.support import http_over_uds, short_tmpdir, socket_accepts, wait_until


def test_plain_uvicorn_command_serves_the_api_with_env_settings() -> None:
    directory = short_tmpdir("plain")
    path = str(directory / "csi.sock")
    # The durable store in the test's directory: the plain form prepares it too, on first access.
    env = {
        **os.environ,
        "UDS_MAX_TEXT_LENGTH": "5",
        "UDS_REPLY": "plain reply",
        "UDS_DATA_DIR": str(directory / "data"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--uds", path, "--no-access-log"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        wait_until(
            lambda: proc.poll() is None and socket_accepts(path), timeout=15, what=f"plain uvicorn on {path}"
        )
        status, body = http_over_uds(
            path, "POST", "/messages", body=b'{"text": "hi"}', headers={"Content-Type": "application/json"}
        )
        assert status == 201
        assert (directory / "data" / "messages.sqlite3").is_file(), "the message went to the durable store"
        message = json.loads(body)
        assert message["reply"] == "plain reply"
        # No SO_PEERCRED without uds-server's protocol class: the peer is unknown, not invented.
        assert message["peer"] is None
        status, body = http_over_uds(
            path,
            "POST",
            "/messages",
            body=b'{"text": "too long"}',
            headers={"Content-Type": "application/json"},
        )
        assert status == 422
        assert json.loads(body)["error"] == "validation_error"
        status, _ = http_over_uds(path, "GET", "/readyz")
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        shutil.rmtree(directory, ignore_errors=True)
    assert "📩 Server received: hi" in output
