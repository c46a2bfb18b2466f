"""The hot path of the metrics: plain numbers the protocol adds to as each request is answered.
What is counted, and why not through ``prometheus-client`` objects: docs/internals.md, "Metrics"."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, TypeAlias

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.metrics.files import CellFile
from client.net.throttle import Throttle

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"  # the route of a request no route served, or refused before routing
OTHER = "other"  # the uid of peers --metrics-uid does not name, and any method outside METHODS
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)  # seconds
STORING_OPERATION = "create_message"  # its 201 answer (in any API version) stored a message
_DEGRADED = Throttle(logging.getLogger("app.metrics"))

Counts: TypeAlias = "list[float] | memoryview[float]"  # in memory, or in the shared file (--workers)


class MetricsError(Exception):
    """The metrics endpoint or the workers' metrics directory cannot be set up (a one-line message)."""


class Recorder:
    """Counts kept on the event loop thread, no lock: a request counts in one *cell* (its requests
    per bucket of :data:`BUCKETS`, then their seconds) and in its connection's :class:`PeerTally`.
    With ``file`` (``--workers``) they live in that file; a record it cannot take stays unseen."""

    __slots__ = ("cells", "file", "peers", "records", "shown_uids", "timed_send")

    def __init__(self, shown_uids: Iterable[int] = (), file: CellFile | None = None) -> None:
        self.shown_uids = frozenset(shown_uids)
        self.file = file
        self.cells: dict[tuple[int, str, int], Counts] = {}
        self.records: dict[tuple[object, ...], Counts] = {}  # every cell by its labels
        self.peers: dict[int | str | None, PeerTally] = {}
        self.timed_send = timed_send(self)

    def _record(self, labels: tuple[object, ...], count: int) -> Counts:
        found = self.records.get(labels)
        if found is None:
            if self.file is not None and (found := self.file.record(labels, count)) is None:
                message = "Metrics: this worker's file %s is full; new series are left out of /metrics"
                _DEGRADED.log(logging.WARNING, message, self.file.path)
            self.records[labels] = found = found if found is not None else [0.0] * count
        return found

    def peer(self, uid: int | None) -> PeerTally:
        """A connection's tally: its uid if ``--metrics-uid`` names it, else :data:`OTHER` (None,
        not shown, when no uid is named or there is no peer: TCP)."""
        label: int | str | None = uid
        if uid is None or uid not in self.shown_uids:
            label = OTHER if self.shown_uids and uid is not None else None
        tally = self.peers.get(label)
        if tally is None:
            counts = self._record(("peer", str(label)), 1) if label is not None else [0.0]
            tally = self.peers[label] = PeerTally(label, counts)
        return tally

    def cell(self, key: tuple[int, str, int], route: object) -> Counts:
        """The cell for ``key`` (route id, method, status), its labels bounded: :data:`OTHER`
        methods, :data:`UNMATCHED` routes; only API operations (an ``operationId``) are timed."""
        found = self.cells.get(key)
        if found is None:
            method = key[1] if key[1] in METHODS else OTHER
            served = getattr(route, "methods", None) or ("GET", "HEAD")  # a mount serves files
            path = getattr(route, "path", None) if route is not None and key[1] in served else None
            operation = str(getattr(route, "operation_id", None) or "")
            stores = path is not None and key[2] == 201 and operation.startswith(STORING_OPERATION)
            labels = (method, path or UNMATCHED, str(key[2]), stores, bool(path and operation))
            found = self.cells[key] = self._record(("cell", *labels), len(BUCKETS) + 2)
        return found

    def refused(self, method: str, status: int, tally: PeerTally) -> None:
        """Count a request the protocol answered itself, before routing (no duration)."""
        self._record(("refused", method if method in METHODS else OTHER, status), 1)[0] += 1
        tally.counts[0] += 1


@dataclass(eq=False, slots=True)
class PeerTally:
    """The requests (one number) counted under one uid label, shared by its connections."""

    label: int | str | None
    counts: Counts


def timed_send(recorder: Recorder) -> Callable[[RequestResponseCycle, PeerTally], Callable[[Any], Any]]:
    """The class whose ``timed(cycle, tally)``, set as ``cycle.send`` once the head is parsed, counts
    the request in ``recorder`` when its response starts (never one to a peer already gone)."""
    cells = recorder.cells
    new_cell = recorder.cell
    send_on = RequestResponseCycle.send

    class TimedSend:
        __slots__ = ("cycle", "started", "tally")

        def __init__(self, cycle: RequestResponseCycle, tally: PeerTally) -> None:
            self.cycle = cycle
            self.tally = tally
            self.started = perf_counter()

        def __call__(self, message: Any) -> Any:
            # Not ``async``: it returns uvicorn's own coroutine, so no extra frame is awaited.
            cycle = self.cycle
            first = not cycle.response_started and not cycle.disconnected  # (to a peer gone: never sent)
            if first and message["type"] == "http.response.start":
                seconds = perf_counter() - self.started
                scope = cycle.scope
                route = scope.get("route")  # Starlette's router put it in this dict
                key = (id(route), scope["method"], message["status"])
                try:
                    cell = cells[key]
                except KeyError:
                    cell = new_cell(key, route)
                cell[bisect_left(BUCKETS, seconds)] += 1
                cell[-1] += seconds
                self.tally.counts[0] += 1
                del cycle.send  # counted: the cycle no longer refers to itself, so it is freed on its own
            return send_on(cycle, message)

    return TimedSend
