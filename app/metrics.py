"""Prometheus metrics: counted on the hot path in plain ints, handed to ``prometheus-client`` on a tick.

What is measured
    ``uds_requests_total{method,route,status}``, ``uds_request_duration_seconds{method,route}``
    (seconds from the parsed request head to the response head: a long event stream counts once,
    when it starts), ``uds_messages_stored_total`` (201 answers of ``create_message``),
    ``uds_open_connections``, ``uds_event_streams``, ``uds_peer_requests_total{uid}`` and the
    process metrics (``process_*``, ``python_*``). ``route`` is the route template
    (``/v1/messages/{message_id}``); a request that matched no route, or that the protocol refused
    before routing (400, 408, 431, 503 at the connection cap), has ``route="unmatched"``. ``uid`` is
    the socket peer's uid (SO_PEERCRED; a ``uds-client proxy`` counts as its own uid): the first
    :data:`MAX_PEER_UIDS` uids to connect to a process get their own value, later ones share
    ``uid="other"``.

Where it is counted
    The protocol (``app.peercred``) sees every request: it builds each request's cycle from the
    class :func:`timed_cycle` makes, which notes the status and the route FastAPI's router wrote
    into the ASGI scope when the response starts. No ASGI layer wraps the application.

Why plain ints first
    Measured on this project's machine (``prometheus-client`` 0.26, one call each): a cached
    counter child's ``inc()`` 0.22 µs, a histogram child's ``observe()`` 0.44 µs, and in
    multiprocess mode (values in mmap files) 0.62 µs and 1.21 µs; ``labels()`` adds 0.6 µs. With
    three series per request that is 1-3 µs, up to 5% of a POST. So :class:`Recorder` adds each
    request to one list of plain numbers, and :meth:`Metrics.flush` adds what changed to the
    ``prometheus-client`` objects every uvicorn tick (0.1 s) and before each exposition on the
    socket. Counting costs 1.3 µs of a 44 µs ``POST /v1/messages`` in process (1.03x) and 1.04x
    of the server's CPU per POST (``benchmarks/metrics.py``); :func:`timed_cycle` says where the
    4.4 µs it used to cost went.

When it is on
    Always, from the start: a counter that began at the first scrape would report
    ``uds_messages_stored_total 0`` after a thousand messages. What it costs a POST is measured by
    ``benchmarks/metrics.py`` (k), whose "off" side is a server with the recorder switched off
    (``benchmarks/uncounted_server.py``), the only way to run without it.

Workers
    With ``--workers N`` the parent creates a private directory (:func:`multiprocess_dir`), sets
    ``PROMETHEUS_MULTIPROC_DIR`` to it before the workers start, serves the one TCP endpoint with
    ``prometheus-client``'s ``MultiProcessCollector`` over the workers' files, calls
    :func:`worker_gone` for each worker that exits (``mark_process_dead``: its live gauges go, its
    counters stay in the totals) and removes the directory at exit. Gauges add up over live
    workers (``livesum``); ``process_*`` add up over the parent and the live workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import gzip
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

import h11
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, values
from prometheus_client.core import Metric
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
    gzip_accepted,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.mmap_dict import _INITIAL_MMAP_SIZE, MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.config import Settings
from app.logs import Throttle, escaped

if TYPE_CHECKING:
    from app.workers import SupervisorHooks

__all__ = [
    "BUCKETS",
    "ENDPOINT_CONNECTIONS",
    "ENDPOINT_DEADLINE",
    "ENDPOINT_REQUEST_BYTES",
    "MAX_PEER_UIDS",
    "METHODS",
    "METRICS_PATH",
    "OTHER",
    "UNMATCHED",
    "EndpointThread",
    "LoopEndpoint",
    "Metrics",
    "MetricsError",
    "PeerTally",
    "Recorder",
    "Rendered",
    "for_workers",
    "listening_socket",
    "multiprocess_dir",
    "serve_endpoint",
    "timed_cycle",
    "worker_gone",
]

log = logging.getLogger("app.metrics")

METRICS_PATH = "/metrics"
UNMATCHED = "unmatched"
"""The ``route`` of a request that matched no route or was refused before routing."""
OTHER = "other"
"""The ``uid`` of peers ``--metrics-uid`` does not name, and the ``method`` outside :data:`METHODS`."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
"""The ``method`` label values besides :data:`OTHER`: a peer cannot add series by inventing methods."""
MAX_PEER_UIDS = 32
"""Most ``uid`` label values (``--metrics-uid``), the same in every worker, replaced ones included."""
BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5)
"""Upper bounds of the duration histogram, in seconds: a POST over the socket takes 0.1-1 ms. Each
timed operation is len(BUCKETS) + 3 series: few enough for the whole exposition to stay under 300."""
STORING_OPERATION = "create_message"
"""The operation whose 201 answer means a message was stored (its versioned copies included)."""
ENDPOINT_CONNECTIONS = 16
"""Connections the TCP endpoint serves at once; Prometheus scrapes one at a time. Without a bound,
idle connections each held a descriptor forever, and 240 of them took every descriptor of a server
limited to 256 (tests/app/test_metrics_attacks.py)."""
ENDPOINT_DEADLINE = 10.0
"""Seconds a TCP endpoint connection may last: its request, its turn and taking the answer."""
ENDPOINT_HEAD_DEADLINE = 3.0
"""Seconds a TCP endpoint connection has to send its whole request head (a scrape sends it in one
packet); a client that trickles it (slowloris) gives its slot back after this, or sooner to a newcomer."""
SCRAPES_PER_SECOND = 20
"""Answers the TCP endpoint sends per second at most, one at a time; more wait their turn."""
ENDPOINT_REQUEST_BYTES = 16 * 1024
"""Bytes of request head a TCP endpoint connection may send (a scrape's is a few hundred); past
them it gets 431."""
RENDER_EVERY = 1.0
"""Seconds a rendered exposition is served before the next scrape collects again."""
MAX_COPIES = 4
"""Formats (and compressions) rendered per :data:`RENDER_EVERY`; further ones get the text format."""
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_ENDPOINT_FAILED = Throttle(log)
_DIR_PREFIX = "uds-metrics-"
_PROCESS_SUMS = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
)


class MetricsError(Exception):
    """The metrics endpoint (or the workers' metrics directory) cannot be set up; the message is one
    line saying what to do."""


# -- the hot path ----------------------------------------------------------------------------------


class Recorder:
    """Plain counts, kept on the event loop thread (no lock, no allocation once a series exists).

    A request is counted in one *cell*, by the route object FastAPI's router matched (by ``id()``:
    Starlette routes are not hashable; the app's routes live as long as it does), the method and
    the status: the requests in each bucket of :data:`BUCKETS` and above the last, then the sum of
    their seconds; and once in its connection's :class:`PeerTally` (:meth:`peer`).
    Cells are bounded by the app's routes, the methods httptools parses and the statuses the app
    answers; their labels far more (:meth:`cell`), peers by :data:`MAX_PEER_UIDS` + 2 labels.
    """

    __slots__ = ("cells", "cycle_class", "labels", "on", "peers", "refusals", "shown_uids")

    def __init__(self, on: bool = True, shown_uids: Iterable[int] = ()) -> None:
        self.on = on
        self.shown_uids = frozenset(shown_uids)
        """The peer uids counted under their own label (``--metrics-uid``)."""
        """Count requests (always, but in the benchmark that measures what counting costs)."""
        self.cells: dict[tuple[int, str, int], list[float]] = {}
        self.labels: dict[tuple[int, str, int], tuple[str, str, str, bool, bool]] = {}
        """Each cell's method, route template and status labels, whether its requests stored a
        message, and whether they are timed (they reached an operation)."""
        self.peers: dict[int | str | None, PeerTally] = {}
        """Requests by uid label; every request counts here once (under None without a peer)."""
        self.refusals: dict[tuple[str, int], int] = {}
        """Requests the protocol answered itself, before routing, by method and status."""
        self.cycle_class: type[RequestResponseCycle] = timed_cycle(self) if on else RequestResponseCycle
        """The class of the protocol's request cycles: :func:`timed_cycle`'s when counting."""

    def peer(self, uid: int | None) -> PeerTally:
        """Where a connection's requests count: its peer's uid if ``--metrics-uid`` names it, else
        :data:`OTHER` (or None, not shown, when no uid is named or there is no peer: TCP)."""
        label: int | str | None = uid
        if uid is None or uid not in self.shown_uids:
            label = OTHER if self.shown_uids and uid is not None else None
        tally = self.peers.get(label)
        if tally is None:
            tally = self.peers[label] = PeerTally(label)
        return tally

    def cell(self, key: tuple[int, str, int], route: object) -> list[float]:
        """The cell for ``key``, made at its first request (``route``: the matched route or None).

        Its labels are bounded whatever peers send: a method outside :data:`METHODS` is
        :data:`OTHER`, and a request that reached no route, or a route that does not serve its method
        (404, 405), has route :data:`UNMATCHED`. Only the API's operations (the routes with an
        OpenAPI ``operationId``: not the docs pages) are timed."""
        found = self.cells.get(key)
        if found is None:
            method = key[1] if key[1] in METHODS else OTHER
            served = getattr(route, "methods", None) or ("GET", "HEAD")  # a mount serves files
            path = getattr(route, "path", None) if route is not None and key[1] in served else None
            operation = str(getattr(route, "operation_id", None) or "")
            stores = path is not None and key[2] == 201 and operation.startswith(STORING_OPERATION)
            timed = path is not None and bool(operation)
            self.labels[key] = (method, path or UNMATCHED, str(key[2]), stores, timed)
            found = self.cells[key] = [0] * (len(BUCKETS) + 1) + [0.0]
        return found

    def refused(self, method: str, status: int, tally: PeerTally) -> None:
        """A request the protocol answered itself, before routing (no duration is recorded)."""
        key = (method, status)
        self.refusals[key] = self.refusals.get(key, 0) + 1
        tally.requests += 1


class PeerTally:
    """The requests counted under one uid label, shared by the connections with that label.

    An attribute, not a dict entry: counting a request in a dict keyed by label measured 0.4 µs
    (of 44), in this slot about nothing (``benchmarks/metrics.py --in-process``)."""

    __slots__ = ("label", "requests")

    def __init__(self, label: int | str | None) -> None:
        self.label = label
        self.requests = 0


def timed_cycle(recorder: Recorder) -> type[RequestResponseCycle]:
    """uvicorn's request cycle, which counts its request in ``recorder`` when the response starts
    (an answer to a peer already gone is not counted: it is never sent).

    The protocol builds its cycles from this class (a copy of uvicorn's ``on_headers_complete``)
    and sets ``started`` (``time.perf_counter()`` when the head was parsed: uvloop's clock counts
    whole milliseconds) and ``tally`` (its connection's :class:`PeerTally`) on each.

    Measured with the whole request path in process (the protocol and the app, a stand-in
    transport: ``benchmarks/metrics.py --in-process``), 15 rounds of 4,000 ``POST /v1/messages``
    of 44 µs each; counting cost 4.4 µs (1.10x) before, 1.3-2.1 µs (1.03x-1.04x) now:

    * changing each cycle's ``__class__`` after uvicorn had built it cost 1.9 µs: CPython 3.11
      then gives the object a real ``__dict__``, and every attribute uvicorn reads gets slower.
      Built from this class, the cycle costs nothing more; its two attributes are slots (0.3 µs);
    * the counting, through three method calls (route lookup, record, peer) into four dicts, cost
      1.4 µs. Now one dict lookup finds the request's cell, keyed by route, method and status,
      with the names bound in this closure, and the uid label's tally is a slot.
    """
    cells = recorder.cells
    new_cell = recorder.cell
    send_on = RequestResponseCycle.send

    class TimedCycle(RequestResponseCycle):
        __slots__ = ("started", "tally")  # set on each cycle; as slots they leave uvicorn's attributes be
        started: float
        tally: PeerTally

        def send(self, message: Any) -> Any:
            # Not ``async``: it returns uvicorn's own coroutine, so no extra frame is awaited.
            first = not self.response_started and not self.disconnected  # (to a peer gone: never sent)
            if first and message["type"] == "http.response.start":
                seconds = perf_counter() - self.started
                scope = self.scope
                route = scope.get("route")  # Starlette's router put it in this dict
                key = (id(route), scope["method"], message["status"])
                try:
                    cell = cells[key]
                except KeyError:
                    cell = new_cell(key, route)
                cell[bisect_left(BUCKETS, seconds)] += 1
                cell[-1] += seconds
                self.tally.requests += 1
            return send_on(self, message)

    return TimedCycle


# -- prometheus-client ------------------------------------------------------------------------------


class Metrics:
    """This process's metrics: the :class:`Recorder`, the ``prometheus-client`` objects and the
    registry that ``/metrics`` shows (this process's alone, or every worker's in multiprocess mode).
    """

    def __init__(
        self, *, on: bool = True, directory: str | None = None, shown_uids: Iterable[int] = ()
    ) -> None:
        self.directory = directory if directory is not None else os.environ.get(MULTIPROC_ENV) or None
        if self.directory is not None:
            _use_multiprocess_values(self.directory)
        self.recorder = Recorder(on, shown_uids)
        self.open_connections: Callable[[], int] = lambda: 0
        """Read at each flush; the server points it at uvicorn's connection set."""
        self.event_streams: Callable[[], int] = lambda: 0
        """Read at each flush; the event hub's count of open streams."""
        # No ``*_created`` series: multiprocess mode has none, so both modes show the same names.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        own = CollectorRegistry()  # the objects this process writes (never exposed in multiprocess mode)
        self.requests = Counter(
            "uds_requests",
            "Requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=own,
        )
        self.duration = Histogram(
            "uds_request_duration_seconds",
            "Seconds from the parsed request head to the response head, by method and route template.",
            ["method", "route"],
            buckets=BUCKETS,
            registry=own,
        )
        self.stored = Counter("uds_messages_stored", "Messages stored (201 answers to POST).", registry=own)
        self.connections = Gauge(
            "uds_open_connections",
            "Connections open to the server (all workers).",
            multiprocess_mode="livesum",
            registry=own,
        )
        self.streams = Gauge(
            "uds_event_streams",
            "Event streams open (all workers).",
            multiprocess_mode="livesum",
            registry=own,
        )
        self.peer_requests = Counter(
            "uds_peer_requests",
            f'Requests by the socket peer\'s uid: the uids --metrics-uid names, the others as uid="{OTHER}".',
            ["uid"],
            registry=own,
        )
        self._pushed_cells: dict[tuple[int, str, int], tuple[Any, list[Any], bool, list[float]]] = {}
        """Per cell: its requests counter child, its histogram child's values, whether it stores,
        and the cell as last pushed."""
        self._pushed_refusals: dict[tuple[str, int], int] = {}
        self._pushed_peers: dict[int | str | None, int] = {}
        self._pushed_total = 0
        self._gauges = (-1, -1)
        self._full = Throttle(log)
        if self.directory is None:
            self.registry = own
            ProcessCollector(registry=own)
            PlatformCollector(registry=own)
            GCCollector(registry=own)
        else:
            self.registry = exposition_registry(self.directory)
        self.rendered = Rendered(self.registry, self.flush)
        """What ``/metrics`` serves, on the socket and on the single process's TCP port."""

    def flush(self) -> None:
        """Add what the recorder counted since the last flush to the ``prometheus-client`` objects.

        A full disk under the workers' mmap files is logged (at most once per 10 s); what could not
        be written is retried at the next flush, and the server goes on serving."""
        try:
            self._flush()
        except OSError as exc:
            self._full.log(
                logging.WARNING,
                "Cannot record metrics in %s: %s; they are kept in memory and retried (free some space)",
                self.directory,
                exc.strerror or exc,
            )

    def _flush(self) -> None:
        # Every request counts once under a uid label: no change there, no new request.
        counted = sum(tally.requests for tally in self.recorder.peers.values())
        if counted != self._pushed_total:
            self._flush_requests()
            self._pushed_total = counted
        gauges = (self.open_connections(), self.event_streams())
        if gauges != self._gauges:
            self._gauges = gauges
            self.connections.set(gauges[0])
            self.streams.set(gauges[1])

    def _flush_requests(self) -> None:
        """Add each cell's growth since the last flush to its series; a cell whose series could not
        be made (``labels()`` on a full disk raises ``OSError``) is left for the next flush."""
        recorder = self.recorder
        for key, cell in list(recorder.cells.items()):
            pushed = self._pushed_cells.get(key)
            if pushed is None:
                method, route, status, stores, timed = recorder.labels[key]
                duration = self.duration.labels(method, route) if timed else None
                pushed = self._pushed_cells[key] = (
                    self.requests.labels(method, route, status),
                    # Histogram children keep one value per bucket (not cumulative) and one for the
                    # sum; observe() takes one value, so the counts are added to those directly.
                    [*duration._buckets, duration._sum] if duration is not None else [],
                    stores,
                    [0] * len(cell),
                )
            requests, targets, stores, before = pushed
            if before == cell:
                continue
            added = int(sum(cell[:-1]) - sum(before[:-1]))
            requests.inc(added)
            if stores:
                self.stored.inc(added)
            for index, target in enumerate(targets):
                if cell[index] != before[index]:
                    target.inc(cell[index] - before[index])
            before[:] = cell
        refused = self._pushed_refusals
        for refusal, count in list(recorder.refusals.items()):
            delta = count - refused.get(refusal, 0)
            if delta:
                method = refusal[0] if refusal[0] in METHODS else OTHER
                self.requests.labels(method, UNMATCHED, str(refusal[1])).inc(delta)
                refused[refusal] = count
        peers = self._pushed_peers
        for label, tally in list(recorder.peers.items()):
            delta = tally.requests - peers.get(label, 0)
            if delta:
                if label is not None:
                    self.peer_requests.labels(str(label)).inc(delta)
                peers[label] = tally.requests

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for (Prometheus text by default), as rendered
        at most :data:`RENDER_EVERY` seconds ago."""
        headers, output = self.rendered.render(accept, None)
        return output, dict(headers)["Content-Type"]


class Rendered:
    """A registry's exposition, collected at most once per :data:`RENDER_EVERY` seconds and served
    as copies, one per format and compression: a flood of scrapes costs a dictionary lookup each.

    At most :data:`MAX_COPIES` copies a period (``Accept`` may name any OpenMetrics version); past
    them a scrape gets the Prometheus text format. Filters (``name[]``) are not applied: each
    scrape gets every series. Safe to call from any thread.
    """

    def __init__(self, registry: Collector, before: Callable[[], None] | None = None) -> None:
        self.registry = registry
        self.before = before
        """Called before each collection (the single process hands its counts over)."""
        self._families: list[Metric] = []
        self._taken = float("-inf")
        self._copies: dict[tuple[str, bool], bytes] = {}
        self._lock = threading.Lock()

    def collect(self) -> list[Metric]:
        """The families as last collected (what the encoders read)."""
        return self._families

    def render(self, accept: str | None, accept_encoding: str | None) -> tuple[list[tuple[str, str]], bytes]:
        """The headers (``Content-Type``, ``Content-Encoding``) and body of a scrape."""
        try:
            encoder, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):  # an Accept version it cannot compare: the text format
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        compress = gzip_accepted(accept_encoding or "")
        with self._lock:
            now = monotonic()
            if now - self._taken >= RENDER_EVERY:
                if self.before is not None:
                    self.before()
                self._families = list(self.registry.collect())
                self._taken = now
                self._copies.clear()
            key = (content_type, compress)
            output = self._copies.get(key)
            if output is None:
                if len(self._copies) >= MAX_COPIES:
                    encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
                    key = (content_type, compress)
                    output = self._copies.get(key)
                if output is None:
                    output = encoder(self)
                    if compress:
                        output = gzip.compress(output, 6)
                    self._copies[key] = output
        headers = [("Content-Type", content_type)]
        if compress:
            headers.append(("Content-Encoding", "gzip"))
        return headers, output


def exposition_registry(directory: str) -> CollectorRegistry:
    """A registry showing every process's metrics from the multiprocess ``directory``."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    registry.register(_ProcessesCollector(directory))
    PlatformCollector(registry=registry)
    return registry


def _use_multiprocess_values(directory: str) -> None:
    """Make metrics created from now on keep their values in ``directory``'s mmap files, whose pages
    are allocated on disk before they are written (:class:`_AllocatedMmapedDict`).

    ``prometheus-client`` picks its value class when it is first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``; a process that imported it before the variable was set (a worker
    forked from a parent that had imported it) switches here.
    """
    os.environ[MULTIPROC_ENV] = directory
    values.MmapedDict = _AllocatedMmapedDict  # type: ignore[attr-defined]  # looked up at each opening
    if values.ValueClass.__name__ != "MmapedValue":
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class _AllocatedFile:
    """A file whose ``truncate`` (how ``MmapedDict`` grows its file) allocates the blocks."""

    def __init__(self, file: Any) -> None:
        self._file = file

    def truncate(self, size: int) -> None:
        os.posix_fallocate(self._file.fileno(), 0, size)  # OSError (ENOSPC) when the disk is full

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class _AllocatedMmapedDict(MmapedDict):
    """``prometheus-client``'s mmap file, its pages allocated before they are written.

    The library grows the file with ``truncate``, which leaves a sparse file: on a full disk, the
    first write to a page with no block behind it is a SIGBUS that kills the process. Measured with
    ``--workers 2`` and a full temporary directory: every worker died at its next new series, every
    replacement before serving, and the server stopped. Allocated with ``posix_fallocate``, a full
    disk is an ``OSError`` instead, which :meth:`Metrics.flush` logs.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            descriptor = os.open(filename, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(descriptor).st_size == 0:
                    try:
                        os.posix_fallocate(descriptor, 0, _INITIAL_MMAP_SIZE)
                    except OSError:  # an empty file would make every exposition fail
                        os.unlink(filename)
                        raise
            finally:
                os.close(descriptor)
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]
        self._f = _AllocatedFile(self._f)  # type: ignore[assignment]

    def _init_value(self, key: str) -> None:
        capacity = self._capacity
        try:
            super()._init_value(key)  # type: ignore[no-untyped-call]
        except OSError:
            self._capacity = capacity  # the file and its map stay as they were
            raise


class _ProcessesCollector(Collector):
    """``process_*`` summed over the directory's owner (the parent that made it, named in it) and
    the live processes that write to it, so the parent and every worker show the same figures.

    CPU seconds, memory and open files add up; ``process_start_time_seconds`` and
    ``process_max_fds`` are the owner's.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        named = _owner(directory)
        self.owner = named if named is not None else os.getpid()

    def pids(self) -> list[int]:
        found = set()
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            match = re.search(r"_(\d+)\.db$", path)
            if match:
                found.add(int(match.group(1)))
        found.discard(self.owner)
        return [pid for pid in [self.owner, *sorted(found)] if os.path.exists(f"/proc/{pid}")]

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for pid in self.pids():
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                seen = merged.get(family.name)
                if seen is None:
                    merged[family.name] = family
                elif any(name.startswith(family.name) for name in _PROCESS_SUMS) and family.samples:
                    total = seen.samples[0].value + family.samples[0].value
                    seen.samples[0] = seen.samples[0]._replace(value=total)
        return list(merged.values())


# -- multiprocess directory ---------------------------------------------------------------------------


def multiprocess_dir(base: str | None = None) -> str:
    """Create this server's private multiprocess directory (0700) under ``base`` (the temp dir).

    Directories that killed servers left behind (their pid gone, or ours: a restarted container's
    server has the same pid 1) are removed first.
    """
    base = base or tempfile.gettempdir()
    me = os.getpid()
    for old in glob.glob(os.path.join(base, f"{_DIR_PREFIX}*")):
        pid = _owner(old)
        if pid is None:
            continue
        with contextlib.suppress(OSError):
            if os.stat(old).st_uid == os.getuid() and (pid == me or not os.path.exists(f"/proc/{pid}")):
                shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{me}-", dir=base)


def _owner(directory: str) -> int | None:
    """The pid named in a multiprocess directory's name (the server that made it), if any."""
    named = re.fullmatch(rf"{_DIR_PREFIX}(\d+)-.*", os.path.basename(directory.rstrip("/")))
    return int(named.group(1)) if named else None


def worker_gone(pid: int, directory: str) -> None:
    """A worker exited: drop its live gauges (its counters stay in the totals)."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def for_workers(settings: Settings) -> Iterator[SupervisorHooks]:
    """The parent's side of ``--workers``: the multiprocess directory (in the temporary directory,
    else in ``--data-dir``) set in the environment the workers inherit, the one TCP endpoint (if
    ``--metrics-listen``) over every worker's files, and supervisor hooks that drop a dead worker's
    gauges. All of it is undone on exit.

    Raises :class:`MetricsError` when the directory cannot be made or the endpoint cannot listen.
    """
    from app.workers import SupervisorHooks  # app.workers imports the server, which imports us

    try:
        base: str | None = tempfile.gettempdir()
    except FileNotFoundError:  # no writable temporary directory (a read-only root filesystem)
        base = settings.data_dir
    try:
        directory = multiprocess_dir(base)
    except OSError as exc:
        raise MetricsError(
            f"cannot create the workers' metrics directory in {base}: {exc.strerror or exc}; "
            "set TMPDIR to a writable directory"
        ) from None
    endpoint: EndpointThread | None = None

    class Hooks(SupervisorHooks):
        def worker_exited(self, pid: int) -> None:
            worker_gone(pid, directory)

    try:
        os.environ[MULTIPROC_ENV] = directory
        if settings.metrics_listen is not None:
            rendered = Rendered(exposition_registry(directory))
            endpoint = EndpointThread(LoopEndpoint(settings.metrics_listen, rendered)).start()
        yield Hooks()
    finally:
        if endpoint is not None:
            endpoint.close()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)


def serve_endpoint(settings: Settings, metrics: Metrics | None) -> LoopEndpoint | None:
    """The TCP endpoint of a single-process server, listening (the server's loop starts serving
    it); None without ``--metrics-listen``.

    Raises :class:`MetricsError` when it cannot listen.
    """
    if settings.metrics_listen is None or metrics is None:
        return None
    return LoopEndpoint(settings.metrics_listen, metrics.rendered)


# -- the TCP endpoint ---------------------------------------------------------------------------------


def _refusal(status: int) -> tuple[list[tuple[str, str]], bytes]:
    """The headers and JSON body of the endpoint's 404 (any other path), 405 (another method) or
    400 (not HTTP)."""
    if status == 405:
        error, message = "method_not_allowed", f"{METRICS_PATH} answers GET and HEAD only"
    elif status == 431:
        error, message = "headers_too_large", f"the request head is over {ENDPOINT_REQUEST_BYTES} bytes"
    elif status == 404:
        error, message = "not_found", f"this port serves {METRICS_PATH} only; the API is on the Unix socket"
    else:
        error, message = "bad_request", f"the request is not valid HTTP/1.1; send GET {METRICS_PATH}"
    body = json.dumps({"error": error, "message": message, "status": status}).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))
    return headers, body


def _whole(status: int, headers: list[tuple[str, str]], body: bytes, *, head_only: bool) -> bytes:
    """A whole ``Connection: close`` answer (its body left out for HEAD)."""
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{n}: {v}" for n, v in headers)]
    head = "\r\n".join([*lines, "Connection: close", "", ""]).encode("latin-1")
    return head if head_only else head + body


def _refused(status: int, *, head_only: bool = False) -> bytes:
    """The whole answer of a :func:`_refusal`."""
    return _whole(status, *_refusal(status), head_only=head_only)


def _announce(listen: str, port: int) -> None:
    log.info("Metrics on http://%s%s", listen.rpartition(":")[0] + f":{port}", METRICS_PATH)


def listening_socket(listen: str) -> socket.socket:
    """A TCP socket listening on ``listen`` (``HOST:PORT``) for the metrics endpoint.

    Raises :class:`MetricsError` when the address is not one or cannot be listened on.
    """
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, ValueError) as exc:
        raise MetricsError(
            f"cannot serve metrics on {listen} (--metrics-listen): {exc}; use HOST:PORT with a local "
            "address, e.g. 0.0.0.0:9102"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        reason = exc.strerror or str(exc)
        in_use = exc.errno == errno.EADDRINUSE
        hint = "stop the program using it or choose another port" if in_use else "check the address"
        raise MetricsError(
            f"cannot serve metrics on {listen} (--metrics-listen): {reason.lower()}; {hint}"
        ) from None
    return sock


class _Slot:
    """One connection the endpoint serves: its stream, when it came, and whether its request head
    is whole (until then a newcomer may evict it)."""

    __slots__ = ("task", "whole", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.task: asyncio.Task[None] | None = None
        self.whole = False


class LoopEndpoint:
    """``GET /metrics`` on ``HOST:PORT`` over TCP, served by an event loop; nothing else.

    The single process's loop serves it (a thread beside uvicorn's loop cost 1.5-2% of ``POST
    /messages`` throughput just by being there), and with ``--workers`` the parent runs it on a
    loop of its own (:class:`EndpointThread`). Limits: :data:`ENDPOINT_CONNECTIONS` at once, a
    newcomer evicting the oldest whose request head is not whole yet (idle or trickling: slowloris),
    and waiting in the listen queue while every one has sent a whole head;
    :data:`ENDPOINT_HEAD_DEADLINE` for the head, :data:`ENDPOINT_DEADLINE` for the whole exchange,
    :data:`ENDPOINT_REQUEST_BYTES` of request; one request a connection; answers one at a time,
    at most :data:`SCRAPES_PER_SECOND`, from :class:`Rendered` copies, so no scrape rate costs the
    API more than a few scrapes a second do.
    """

    def __init__(self, listen: str, rendered: Rendered) -> None:
        self.listen = listen
        self.rendered = rendered
        self.sock = listening_socket(listen)
        self.port: int = self.sock.getsockname()[1]
        self._slots: dict[_Slot, None] = {}  # oldest first
        self._room: asyncio.Event | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._turn: asyncio.Lock | None = None
        self._next_answer = 0.0

    async def start(self) -> None:
        self.sock.setblocking(False)
        self._room = asyncio.Event()
        self._room.set()
        self._turn = asyncio.Lock()
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        _announce(self.listen, self.port)

    def close(self) -> None:
        """Stop listening and drop the connections being served (a scrape is cheap to repeat)."""
        if self._accepting is not None:
            self._accepting.cancel()
        for slot in list(self._slots):
            slot.writer.transport.abort()
            if slot.task is not None:
                slot.task.cancel()
        self._slots.clear()
        self.sock.close()

    def _update_room(self) -> None:
        assert self._room is not None
        if len(self._slots) < ENDPOINT_CONNECTIONS or any(not slot.whole for slot in self._slots):
            self._room.set()
        else:
            self._room.clear()  # the next connection waits in the kernel's listen queue

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._room is not None
        while True:
            await self._room.wait()
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError:  # out of descriptors, or the peer already gone: the next one
                await asyncio.sleep(0.05)
                continue
            if len(self._slots) >= ENDPOINT_CONNECTIONS:
                oldest = next((slot for slot in self._slots if not slot.whole), None)
                if oldest is None:  # every slot turned whole meanwhile
                    conn.close()
                    continue
                del self._slots[oldest]
                oldest.writer.transport.abort()
                if oldest.task is not None:
                    oldest.task.cancel()
            try:
                reader, writer = await asyncio.open_connection(sock=conn, limit=ENDPOINT_REQUEST_BYTES)
            except OSError:
                conn.close()
                continue
            slot = _Slot(writer)
            self._slots[slot] = None
            slot.task = loop.create_task(self._serve(reader, slot))
            self._update_room()

    async def _serve(self, reader: asyncio.StreamReader, slot: _Slot) -> None:
        writer = slot.writer
        try:
            async with asyncio.timeout(ENDPOINT_DEADLINE):
                async with asyncio.timeout(ENDPOINT_HEAD_DEADLINE):
                    request = await self._read_request(reader)
                slot.whole = True
                self._update_room()
                answer = await self._answer(request) if isinstance(request, h11.Request) else request
                if answer and not writer.is_closing():  # closing: cut at shutdown or evicted
                    writer.write(answer)
                    await writer.drain()
        except (TimeoutError, OSError, asyncio.CancelledError):
            pass
        except Exception as exc:  # never a line per connection, whatever a client sends
            reason = escaped(f"{type(exc).__name__}: {exc}")
            _ENDPOINT_FAILED.log(logging.ERROR, "Metrics endpoint: could not answer a request (%s)", reason)
        finally:
            self._slots.pop(slot, None)
            if self._room is not None:
                self._update_room()
            if writer.transport.get_write_buffer_size():  # the peer did not take the answer in time
                writer.transport.abort()
            else:
                writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> h11.Request | bytes:
        """The request, or the whole answer refusing it (empty: it closed first)."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=ENDPOINT_REQUEST_BYTES)
        budget = ENDPOINT_REQUEST_BYTES
        try:
            event = connection.next_event()
            while event is h11.NEED_DATA:
                if budget <= 0:  # h11's limit is on an incomplete head: a whole one may be larger
                    return _refused(431)
                data = await reader.read(min(budget, 65536))
                budget -= len(data)
                connection.receive_data(data)
                event = connection.next_event()
        except h11.RemoteProtocolError as exc:  # not HTTP, or a head over ENDPOINT_REQUEST_BYTES (431)
            return _refused(exc.error_status_hint)
        return event if isinstance(event, h11.Request) else b""

    async def _answer(self, request: h11.Request) -> bytes:
        path = request.target.decode("latin-1").partition("?")[0]
        method = request.method.decode("ascii")
        head_only = method == "HEAD"
        if path != METRICS_PATH:
            return _refused(404, head_only=head_only)
        if method not in ("GET", "HEAD"):
            return _refused(405, head_only=head_only)
        fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
        assert self._turn is not None
        async with self._turn:  # one at a time, SCRAPES_PER_SECOND at most
            loop = asyncio.get_running_loop()
            wait = self._next_answer - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_answer = loop.time() + 1 / SCRAPES_PER_SECOND
            headers, output = self.rendered.render(fields.get("accept"), fields.get("accept-encoding"))
        headers.append(("Content-Length", str(len(output))))
        return _whole(200, headers, output, head_only=head_only)


class EndpointThread:
    """A :class:`LoopEndpoint` on an event loop of its own, in a daemon thread: the ``--workers``
    parent's (its main thread supervises and runs no loop)."""

    def __init__(self, endpoint: LoopEndpoint) -> None:
        self.endpoint = endpoint
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._started = threading.Event()

    def start(self) -> EndpointThread:
        self._thread.start()
        self._started.wait(10)
        return self

    def _run(self) -> None:
        loop = self.loop
        try:
            loop.run_until_complete(self.endpoint.start())
            self._started.set()
            loop.run_forever()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        finally:
            self._started.set()
            loop.close()

    def _stop(self) -> None:
        self.endpoint.close()
        self.loop.stop()

    def close(self) -> None:
        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self.loop.call_soon_threadsafe(self._stop)
            self._thread.join(10)
        else:
            self.endpoint.sock.close()
