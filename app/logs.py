"""Logging setup, done once by the entry point (library modules only ever get a logger).
Text: ``app`` INFO lines bare (the demo lines, for ``kubectl logs``); JSON: one object per line."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

_RECORD = logging.LogRecord("", 0, "", 0, "", None, None).__dict__
_STANDARD = frozenset(_RECORD) | {"message", "asctime", "color_message", "taskName"}  # not extra fields


class _Formatter(logging.Formatter):
    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug

    def failure(self, record: logging.LogRecord) -> tuple[str, str | None]:
        """The record's exception in one line, and its traceback with ``debug``."""
        assert record.exc_info is not None
        exc, line = record.exc_info[1], ""
        if exc is not None:
            text = str(exc).splitlines()[0] if str(exc) else ""
            line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return line, self.formatException(record.exc_info) if self.debug else None


class TextFormatter(_Formatter):
    """Bare message for ``app`` INFO lines, ``LEVEL message`` for everything else; the record's
    ``peer`` on a second line, so the demo line stays as it is; tracebacks only with ``debug``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")  # one line per event
        if record.levelno != logging.INFO or not (record.name == "app" or record.name.startswith("app.")):
            message = f"{record.levelname} {message}"
        peer = getattr(record, "peer", None)
        if isinstance(peer, dict):
            message += f"\n  from peer pid={peer.get('pid')} uid={peer.get('uid')} gid={peer.get('gid')}"
            forwarded = peer.get("forwarded_for")  # the caller a proxy on the socket named
            if isinstance(forwarded, dict):
                message += f" via proxy for uid={forwarded.get('uid')} gid={forwarded.get('gid')}"
                message += f" pid={forwarded.get('pid')}"
            number = getattr(record, "message_id", None)
            if number is not None:
                message += f" (message {number})"
        if record.exc_info:
            line, traceback = self.failure(record)
            message += f"\n{traceback}" if traceback else f" ({line}; run with --debug for the traceback)"
        return message


class JsonFormatter(_Formatter):
    """One JSON object per line: ts (RFC 3339 UTC), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"], traceback = self.failure(record)
            if traceback:
                entry["traceback"] = traceback
        return json.dumps(entry, ensure_ascii=False, default=str)


class BatchingStreamHandler(logging.StreamHandler[IO[str]]):
    """Writes the lines of one event-loop turn in one ``write`` and flush (a line waits one turn at
    most); outside a running loop each record is written at once, in order."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._drain()
            return
        if self._loop is not loop:  # first line of this turn (or of a new loop): drain at its end
            self._loop = loop
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._loop = None
        with self.lock:  # type: ignore[union-attr]
            lines = "".join(self._pending)
            try:
                self.flush()
            except Exception:  # a closed or broken stream must not take the server down
                self.handleError(logging.makeLogRecord({"msg": lines.rstrip("\n")}))  # shown on stderr

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            text = "".join(self._pending)
            self._pending.clear()
            if text:
                self.stream.write(text)
            super().flush()

    def close(self) -> None:
        self._drain()
        super().close()


def escaped(text: str) -> str:
    """``text`` from outside, fit for one log line: control characters (ESC, CR, LF...) escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def configure(
    level: str = "info",
    fmt: str = "text",
    *,
    debug: bool = False,
    access_log: bool = False,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send the ``app`` and ``uvicorn`` loggers to one handler on ``stream`` (stdout by default)."""
    # The logging HOWTO's "Optimization" switches: no formatter here prints these, so skip them.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingStreamHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(JsonFormatter(debug) if fmt == "json" else TextFormatter(debug))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    for name in ("app", "uvicorn", "uvicorn.error", "uvicorn.asgi", "fastapi", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.setLevel(level.upper())
    # uvicorn checks hasHandlers() per connection: with propagation off it skips access logging at no cost.
    logging.getLogger("uvicorn.access").propagate = access_log
    logging.captureWarnings(True)
    return handler
