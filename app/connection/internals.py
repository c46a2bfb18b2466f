"""uvicorn's undocumented state the protocol and ``UdsServer`` use: tests/app/test_uvicorn_internals.py."""

from __future__ import annotations

UVICORN_INTERNALS = (
    ("protocol", "parser", "fed piecewise to bound pipelining; read for a refused request's method"),
    ("protocol", "url", "the request target, to measure a head that came in pieces"),
    ("protocol", "headers", "counted and measured; trailer fields land there too"),
    ("protocol", "scope", "gets the peer extensions; its headers give the transfer coding"),
    ("protocol", "cycle", "the request last parsed: made keep_alive False while draining, counted"),
    ("protocol", "pipeline", "requests queued behind the one answered: bounded, a refused one dropped"),
    ("protocol", "flow", "replaced by HoldingFlow, which keeps reading paused while input is held"),
    ("protocol", "connections", "the open connections, which the connection cap scans"),
    ("protocol", "limit_concurrency", "set to None: our cap (503 in JSON, room made) replaces uvicorn's"),
    ("protocol", "timeout_keep_alive", "with timeout_keep_alive_task, since when a connection idles"),
    ("protocol", "timeout_keep_alive_task", "its due time tells since when a connection idles"),
    ("protocol", "_unset_keepalive_if_required", "before each parse, as in uvicorn; on a reset too"),
    ("cycle", "body", "what the application has not read yet, drawn on the held-input budget"),
    ("cycle", "disconnected", "set with message_event for cycles uvicorn does not mark on a hang-up"),
    ("cycle", "message_event", "wakes an application waiting for a body that will not come"),
    ("cycle", "keep_alive", "False while draining; True again for the end of an early answer"),
    ("cycle", "response_started", "an answer under way is not cut to make room or on a late body"),
    ("cycle", "response_complete", "which pipelined requests are answered"),
    ("cycle", "send", "wrapped by the recorder's counting send, and while a body is due"),
    ("flow", "read_paused", "HoldingFlow resumes reading only when nothing is held"),
    ("server", "_captured_signals", "cleared once stopped: a SIGTERM ends the process with code 0"),
    ("server", "_wait_tasks_to_complete", 'extended to note the drain done, for the "Drain done" line'),
)
