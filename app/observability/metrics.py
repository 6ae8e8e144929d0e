"""The Prometheus metrics of SPEC §13, recorded where the work happens and merged over
every web and worker process at scrape time.

Counters and histograms are written by the process that does the work: one sample is
a few microseconds (a dict lookup and, in multiprocess mode, a write into a memory-
mapped file; `app.observability.processes`), never a database or Redis round trip.
The gauges of the database's state — open sessions by status, the transfer queue, the
webhook backlog — are computed when Prometheus scrapes, by `StateCollector`, with one
indexed query, not per request.

Label values are bounded: `route` is the URL rule (`/api/v1/sessions/<session_id>`),
never the raw path; `outcome`, `sweep`, `limit` and `status` come from short fixed sets.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, literal, null, select, union_all

from app.db import utcnow
from app.observability.processes import multiprocess_folders

if TYPE_CHECKING:
    from app.db import Database

log = logging.getLogger(__name__)

HTTP_BUCKETS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
LOCK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
WORK_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LAG_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)

HTTP_REQUESTS = Counter(
    "autosession_http_requests", "HTTP requests answered, by method, URL rule and status",
    ["method", "route", "status"])
HTTP_DURATION = Histogram(
    "autosession_http_request_duration_seconds",
    "Time from the request reaching the app to its answer, by method and URL rule",
    ["method", "route"], buckets=HTTP_BUCKETS)
SLOT_LOCK_WAIT = Histogram(
    "autosession_slot_lock_wait_seconds",
    "Time a slot operation waited for its slot lock (0 when it was free)",
    buckets=LOCK_BUCKETS)
SLOT_LOCK_BUSY = Counter(
    "autosession_slot_lock_busy",
    "Slot operations refused because the lock stayed taken for SLOT_LOCK_WAIT (503)")
FENCE_REJECTIONS = Counter(
    "autosession_fence_rejections",
    "Slot commits refused because another holder changed the slot (fencing token)")
IMPORT_ROWS = Counter(
    "autosession_import_rows",
    "History import rows by outcome (invalid: refused as the upload was split or by a chunk)",
    ["outcome"])
IMPORT_CHUNKS = Counter(
    "autosession_import_chunks", "History import chunk runs, by outcome", ["outcome"])
IMPORT_CHUNK_DURATION = Histogram(
    "autosession_import_chunk_duration_seconds", "Time one import chunk task took",
    buckets=WORK_BUCKETS)
WEBHOOK_DELIVERIES = Counter(
    "autosession_webhook_deliveries",
    "Webhook delivery attempts, by outcome (delivered, retry, given_up)", ["outcome"])
WEBHOOK_LAG = Histogram(
    "autosession_webhook_delivery_lag_seconds",
    "Time from an event's commit to its webhook's successful delivery", buckets=LAG_BUCKETS)
SWEEP_DURATION = Histogram(
    "autosession_sweep_duration_seconds", "Time one beat sweep run took, by sweep",
    ["sweep"], buckets=WORK_BUCKETS)
SWEEP_ROWS = Counter(
    "autosession_sweep_rows", "What beat sweeps did, by sweep and outcome",
    ["sweep", "outcome"])
RATE_LIMITED = Counter(
    "autosession_rate_limited",
    "Requests refused with 429, by the limit's setting (RATE_LIMIT_BOT, …)", ["limit"])
PROCESSES = Gauge(
    "autosession_processes", "Processes alive, by Procfile role", ["role"],
    multiprocess_mode="livesum")

SESSION_STATUSES_OPEN = ("PENDING", "ACTIVE", "PAUSED", "TRANSFERRED")
ALL_METRICS: tuple[Any, ...] = (
    HTTP_REQUESTS, HTTP_DURATION, SLOT_LOCK_WAIT, SLOT_LOCK_BUSY, FENCE_REJECTIONS,
    IMPORT_ROWS, IMPORT_CHUNKS, IMPORT_CHUNK_DURATION, WEBHOOK_DELIVERIES, WEBHOOK_LAG,
    SWEEP_DURATION, SWEEP_ROWS, RATE_LIMITED, PROCESSES)


def start_over() -> None:
    """Recreate every metric's values with prometheus_client's current value class (the
    process switched to shared files after this module was imported; nothing was
    recorded yet). Uses the metrics' own initialisers (`_metric_init`, the children)."""
    for metric in ALL_METRICS:
        if metric._is_parent():
            with metric._lock:
                metric._metrics.clear()
        else:
            metric._metric_init()


class RequestTally:
    """The HTTP counts and durations of this process, kept in plain lists and written to
    the metrics every `FLUSH_SECONDS` by a thread of its own (and before this process
    answers a scrape): a request costs a list update, not three samples in shared
    files. A scrape may be up to a second behind the other web processes."""

    FLUSH_SECONDS = 1.0
    BOUNDS = (*HTTP_BUCKETS, float("inf"))

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # (method, route, status) -> [count, one count per bucket…, sum of seconds]
        self._rows: dict[tuple[str, str, int], list[float]] = {}
        self._flushing = False
        os.register_at_fork(after_in_child=self._forked)

    def add(self, method: str, route: str, status: int, seconds: float) -> None:
        bucket = bisect_left(self.BOUNDS, seconds) + 1
        key = (method, route, status)
        with self._lock:
            row = self._rows.get(key)
            if row is None:
                row = self._rows[key] = [0.0] * (len(self.BOUNDS) + 2)
            row[0] += 1
            row[bucket] += 1
            row[-1] += seconds
        if not self._flushing:  # the first request of this process
            self._start_flushing()

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, {}
        for (method, route, status), row in rows.items():
            HTTP_REQUESTS.labels(method, route, str(status)).inc(row[0])
            child = HTTP_DURATION.labels(method, route)
            # Histogram.observe of row[0] samples at once: its bucket values and its sum
            for index, number in enumerate(row[1:-1]):
                if number:
                    child._buckets[index].inc(number)
            child._sum.inc(row[-1])

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._rows = {}
        self._flushing = False

    def _start_flushing(self) -> None:
        with self._lock:
            if self._flushing:
                return
            self._flushing = True
        threading.Thread(target=self._flush_forever, name="metrics-flush", daemon=True).start()
        atexit.register(self.flush)

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            try:
                self.flush()
            except Exception:  # a full disk must not end the flushing for good
                log.exception("metrics: could not write the request counts")


REQUEST_TALLY = RequestTally()


def process_started(role: str) -> None:
    """Count this process among the live ones of `role` (web or worker)."""
    PROCESSES.labels(role).set(1)


def record_import_chunk(counts: Any, seconds: float) -> None:
    """One chunk task's work: its rows by outcome (None: done elsewhere or failed)."""
    IMPORT_CHUNK_DURATION.observe(seconds)
    if counts is None:
        IMPORT_CHUNKS.labels("skipped_or_failed").inc()
        return
    IMPORT_CHUNKS.labels("done").inc()
    for outcome, value in (("inserted", counts.inserted), ("duplicate", counts.duplicates),
                           ("invalid", counts.invalid)):
        if value:
            IMPORT_ROWS.labels(outcome).inc(value)


def record_split_refused(rows: int) -> None:
    """Rows an upload's split refused (not a record, no slot): counted once, when the
    split that found them commits; the chunks count the rest (`record_import_chunk`)."""
    if rows:
        IMPORT_ROWS.labels("invalid").inc(rows)


def record_delivery(outcome: str, event_created_at: datetime | None) -> None:
    """One webhook attempt's outcome; a delivered one also its lag behind the event."""
    WEBHOOK_DELIVERIES.labels(outcome).inc()
    if outcome == "delivered" and event_created_at is not None:
        WEBHOOK_LAG.observe(max(0.0, (utcnow() - event_created_at).total_seconds()))


def record_sweep(sweep: str, report: Any) -> None:
    """One sweep run (an `app.sweeps.service.SweepReport`): its time and what it did."""
    SWEEP_DURATION.labels(sweep).observe(report.seconds)
    for outcome, number in (("timed_out", len(report.timed_out)), ("busy", report.busy),
                            ("refreshed", report.refreshed),
                            ("expired", len(report.expired_transfers)),
                            ("reoffered", len(report.reoffered)), ("errors", report.errors),
                            ("first_response_overdue", len(report.first_response_overdue))):
        if number:
            SWEEP_ROWS.labels(sweep, outcome).inc(number)


class StateCollector(Collector):
    """Gauges read from the database at scrape time, in one query over indexed columns:
    open sessions by status (`ix_sessions_status_deadline`), transfers waiting for an
    agent and the oldest wait (`ix_transfers_queue`), and webhook deliveries pending
    (`ix_webhook_deliveries_status`). Ended sessions are not counted: they grow forever
    and a count would scan them on every scrape (their rates are in the HTTP and sweep
    counters)."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def query(self) -> Any:
        from app.delivery.models import DeliveryStatus, WebhookDelivery
        from app.sessions.models import Session
        from app.transfers.models import Transfer

        return union_all(
            select(literal("transfers"), func.count(), func.min(Transfer.created_at))
            .where(Transfer.status == "PENDING"),
            select(literal("deliveries"), func.count(), func.min(WebhookDelivery.created_at))
            .where(WebhookDelivery.status == DeliveryStatus.PENDING),
            select(Session.status, func.count(), null())
            .where(Session.status.in_(SESSION_STATUSES_OPEN)).group_by(Session.status),
        )

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("autosession_metrics_database_up",
                               "1 when the scrape could read the database's state gauges")
        try:
            with self.database.engine.connect() as conn:
                rows = conn.execute(self.query()).all()
        except Exception as exc:  # the other metrics are still worth answering
            log.warning("metrics: state query failed: %s", exc.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        now = utcnow()
        by_name = {str(r[0]): (int(r[1]), _as_datetime(r[2])) for r in rows}
        sessions = GaugeMetricFamily("autosession_sessions", "Open sessions by status",
                                     labels=["status"])
        for status in SESSION_STATUSES_OPEN:
            sessions.add_metric([status], by_name.get(status, (0, None))[0])
        yield sessions
        for name, what in (("transfers", "transfers waiting for an agent"),
                           ("deliveries", "webhook deliveries pending")):
            count, oldest = by_name.get(name, (0, None))
            wait = (now - oldest).total_seconds() if oldest is not None else 0.0
            if name == "transfers":
                yield GaugeMetricFamily("autosession_transfers_waiting",
                                        f"Number of {what}", value=count)
                yield GaugeMetricFamily("autosession_transfer_oldest_wait_seconds",
                                        "Age of the oldest transfer waiting (0: none)",
                                        value=max(0.0, wait))
            else:
                yield GaugeMetricFamily("autosession_webhook_deliveries_pending",
                                        f"Number of {what}", value=count)
                yield GaugeMetricFamily("autosession_webhook_oldest_pending_seconds",
                                        "Age of the oldest pending webhook delivery (0: none)",
                                        value=max(0.0, wait))


def _as_datetime(value: Any) -> datetime | None:
    """A MIN() over a UTC column as aware UTC (a datetime, or its text on SQLite)."""
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromisoformat(str(value))
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class _MergedFolders(Collector):
    """Every process's files of every role folder, merged (counters and histograms
    summed; live gauges summed over the processes alive)."""

    def __init__(self, folders: list[Any]) -> None:
        self.folders = folders

    def collect(self) -> Iterator[Metric]:
        files = [str(p) for folder in self.folders for p in folder.glob("*.db")]
        return iter(MultiProcessCollector.merge(files, accumulate=True))


def exposition(database: Database | None) -> bytes:
    """The text format of every metric: merged over the Procfile's processes when they
    share a metrics folder, else this process's own registry (the embedded default)."""
    REQUEST_TALLY.flush()
    registry = CollectorRegistry(auto_describe=False)
    folders = multiprocess_folders()
    if folders:
        registry.register(_MergedFolders(folders))
    else:
        registry.register(REGISTRY)  # type: ignore[arg-type]
    if database is not None:
        registry.register(StateCollector(database))
    return generate_latest(registry)

