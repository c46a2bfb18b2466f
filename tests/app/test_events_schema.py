"""``GET /v1/events`` against its OpenAPI description, live: schemathesis with every check, through
``uds-client proxy`` to a real server, reading the streams it opens (the in-process run in
tests/app/test_schemathesis.py leaves the stream out: it never ends)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.config import Settings
from app.main import create_app
from tests.app.test_events import Poster, _path
from tests.client.test_proxy import Proxy
from tests.support import running_server

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")


def test_the_event_stream_is_described_as_openapi_3_2_describes_one() -> None:
    document = create_app(Settings(store="memory")).openapi()
    content = document["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/event-stream"]
    described = content["text/event-stream"]
    assert "schema" not in described  # in 3.2 it would describe the whole stream
    item = described["itemSchema"]
    assert set(item["properties"]) == {"event", "data", "id", "retry"}
    message = next(one for one in item["oneOf"] if one["properties"]["event"] == {"const": "message"})
    assert message["properties"]["data"] == {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"$ref": "#/components/schemas/Message"},
    }


def test_schemathesis_with_every_check_passes_on_a_live_stream(tmp: Path) -> None:
    """Before: ST108, "SSE event violates schema" (the stream was declared ``{"type": "string"}``)."""
    # The proxy lets go of a stream whose client has left only when the stream next writes (a
    # heartbeat, within 5 s): enough slots that the run never meets the per-uid share (a 503).
    with (
        running_server("--history-size", "30", "--max-streams", "1000") as server,
        Proxy(_path(server)) as proxy,
    ):
        proxy.wait_listening()
        poster = Poster(_path(server))
        try:
            # Past the history (some streams get a reset first), and enough that a stream from an id
            # gives schemathesis the 20 events it reads at once, rather than after its timeout.
            for i in range(40):
                poster.post(f"m{i}")
        finally:
            poster.close()
        run = subprocess.run(
            [
                SCHEMATHESIS,
                "run",
                f"http://{proxy.host}/openapi.json",
                "--checks",
                "all",
                "--include-path",
                "/v1/events",
                "--max-examples",
                "30",
                "--request-timeout",
                "2",
                "--header",
                f"Cookie: uds_token={proxy.token}",
                "--generation-deterministic",
                "--phases",
                "examples,coverage,fuzzing",  # no stateful phase: no links lead to the stream
            ],
            capture_output=True,
            text=True,
            cwd=tmp,  # its cache directory goes there
            timeout=600,
            check=False,
        )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "Tested: 1" in report, report  # GET /v1/events
    assert "No issues found" in report, report
