"""Log lines that cannot be written (stdout a full pipe) are shown on stderr, not dropped unseen."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from app.logs import BatchingStreamHandler, TextFormatter


class _FullPipe(io.StringIO):
    """A non-blocking stdout whose reader has stopped reading: every write is refused."""

    def write(self, text: str) -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")


def _line(text: str) -> logging.LogRecord:
    return logging.makeLogRecord({"name": "app", "levelno": logging.INFO, "levelname": "INFO", "msg": text})


def test_lines_a_full_stdout_refuses_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    handler = BatchingStreamHandler(_FullPipe())
    handler.setFormatter(TextFormatter())

    async def turn() -> None:
        handler.handle(_line("📩 Server received: within the loop"))
        await asyncio.sleep(0)

    asyncio.run(turn())
    handler.handle(_line("outside the loop"))
    err = capsys.readouterr().err
    assert "Logging error" in err
    assert "Server received: within the loop" in err
    assert "outside the loop" in err
