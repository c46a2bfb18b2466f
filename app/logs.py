"""Logging setup, done once by the entry point (library modules only ever get a logger).

``text``: INFO lines of the ``app`` loggers are the bare message, so ``kubectl logs`` shows the demo
lines exactly; a record's ``peer`` goes on the next line (``  from peer pid=.. uid=.. gid=..``), so
the demo line stays as it is; other lines are ``LEVEL message``. ``json``: one object per line.
Tracebacks only with ``debug``; otherwise an exception is summarised on the same line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any

from client.net.throttle import Throttle

__all__ = ["BatchingStreamHandler", "JsonFormatter", "TextFormatter", "Throttle", "configure", "escaped"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "color_message",
    "taskName",
}
_APP = "app"


def _exception_line(record: logging.LogRecord) -> str:
    if record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return ""


class _Formatter(logging.Formatter):
    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug


class TextFormatter(_Formatter):
    """Bare message for ``app`` INFO lines, ``LEVEL message`` for everything else."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if "\n" in message or "\r" in message:  # one line per event, whatever the message holds
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        if record.levelno != logging.INFO or not (record.name == _APP or record.name.startswith("app.")):
            message = f"{record.levelname} {message}"
        peer = getattr(record, "peer", None)
        if isinstance(peer, dict):  # the caller beside its message; the demo line itself stays bare
            number = getattr(record, "message_id", None)
            suffix = f" (message {number})" if number is not None else ""
            forwarded = peer.get("forwarded_for")  # the caller a proxy on the socket named
            via = (
                f" via proxy for uid={forwarded.get('uid')} gid={forwarded.get('gid')} "
                f"pid={forwarded.get('pid')}"
                if isinstance(forwarded, dict)
                else ""
            )
            message = (
                f"{message}\n  from peer pid={peer.get('pid')} uid={peer.get('uid')} "
                f"gid={peer.get('gid')}{via}{suffix}"
            )
        if record.exc_info:
            if self.debug:
                message = f"{message}\n{self.formatException(record.exc_info)}"
            else:
                message = f"{message} ({_exception_line(record)}; run with --debug for the traceback)"
        return message


class JsonFormatter(_Formatter):
    """One JSON object per line: ts (RFC 3339 UTC), level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        millis = int((record.created - seconds) * 1000)
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["error"] = _exception_line(record)
            if self.debug:
                entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class BatchingStreamHandler(logging.StreamHandler[IO[str]]):
    """A stream handler that writes the lines of one event-loop turn in one ``write`` and flush (a
    line waits one turn at most); outside a running loop every record is written at once, in order."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._pending.append(line)
        if loop is None:
            self._loop = None
            self._write_pending()
        elif self._loop is not loop:  # first line of this turn (or of a new loop): drain at its end
            self._loop = loop
            loop.call_soon(self._drain)

    def _drain(self) -> None:
        self.acquire()
        try:
            self._loop = None
            self._write_pending()
        finally:
            self.release()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:  # a closed or broken stream must not take the server down
            self.handleError(logging.makeLogRecord({"msg": text.rstrip("\n")}))

    def flush(self) -> None:
        self.acquire()
        try:
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self.stream.write(text)
            super().flush()
        finally:
            self.release()

    def close(self) -> None:
        self._write_pending()
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
    numeric = getattr(logging, level.upper())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in (_APP, "uvicorn", "uvicorn.error", "uvicorn.asgi", "fastapi"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.setLevel(numeric)
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.setLevel(numeric)
    # uvicorn checks hasHandlers() per connection: with propagation off it skips access logging at no cost.
    access.propagate = access_log
    logging.captureWarnings(True)
    return handler
