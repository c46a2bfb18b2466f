"""Prometheus metrics: plain numbers added on the hot path, read by a collector at each exposition.

What is measured
    ``uds_requests_total{method,route,status}``, ``uds_request_duration_seconds{method,route}``
    (seconds from the parsed request head to the response head: a long event stream counts once,
    when it starts), ``uds_messages_stored_total`` (201 answers of ``create_message``),
    ``uds_open_connections``, ``uds_event_streams``, ``uds_peer_requests_total{uid}`` and the
    process metrics (``process_*``, ``python_*``). The labels are bounded whatever peers send
    (:meth:`Recorder.cell`): ``method`` is one of :data:`METHODS` or ``other``; ``route`` is the
    route template (``/v1/messages/{message_id}``), or ``unmatched`` for a request that reached no
    route that serves its method, or that the protocol refused before routing (400, 408, 431, 503
    at the connection cap). ``uid`` (SO_PEERCRED; a ``uds-client proxy`` counts as its own uid) is
    opt-in: only the uids ``--metrics-uid`` names, the others as ``other``.

Where it is counted
    The protocol (``app.connection.protocol``) sees every request: it sends each request's answer
    through :func:`timed_send`, which adds the request to its cell (a list of numbers) when the
    response starts. No ASGI layer wraps the application, and no ``prometheus-client`` object is
    written on the hot path (too slow per request: docs/performance.md, k). At each
    exposition :class:`RequestCollector` builds the families from the cells; :class:`Rendered`
    serves a rendering for up to a second.

Workers
    With ``--workers N`` the parent creates a private directory (:func:`multiprocess_dir`) and
    names it to the workers in :data:`DIR_ENV`. Each worker's cells are records of its own shared
    file (``app.metrics.files``); the parent serves the one TCP endpoint over all the files, folds a
    dead worker's file into the totals (:func:`worker_gone`) and removes the directory at exit.
    Gauges add up over live workers; ``process_*`` over the parent and the live workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import gzip
import ipaddress
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from itertools import accumulate
from time import monotonic, perf_counter
from typing import Any, TypeAlias

import h11
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import (
    CONTENT_TYPE_PLAIN_0_0_4,
    choose_encoder,
    generate_latest,
    gzip_accepted,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from app.config import Settings
from app.logs import Throttle, escaped
from app.metrics.files import CellFile, Entry, absorb, read_all, worker_pids

__all__ = [
    "BUCKETS",
    "ENDPOINT_ACCEPTS_PER_SECOND",
    "ENDPOINT_CONNECTIONS",
    "ENDPOINT_DEADLINE",
    "ENDPOINT_PER_SOURCE",
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
    "timed_send",
    "worker_gone",
]

log = logging.getLogger("app.metrics.core")

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
ENDPOINT_PER_SOURCE = 4
"""Of :data:`ENDPOINT_CONNECTIONS`, those one source address may hold (every loopback address counts
as one): a newcomer past them takes the place of its own address's oldest unfinished one, else it is
closed at once, so one address cannot hold the port, nor its turns, against a scraper at another."""
ENDPOINT_ACCEPTS_PER_SECOND = 400
"""Connections the TCP endpoint accepts per second at most: refusing one past its address's share
costs an accept and a reset, and a flood of them on the server's loop took POST throughput to 0.16x;
the rest wait in the listen queue, a scraper behind at most a flood's connections / this rate."""
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
DIR_ENV = "UDS_WORKERS_METRICS_DIR"
"""Where the ``--workers`` parent tells its workers their shared metrics directory is."""
_ENDPOINT_FAILED = Throttle(log)
_DEGRADED = Throttle(log)
_REQUEST_LABELS = ["method", "route", "status"]
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


Counts: TypeAlias = "list[float] | memoryview[float]"
"""A cell's numbers: a list in this process's memory, or doubles in its shared file (``--workers``)."""


class Recorder:
    """Plain counts, kept on the event loop thread (no lock, no allocation once a series exists).

    A request is counted in one *cell*, by the route object FastAPI's router matched (by ``id()``:
    Starlette routes are not hashable; the app's routes live as long as it does), the method and
    the status: the requests in each bucket of :data:`BUCKETS` and above the last, then the sum of
    their seconds; and once in its connection's :class:`PeerTally` (:meth:`peer`).
    Cells are bounded by the app's routes, the methods httptools parses and the statuses the app
    answers; their labels far more (:meth:`cell`), peers by :data:`MAX_PEER_UIDS` + 2 labels.

    With ``--workers`` a cell is a record of the worker's shared file (:class:`CellFile`), written
    as the request is answered: a killed worker's counts stay. A record the file cannot take (a
    full disk) is kept in memory, out of the shared view, with one throttled warning.
    """

    __slots__ = ("cells", "file", "labels", "on", "peers", "records", "refusals", "shown_uids", "timed_send")

    def __init__(self, on: bool = True, shown_uids: Iterable[int] = (), file: CellFile | None = None) -> None:
        self.on = on
        """Count requests (always, but in the benchmark that measures what counting costs)."""
        self.shown_uids = frozenset(shown_uids)
        """The peer uids counted under their own label (``--metrics-uid``)."""
        self.file = file
        """This worker's shared file (``--workers``), or None."""
        self.cells: dict[tuple[int, str, int], Counts] = {}
        self.labels: dict[tuple[int, str, int], tuple[str, str, str, bool, bool]] = {}
        """Each cell's method, route template and status labels, whether its requests stored a
        message, and whether they are timed (they reached an operation)."""
        self.records: dict[tuple[object, ...], Counts] = {}
        """Every cell by its labels (raw methods outside :data:`METHODS` share one)."""
        self.peers: dict[int | str | None, PeerTally] = {}
        """Requests by uid label; every request counts here once (under None when not shown)."""
        self.refusals: dict[tuple[str, int], Counts] = {}
        """Requests the protocol answered itself, before routing, by method label and status."""
        self.timed_send = timed_send(self) if on else None
        """The protocol's request cycles' ``send`` when counting (:func:`timed_send`)."""

    def _record(self, labels: tuple[object, ...], count: int) -> Counts:
        found = self.records.get(labels)
        if found is None:
            if self.file is not None:
                found = self.file.record(labels, count)
                if found is None:
                    _DEGRADED.log(
                        logging.WARNING,
                        "Metrics: this worker's file %s is full; new series are kept in memory and "
                        "left out of /metrics",
                        self.file.path,
                    )
            if found is None:
                found = [0.0] * count
            self.records[labels] = found
        return found

    def peer(self, uid: int | None) -> PeerTally:
        """Where a connection's requests count: its peer's uid if ``--metrics-uid`` names it, else
        :data:`OTHER` (or None, not shown, when no uid is named or there is no peer: TCP)."""
        label: int | str | None = uid
        if uid is None or uid not in self.shown_uids:
            label = OTHER if self.shown_uids and uid is not None else None
        tally = self.peers.get(label)
        if tally is None:
            counts = self._record(("peer", str(label)), 1) if label is not None else [0.0]
            tally = self.peers[label] = PeerTally(label, counts)
        return tally

    def cell(self, key: tuple[int, str, int], route: object) -> Counts:
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
            labels = self.labels[key] = (method, path or UNMATCHED, str(key[2]), stores, timed)
            found = self.cells[key] = self._record(("cell", *labels), len(BUCKETS) + 2)
        return found

    def refused(self, method: str, status: int, tally: PeerTally) -> None:
        """A request the protocol answered itself, before routing (no duration is recorded)."""
        key = (method if method in METHODS else OTHER, status)
        counts = self.refusals.get(key)
        if counts is None:
            counts = self.refusals[key] = self._record(("refused", *key), 1)
        counts[0] += 1
        tally.counts[0] += 1

    def entries(self) -> list[Entry]:
        """Every record: its labels and its counts (as :func:`read_all` reads them from files)."""
        return [(labels, counts) for labels, counts in self.records.items()]


class PeerTally:
    """The requests counted under one uid label, shared by the connections with that label.

    A slot, not a dict entry keyed by label: that cost a measurable share of a POST
    (docs/performance.md, k)."""

    __slots__ = ("counts", "label")

    def __init__(self, label: int | str | None, counts: Counts) -> None:
        self.label = label
        self.counts = counts
        """One number: the requests (in the worker's shared file when shown with ``--workers``)."""


def timed_send(recorder: Recorder) -> Callable[[RequestResponseCycle, PeerTally], Callable[[Any], Any]]:
    """What makes a request cycle's ``send`` that also counts the request in ``recorder`` when the
    response starts (an answer to a peer already gone is not counted: it is never sent).

    The protocol sets ``cycle.send = timed(cycle, tally)`` once the request head is parsed (the
    duration starts then: uvloop's clock counts whole milliseconds, so ``time.perf_counter()``);
    ``tally`` is the connection's :class:`PeerTally`. Once counted, the cycle's own ``send`` is back.
    """
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


# -- exposition ---------------------------------------------------------------------------------------


class RequestCollector(Collector):
    """The ``uds_*`` families from records (:meth:`Recorder.entries` or :func:`read_all`), built
    with ``prometheus-client``'s public metric families at each collection."""

    def __init__(self, source: Callable[[], tuple[Iterable[Entry], tuple[float, float]]]) -> None:
        self.source = source
        """The records and the two gauges (open connections, event streams)."""

    def collect(self) -> Iterable[Metric]:
        entries, (connections, streams) = self.source()
        requests: dict[tuple[str, str, str], float] = {}
        durations: dict[tuple[str, str], list[float]] = {}
        peers: dict[str, float] = {}
        stored = 0.0
        for labels, counts in entries:
            kind = labels[0]
            if kind == "cell":
                method, route, status = str(labels[1]), str(labels[2]), str(labels[3])
                stores, timed = bool(labels[4]), bool(labels[5])
                answered = sum(counts[:-1])
                key = (method, route, status)
                requests[key] = requests.get(key, 0.0) + answered
                stored += answered if stores else 0.0
                if timed:
                    kept = durations.setdefault((method, route), [0.0] * len(counts))
                    for index, value in enumerate(counts):
                        kept[index] += value
            elif kind == "refused":
                refused = (str(labels[1]), UNMATCHED, str(labels[2]))
                requests[refused] = requests.get(refused, 0.0) + counts[0]
            elif kind == "peer":
                peers[str(labels[1])] = peers.get(str(labels[1]), 0.0) + counts[0]
        family = CounterMetricFamily(
            "uds_requests", "Requests answered, by method, route template and status.", labels=_REQUEST_LABELS
        )
        for labelled, value in sorted(requests.items()):
            family.add_metric(labelled, value)
        yield family
        histogram = HistogramMetricFamily(
            "uds_request_duration_seconds",
            "Seconds from the parsed request head to the response head, by method and route template.",
            labels=["method", "route"],
        )
        bounds = [*(repr(bound) for bound in BUCKETS), "+Inf"]
        for timed_labels, sums in sorted(durations.items()):
            cumulative = list(accumulate(sums[:-1]))
            histogram.add_metric(timed_labels, list(zip(bounds, cumulative, strict=True)), sums[-1])
        yield histogram
        yield CounterMetricFamily(
            "uds_messages_stored", "Messages stored (201 answers to POST).", value=stored
        )
        yield GaugeMetricFamily(
            "uds_open_connections", "Connections open to the server (all workers).", connections
        )
        yield GaugeMetricFamily("uds_event_streams", "Event streams open (all workers).", streams)
        by_uid = CounterMetricFamily(
            "uds_peer_requests",
            f'Requests by the socket peer\'s uid: the uids --metrics-uid names, the others as uid="{OTHER}".',
            labels=["uid"],
        )
        for uid, value in sorted(peers.items()):
            by_uid.add_metric([uid], value)
        yield by_uid


class Metrics:
    """This process's metrics: the :class:`Recorder` and the registry ``/metrics`` shows (this
    process's alone, or with ``directory``, ``--workers``, every worker's files)."""

    def __init__(
        self, *, on: bool = True, directory: str | None = None, shown_uids: Iterable[int] = ()
    ) -> None:
        self.directory = directory if directory is not None else os.environ.get(DIR_ENV) or None
        file = None
        if self.directory is not None:
            try:
                file = CellFile(self.directory)
            except OSError as exc:  # a full disk: serve all the same, this worker's counts unseen
                _DEGRADED.log(
                    logging.WARNING,
                    "Metrics: cannot create this worker's file in %s (%s); its counts are left out of "
                    "/metrics (free some space)",
                    self.directory,
                    exc.strerror or exc,
                )
        self.file = file
        self.recorder = Recorder(on, shown_uids, file)
        self.open_connections: Callable[[], int] = lambda: 0
        """Read at each flush; the server points it at uvicorn's connection set."""
        self.event_streams: Callable[[], int] = lambda: 0
        """Read at each flush; the event hub's count of open streams."""
        if self.directory is None:
            self.registry = CollectorRegistry()
            self.registry.register(RequestCollector(self._own))
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
            every = RENDER_EVERY
        else:
            self.registry = exposition_registry(self.directory)
            every = 0.0  # each worker renders what the files hold now: views never go backwards
        self.rendered = Rendered(self.registry, every=every)
        """What ``/metrics`` serves, on the socket and on the single process's TCP port."""

    def _own(self) -> tuple[list[Entry], tuple[float, float]]:
        return self.recorder.entries(), (float(self.open_connections()), float(self.event_streams()))

    def flush(self) -> None:
        """With ``--workers``, write the gauges to this worker's file (every tick, and at the end)."""
        if self.file is not None:
            self.file.set_gauges(self.open_connections(), self.event_streams())

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

    def __init__(self, registry: Collector, every: float = RENDER_EVERY) -> None:
        self.registry = registry
        self.every = every
        """Seconds a collection is served (0: each scrape collects)."""
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
            if now - self._taken >= self.every:
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
    registry.register(RequestCollector(lambda: read_all(directory)))
    registry.register(_ProcessesCollector(directory))
    PlatformCollector(registry=registry)
    return registry


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
        found = set(worker_pids(self.directory))
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
    """A worker exited: fold its file into the dead workers' totals (its counts stay, its gauges go).
    On a full disk its file stays and counts as before, with one throttled warning."""
    try:
        absorb(directory, pid)
    except OSError as exc:
        _DEGRADED.log(
            logging.WARNING,
            "Metrics: cannot fold worker pid %d's counts in %s (%s); its file stays",
            pid,
            directory,
            exc.strerror or exc,
        )


@contextlib.contextmanager
def for_workers(settings: Settings) -> Iterator[Callable[[int], None]]:
    """The parent's side of ``--workers``: the multiprocess directory (in the temporary directory,
    else in ``--data-dir``) set in the environment the workers inherit, the one TCP endpoint (if
    ``--metrics-listen``) over every worker's files; yields the callback that folds a dead worker's
    counts (by pid) and drops its gauges. All of it is undone on exit.

    Raises :class:`MetricsError` when the directory cannot be made or the endpoint cannot listen.
    """
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

    try:
        os.environ[DIR_ENV] = directory
        if settings.metrics_listen is not None:
            rendered = Rendered(exposition_registry(directory))
            endpoint = EndpointThread(LoopEndpoint(settings.metrics_listen, rendered)).start()
        yield lambda pid: worker_gone(pid, directory)
    finally:
        if endpoint is not None:
            endpoint.close()
        os.environ.pop(DIR_ENV, None)
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
        sock.listen(1024)  # a flood refused at once must not fill it before a scraper arrives
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

    __slots__ = ("conn", "source", "task", "whole", "writer")

    def __init__(self, conn: socket.socket, source: str) -> None:
        self.conn = conn
        self.source = source
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None
        self.whole = False

    def drop(self) -> None:
        """Cut the connection at once (its task is cancelled; one not yet opened closes its socket
        itself: the loop may be watching it already)."""
        if self.writer is not None:
            self.writer.transport.abort()
        if self.task is not None:
            self.task.cancel()


_ACCEPT_BATCH = 64
"""Connections accepted one after another before the loop runs other work (a flood is refused at
about the rate it comes, for a fraction of what a round of the loop each would cost)."""
_ACCEPT_BURST = 0.05
"""Seconds of :data:`ENDPOINT_ACCEPTS_PER_SECOND` an idle endpoint may accept at once."""
_RESET = struct.pack("ii", 1, 0)
"""``SO_LINGER`` on, 0 s: a refused connection is reset, leaving nothing in ``TIME_WAIT``."""


def _source(address: Any) -> str:
    """The share a peer's address counts in: its IP, or ``loopback`` for any loopback one (a local
    peer may bind any of 127.0.0.0/8)."""
    host = str(address[0]) if isinstance(address, tuple) and address else ""
    if host.startswith(("127.", "::ffff:127.")) or host == "::1":  # the common case, without parsing
        return "loopback"
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host.partition("%")[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        if (mapped or ip).is_loopback:
            return "loopback"
    return host


class LoopEndpoint:
    """``GET /metrics`` on ``HOST:PORT`` over TCP, served by an event loop; nothing else.

    The single process's loop serves it (a thread beside uvicorn's loop cost 1.5-2% of ``POST
    /messages`` throughput just by being there), and with ``--workers`` the parent runs it on a
    loop of its own (:class:`EndpointThread`). Limits: :data:`ENDPOINT_CONNECTIONS` at once,
    :data:`ENDPOINT_PER_SOURCE` of them from one address, a newcomer evicting the oldest whose
    request head is not whole yet (idle or trickling: slowloris), of its own address when that has
    its share, and waiting in the listen queue while every one has sent a whole head;
    :data:`ENDPOINT_HEAD_DEADLINE` for the head, :data:`ENDPOINT_DEADLINE` for the whole exchange,
    :data:`ENDPOINT_REQUEST_BYTES` of request; one request a connection; answers (refusals too)
    one at a time, at most :data:`SCRAPES_PER_SECOND`, scrapes from :class:`Rendered` copies, so
    no request rate costs the API more than a few scrapes a second do.
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
        self._next_accept = 0.0

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
            slot.drop()
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
                conn, address = await loop.sock_accept(self.sock)
            except OSError:  # out of descriptors, or the peer already gone: the next one
                await asyncio.sleep(0.05)
                continue
            self._paced(loop.time())
            self._take(conn, address)
            for _ in range(_ACCEPT_BATCH):  # those already waiting, without a round of the loop each
                if not self._room.is_set() or self._paced(loop.time()):
                    break
                try:
                    conn, address = self.sock.accept()
                except OSError:  # none waiting (BlockingIOError), or out of descriptors
                    break
                self._take(conn, address)
            ahead = self._next_accept - loop.time()
            if ahead > 0:  # the rest wait in the listen queue, as their peers do (blocked, not spinning)
                await asyncio.sleep(ahead)

    def _paced(self, now: float) -> bool:
        """Count an accept against :data:`ENDPOINT_ACCEPTS_PER_SECOND`; whether the next must wait."""
        self._next_accept = max(self._next_accept, now - _ACCEPT_BURST) + 1 / ENDPOINT_ACCEPTS_PER_SECOND
        return self._next_accept > now

    def _take(self, conn: socket.socket, address: Any) -> None:
        """Serve an accepted connection, or reset it when its address's share (or every slot) is
        whole."""
        source = _source(address)
        mine = [slot for slot in self._slots if slot.source == source]
        full = mine if len(mine) >= ENDPOINT_PER_SOURCE else None
        if full is None and len(self._slots) >= ENDPOINT_CONNECTIONS:
            full = list(self._slots)
        if full is not None:
            evicted = next((slot for slot in full if not slot.whole and slot.writer is not None), None)
            if evicted is None:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                return
            del self._slots[evicted]
            evicted.drop()
        conn.setblocking(False)
        slot = _Slot(conn, source)
        self._slots[slot] = None
        slot.task = asyncio.get_running_loop().create_task(self._serve(slot))
        self._update_room()

    async def _serve(self, slot: _Slot) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=slot.conn, limit=ENDPOINT_REQUEST_BYTES)
        except (OSError, asyncio.CancelledError) as exc:
            slot.conn.close()
            self._slots.pop(slot, None)
            self._update_room()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        slot.writer = writer
        try:
            async with asyncio.timeout(ENDPOINT_DEADLINE):
                async with asyncio.timeout(ENDPOINT_HEAD_DEADLINE):
                    request = await self._read_request(reader)
                slot.whole = True
                self._update_room()
                if not request:  # it closed first
                    return
                assert self._turn is not None
                async with self._turn:  # one answer at a time, SCRAPES_PER_SECOND at most
                    loop = asyncio.get_running_loop()
                    wait = self._next_answer - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._next_answer = loop.time() + 1 / SCRAPES_PER_SECOND
                    answer = self._answer(request) if isinstance(request, h11.Request) else request
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

    def _answer(self, request: h11.Request) -> bytes:
        path = request.target.decode("latin-1").partition("?")[0]
        method = request.method.decode("ascii")
        head_only = method == "HEAD"
        if path != METRICS_PATH:
            return _refused(404, head_only=head_only)
        if method not in ("GET", "HEAD"):
            return _refused(405, head_only=head_only)
        fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
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
