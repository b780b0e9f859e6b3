"""Prometheus metrics of one process (issue 17): what it did, counted where it happens, and the queues read from the
index when scraped.

Counted in the process that does the work (prometheus-client's default registry, one per process):

- ``pacs_ingest_objects_total{source, outcome}``: objects received for archiving (``source``: c-store, stow,
  upload, import, reconcile, rejection, correction, report; ``outcome``: :class:`pacs.ingest.IngestStatus`);
- ``pacs_ingest_seconds{source}``: received → acknowledged (the whole object in hand until its outcome is known);
- ``pacs_dimse_find_seconds{level}``, ``pacs_qido_seconds{level}``: C-FIND (request to the final response) and
  QIDO-RS (request to the response's first byte) by query level;
- ``pacs_dicom_associations_open``, ``pacs_dicom_associations_total{result}`` (accepted, rejected, aborted);
- ``pacs_store_errors_total{operation}``, ``pacs_index_errors_total{operation}``: failures of the object store
  and of the index met while serving (``operation``: ingest, http, c-find).

Read from the index at scrape time (:class:`QueueCollector`), in whichever process is scraped:
``pacs_queue_jobs{queue, state}`` for the work that is not finished — derived tasks (pending, queued, running,
failed), forward jobs, storage-commitment reports and HL7 results (pending, failed) — and ``pacs_index_up``
(0 when those counts could not be read in time; the scrape itself still succeeds). Finished rows (done, sent,
reported) are history, not queue depth, and are never counted: every count is a range of an index whose first
column is ``state`` (forward jobs: one range per destination, found by a loose index scan), so a scrape costs
the same at 10^7 instances as at 10.

With several DICOM receiving processes (``PACS_DICOM_PROCESSES``, :mod:`pacs.receiving_processes`) the
associations and C-STOREs are counted in those processes; each sends its values (:func:`snapshot`) to the
supervising process, which adds what changed to its own metrics (:func:`add_snapshot_delta`), so the parent's
``/metrics`` (and `pacs scp`'s metrics port) show the whole server; a scrape first asks every receiving process
for its current values (:func:`install_receivers`). ``pacs_dicom_receiver_objects_total{receiver}`` counts the
C-STORE objects of each receiving process (1..N: how the kernel spread the connections).

No label carries patient data, a UID or an AE title (unbounded, and the latter two identify peers): labels are
fixed vocabularies, and anything else a peer sends (a C-FIND level) is folded into ``other``.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import column, func, select, text
from sqlalchemy import table as sql_table
from sqlalchemy.orm import Session, sessionmaker

import pacs
from pacs.health import Bounded, CheckFailed
from pacs.jobs import JobState

if TYPE_CHECKING:
    from pacs.context import AppContext

disable_created_metrics()  # no *_created series: a scraper has the process start time already

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: IngestSource.transport → the ``source`` label
SOURCES = {"dimse": "c-store", "stow": "stow", "upload": "upload", "import": "import", "reconcile": "reconcile",
           "rejection": "rejection", "correction": "correction", "report": "report"}
FIND_LEVELS = frozenset({"PATIENT", "STUDY", "SERIES", "IMAGE"})
QIDO_LEVELS = frozenset({"studies", "series", "instances"})

INGESTED = Counter("pacs_ingest_objects", "Objects received for archiving, by source and outcome",
                   ["source", "outcome"])
INGEST_SECONDS = Histogram("pacs_ingest_seconds", "Time from an object received to its outcome (acknowledged)",
                           ["source"], buckets=LATENCY_BUCKETS)
FIND_SECONDS = Histogram("pacs_dimse_find_seconds", "C-FIND duration, request to final response, by level",
                         ["level"], buckets=LATENCY_BUCKETS)
QIDO_SECONDS = Histogram("pacs_qido_seconds", "QIDO-RS duration, request to first byte of the answer, by level",
                         ["level"], buckets=LATENCY_BUCKETS)
ASSOCIATIONS_OPEN = Gauge("pacs_dicom_associations_open", "DICOM associations accepted and not yet closed")
ASSOCIATIONS = Counter("pacs_dicom_associations", "DICOM associations by result (accepted, rejected, aborted)",
                       ["result"])
STORE_ERRORS = Counter("pacs_store_errors", "Object store failures met while serving, by operation", ["operation"])
INDEX_ERRORS = Counter("pacs_index_errors", "Index database failures met while serving, by operation", ["operation"])
RECEIVER_OBJECTS = Counter("pacs_dicom_receiver_objects", "C-STORE objects received, by DICOM receiving process "
                           "(PACS_DICOM_PROCESSES over 1)", ["receiver"])
PROCESS = Info("pacs_process", "Which pacs process this is (role: serve, api, scp, worker, hl7) and its version")

for _result in ("accepted", "rejected", "aborted"):
    ASSOCIATIONS.labels(_result)
for _operation in ("ingest", "http"):
    STORE_ERRORS.labels(_operation)
for _operation in ("ingest", "http", "c-find"):
    INDEX_ERRORS.labels(_operation)


# -- the calls the hot paths make: a counter increment and a histogram observation, nothing else -----------

def ingest_observed(transport: str, outcome: str, seconds: float) -> None:
    source = SOURCES.get(transport, "other")
    INGESTED.labels(source, outcome).inc()
    INGEST_SECONDS.labels(source).observe(seconds)


def find_observed(level: str, seconds: float) -> None:
    FIND_SECONDS.labels(level if level in FIND_LEVELS else "other").observe(seconds)


def qido_observed(level: str, seconds: float) -> None:
    QIDO_SECONDS.labels(level if level in QIDO_LEVELS else "other").observe(seconds)


def association_accepted() -> None:
    ASSOCIATIONS.labels("accepted").inc()
    ASSOCIATIONS_OPEN.inc()


def association_closed(aborted: bool) -> None:
    """An accepted association ended (released, aborted or the connection dropped)."""
    ASSOCIATIONS_OPEN.dec()
    if aborted:
        ASSOCIATIONS.labels("aborted").inc()


def association_rejected() -> None:
    ASSOCIATIONS.labels("rejected").inc()


def store_error(operation: str) -> None:
    STORE_ERRORS.labels(operation).inc()


def index_error(operation: str) -> None:
    INDEX_ERRORS.labels(operation).inc()


# -- several receiving processes (pacs.receiving_processes) --------------------------------------------------

#: what a receiving process counts and its supervisor adds to its own
RECEIVED: tuple[Counter | Gauge | Histogram, ...] = (INGESTED, INGEST_SECONDS, FIND_SECONDS, ASSOCIATIONS_OPEN,
                                                   ASSOCIATIONS, STORE_ERRORS, INDEX_ERRORS)
#: metric name → label values → values (a counter's or gauge's value; a histogram's buckets, then its sum)
Snapshot = dict[str, dict[tuple[str, ...], list[float]]]


def _children(metric: Any) -> list[tuple[tuple[str, ...], Any]]:
    if not metric._labelnames:
        return [((), metric)]
    with metric._lock:
        return list(metric._metrics.items())


def snapshot() -> Snapshot:
    """This process's values of :data:`RECEIVED` (prometheus-client's value holders, read as they are)."""
    out: Snapshot = {}
    for metric in RECEIVED:
        values: dict[tuple[str, ...], list[float]] = {}
        for labels, child in _children(metric):
            if isinstance(metric, Histogram):
                values[labels] = [bucket.get() for bucket in child._buckets] + [child._sum.get()]
            else:
                values[labels] = [child._value.get()]
        out[metric._name] = values
    return out


def add_snapshot_delta(before: Snapshot, after: Snapshot, receiver: str) -> None:
    """Add to this process's metrics what a receiving process counted between two of its snapshots."""
    by_name = {metric._name: metric for metric in RECEIVED}
    for name, values in after.items():
        metric = by_name.get(name)
        if metric is None:
            continue
        previous = before.get(name, {})
        for labels, now in values.items():
            deltas = [value - old for value, old in zip(now, previous.get(labels, [0.0] * len(now)), strict=False)]
            if not any(deltas):
                continue
            child: Any = metric.labels(*labels) if labels else metric
            if isinstance(metric, Histogram):
                for bucket, delta in zip(child._buckets, deltas[:-1], strict=False):
                    bucket.inc(delta)
                child._sum.inc(deltas[-1])
            else:
                child._value.inc(deltas[0])
            if metric is INGESTED and labels and labels[0] == SOURCES["dimse"]:
                RECEIVER_OBJECTS.labels(receiver).inc(deltas[0])


def retired(last: Snapshot) -> Snapshot:
    """What a receiving process that ended leaves: its counts stay, its gauges go back to zero."""
    return {name: {labels: ([0.0] if name == ASSOCIATIONS_OPEN._name else values) for labels, values in
                   series.items()} for name, series in last.items()}


class _ReceiverSync(Collector):
    """Registered first: at each scrape, the receiving processes' current values are added before the
    metrics are read."""

    def __init__(self, pull: Callable[[], None]) -> None:
        self.pull = pull

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        try:
            self.pull()
        except Exception:  # a scrape never fails for it: the last values pushed are shown
            logging.getLogger("pacs.metrics").exception("receiving processes' metrics not read")
        return iter(())


_sync: _ReceiverSync | None = None


def install_receivers(pull: Callable[[], None]) -> None:
    """Pull the receiving processes' values at each scrape (idempotent: the latest ``pull`` wins)."""
    global _sync
    with _lock:
        if _sync is not None:
            _sync.pull = pull
            return
        _sync = _ReceiverSync(pull)
        REGISTRY.register(_sync)
        for metric in (*RECEIVED, RECEIVER_OBJECTS):  # collected after the sync: registered again, after it
            REGISTRY.unregister(metric)
            REGISTRY.register(metric)


# -- queue depths, read from the index at scrape time -------------------------------------------------------

#: (queue label, table, the unfinished states counted)
QUEUES: tuple[tuple[str, str, tuple[JobState, ...]], ...] = (
    ("derived", "derived_task", (JobState.PENDING, JobState.QUEUED, JobState.RUNNING, JobState.FAILED)),
    ("forward", "forward_job", (JobState.PENDING, JobState.FAILED)),
    ("commitment", "storage_commitment", (JobState.PENDING, JobState.FAILED)),
    ("hl7", "hl7_outbound", (JobState.PENDING, JobState.FAILED)),
)

# forward_job's index is (destination_ae, state, next_attempt_at): one range per destination, the destinations
# found by a loose index scan (each step one index lookup), counted by correlated subqueries (one range each).
# Plain SQL that SQLite and PostgreSQL both run this way.
_FORWARD_DEPTHS = text("""
WITH RECURSIVE dest(ae) AS (
    SELECT MIN(destination_ae) FROM forward_job
    UNION ALL
    SELECT (SELECT MIN(f.destination_ae) FROM forward_job f WHERE f.destination_ae > dest.ae)
    FROM dest WHERE dest.ae IS NOT NULL
)
SELECT
    (SELECT COUNT(*) FROM forward_job f WHERE f.destination_ae = dest.ae AND f.state = 'pending'),
    (SELECT COUNT(*) FROM forward_job f WHERE f.destination_ae = dest.ae AND f.state = 'failed')
FROM dest WHERE dest.ae IS NOT NULL
""")

QUERY_TIMEOUT_S = 2.0


def read_queue_depths(session: Session) -> dict[tuple[str, str], int]:
    """``{(queue, state): count}`` for every queue and unfinished state of :data:`QUEUES` (zeros included)."""
    if session.get_bind().dialect.name == "postgresql":  # the thread's deadline aside, the server stops too
        session.execute(text(f"SET LOCAL statement_timeout = {int(QUERY_TIMEOUT_S * 1000)}"))
    depths = {(queue, str(state)): 0 for queue, _, states in QUEUES for state in states}
    for queue, table, states in QUEUES:
        if queue == "forward":
            for pending, failed in session.execute(_FORWARD_DEPTHS):
                depths[(queue, "pending")] += int(pending)
                depths[(queue, "failed")] += int(failed)
            continue
        jobs = sql_table(table, column("state"))
        rows = session.execute(select(jobs.c.state, func.count()).where(jobs.c.state.in_([str(s) for s in states]))
                               .group_by(jobs.c.state))
        for name, count in rows:
            depths[(queue, str(name))] = int(count)
    return depths


class QueueCollector(Collector):
    """``pacs_queue_jobs`` and ``pacs_index_up``, read when scraped, within :data:`QUERY_TIMEOUT_S`."""

    def __init__(self, read_sessions: sessionmaker[Session], timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self.read_sessions = read_sessions
        self.timeout_s = timeout_s
        self._bounded = Bounded()

    def describe(self) -> Iterable[GaugeMetricFamily]:  # registering must not query the index
        return [GaugeMetricFamily("pacs_index_up", ""), GaugeMetricFamily("pacs_queue_jobs", "")]

    def _read(self) -> dict[tuple[str, str], int]:
        with self.read_sessions() as session, session.begin():
            return read_queue_depths(session)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            depths: dict[tuple[str, str], int] | None = self._bounded.call("queues", self._read, self.timeout_s)
        except CheckFailed:
            depths = None
        up = GaugeMetricFamily("pacs_index_up", "1 when the queue depths could be read from the index in time")
        up.add_metric([], 0 if depths is None else 1)
        yield up
        if depths is None:
            return
        jobs = GaugeMetricFamily("pacs_queue_jobs", "Unfinished jobs in the index, by queue and state",
                                 labels=["queue", "state"])
        for (queue, state), count in sorted(depths.items()):
            jobs.add_metric([queue, state], count)
        yield jobs


# -- one registration per process --------------------------------------------------------------------------

_lock = threading.Lock()
_collector: QueueCollector | None = None


def install(ctx: AppContext, role: str) -> None:
    """Name the process and read the queues from its index when scraped (idempotent: the latest context wins)."""
    global _collector
    PROCESS.info({"role": role, "version": pacs.__version__})
    with _lock:
        if _collector is None:
            _collector = QueueCollector(ctx.read_sessions)
            REGISTRY.register(_collector)
        else:
            _collector.read_sessions = ctx.read_sessions


def exposition() -> tuple[bytes, str]:
    """The process's metrics in the Prometheus text format, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# -- who may scrape --------------------------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_allow_list(entries: Iterable[str]) -> list[Network]:
    """Addresses and CIDRs (``"10.0.0.0/8"``, ``"::1"``) as networks; ValueError names a bad entry."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or CIDR: {entry[:64]!r}") from None
    return networks


def peer_allowed(host: str, allowed: Iterable[Network]) -> bool:
    """Whether the peer address ``host`` is in one of ``allowed`` (an IPv4-mapped IPv6 address as its IPv4)."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in allowed)
