"""What ``/metrics`` shows: :class:`Metrics` (this process's recorder and registry), the
``prometheus-client`` families made of the counts, and :class:`Rendered`, the cached rendering."""

from __future__ import annotations

import gzip
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from time import monotonic

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    GCCollector,
    Metric,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

from app.metrics.core import BUCKETS, OTHER, UNMATCHED, Recorder
from app.metrics.files import CellFile, Entry, owner, read_all, worker_pids
from client.net.throttle import Throttle

DIR_ENV = "UDS_WORKERS_METRICS_DIR"  # how the --workers parent names its directory to its workers
RENDER_EVERY = 1.0  # seconds a rendering is served before the next scrape collects again
MAX_COPIES = 4  # formats (and compressions) rendered per RENDER_EVERY; further ones get the text format
_PROCESS_SUMS = ("process_cpu", "process_resident", "process_virtual", "process_open_fds")  # added up
_DEGRADED = Throttle(logging.getLogger("app.metrics"))
_REQUEST = ["method", "route", "status"]
_BOUNDS = [*(repr(bound) for bound in BUCKETS), "+Inf"]


class Metrics:
    """This process's :class:`Recorder` and the registry ``/metrics`` shows: its own counts, or
    with ``directory`` (``--workers``) every worker's files."""

    def __init__(self, *, directory: str | None = None, shown_uids: Iterable[int] = ()) -> None:
        self.file: CellFile | None = None
        if directory:
            try:
                self.file = CellFile(directory)
            except OSError as exc:  # a full disk: serve all the same, this worker's counts unseen
                message = "Metrics: cannot create this worker's file in %s (%s); its counts are left out"
                message += " of /metrics (free some space)"
                _DEGRADED.log(logging.WARNING, message, directory, exc.strerror or exc)
        self.recorder = Recorder(shown_uids, self.file)
        self.open_connections: Callable[[], int] = lambda: 0  # the server points them at its
        self.event_streams: Callable[[], int] = lambda: 0  # connections and the hub's streams
        if not directory:
            registry = CollectorRegistry()
            registry.register(self)
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        else:
            registry = exposition_registry(directory)
        # With --workers each scrape reads the files afresh: views never go backwards.
        self.rendered = Rendered(registry, every=0.0 if directory else RENDER_EVERY)

    def collect(self) -> Iterable[Metric]:
        """This process's ``uds_*`` families (its registry's collector)."""
        gauges = (float(self.open_connections()), float(self.event_streams()))
        return request_families(list(self.recorder.records.items()), gauges)

    def flush(self) -> None:
        """With ``--workers``, write the gauges to this worker's file (every tick, and at the end)."""
        if self.file is not None:
            self.file.set_gauges(self.open_connections(), self.event_streams())


def request_families(entries: Iterable[Entry], gauges: tuple[float, float]) -> Iterator[Metric]:
    """The ``uds_*`` families from records and the two gauges (connections, streams)."""
    requests: dict[tuple[str, str, str], float] = {}
    durations: dict[tuple[str, str], list[float]] = {}
    peers: dict[str, float] = {}
    stored = 0.0
    for labels, counts in entries:
        kind, *named = (str(label) for label in labels)
        if kind == "cell":
            key, answered = (named[0], named[1], named[2]), sum(counts[:-1])
            stored += answered if labels[4] else 0.0
            if labels[5]:  # timed
                kept = durations.setdefault(key[:2], [0.0] * len(counts))
                kept[:] = [a + b for a, b in zip(kept, counts, strict=False)]
        elif kind == "refused":
            key, answered = (named[0], UNMATCHED, named[1]), counts[0]
        else:
            peers[named[0]] = peers.get(named[0], 0.0) + counts[0]
            continue
        requests[key] = requests.get(key, 0.0) + answered
    family = CounterMetricFamily(
        "uds_requests", "Requests answered, by method, route template and status.", labels=_REQUEST
    )
    histogram = HistogramMetricFamily(
        "uds_request_duration_seconds",
        "Seconds from the parsed request head to the response head, by method and route template.",
        labels=_REQUEST[:2],
    )
    by_uid = CounterMetricFamily(
        "uds_peer_requests",
        f'Requests by the socket peer\'s uid: the uids --metrics-uid names, the others as uid="{OTHER}".',
        labels=["uid"],
    )
    for labelled, value in sorted(requests.items()):
        family.add_metric(labelled, value)
    for timed, sums in sorted(durations.items()):
        histogram.add_metric(timed, list(zip(_BOUNDS, accumulate(sums[:-1]), strict=True)), sums[-1])
    for uid, value in sorted(peers.items()):
        by_uid.add_metric([uid], value)
    yield from (family, histogram, by_uid)
    yield CounterMetricFamily("uds_messages_stored", "Messages stored (201 answers to POST).", value=stored)
    yield GaugeMetricFamily(
        "uds_open_connections", "Connections open to the server (all workers).", gauges[0]
    )
    yield GaugeMetricFamily("uds_event_streams", "Event streams open (all workers).", gauges[1])


class Rendered:
    """A registry's exposition, collected at most once per ``every`` seconds, kept as one copy per
    format and compression (at most :data:`MAX_COPIES`; past them, or for an ``Accept``
    prometheus-client cannot read, the text format). Thread-safe."""

    def __init__(self, registry: Collector, every: float = RENDER_EVERY) -> None:
        self.registry = registry
        self.every = every
        self._families: list[Metric] = []
        self._taken = float("-inf")
        self._copies: dict[tuple[str, bool], bytes] = {}
        self._lock = threading.Lock()

    def collect(self) -> list[Metric]:  # what the encoders read
        return self._families

    def render(self, accept: str | None, accept_encoding: str | None) -> tuple[list[tuple[str, str]], bytes]:
        """The headers (``Content-Type``, ``Content-Encoding``) and body of a scrape."""
        try:
            encoder, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):
            encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
        compress = gzip_accepted(accept_encoding or "")
        with self._lock:
            if monotonic() - self._taken >= self.every:
                self._families = list(self.registry.collect())
                self._taken = monotonic()
                self._copies.clear()
            if (content_type, compress) not in self._copies and len(self._copies) >= MAX_COPIES:
                encoder, content_type = generate_latest, CONTENT_TYPE_PLAIN_0_0_4
            if (content_type, compress) not in self._copies:
                output = encoder(self)
                self._copies[content_type, compress] = gzip.compress(output, 6) if compress else output
            output = self._copies[content_type, compress]
        return [("Content-Type", content_type), *([("Content-Encoding", "gzip")] if compress else [])], output


def exposition_registry(directory: str) -> CollectorRegistry:
    """A registry showing every process's metrics from the ``--workers`` ``directory``."""
    registry = CollectorRegistry()
    registry.register(_Workers(directory))
    PlatformCollector(registry=registry)
    return registry


class _Workers(Collector):
    """The ``uds_*`` families of every process in ``directory``, and ``process_*`` over its owner (the
    parent) and its live workers, the same in every view: CPU, memory and open files add up; start
    time and ``max_fds`` are the owner's."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.owner = owner(directory) or os.getpid()

    def collect(self) -> Iterable[Metric]:
        yield from request_families(*read_all(self.directory))
        pids = [self.owner, *(pid for pid in worker_pids(self.directory) if pid != self.owner)]
        merged: dict[str, Metric] = {}
        for pid in pids:
            if not os.path.exists(f"/proc/{pid}"):
                continue
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():  # type: ignore[misc]
                seen = merged.setdefault(family.name, family)
                if seen is not family and family.name.startswith(_PROCESS_SUMS) and family.samples:
                    seen.samples[0] = seen.samples[0]._replace(
                        value=seen.samples[0].value + family.samples[0].value
                    )
        yield from merged.values()
