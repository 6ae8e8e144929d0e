"""The beat sweeps (SPEC §3.7): stale sessions time out, unaccepted transfers escalate.

Due work is found through the indexed deadlines (`ix_sessions_status_deadline`,
`ix_transfers_status_expiry`), one status at a time so each query is a plain
index range read, in batches of SWEEP_BATCH_SIZE (sessions: two batches in flight
on MySQL/MariaDB, see `BATCHES_IN_FLIGHT`). Every change is made under its
slot lock and re-checked there, so a heartbeat that lands while the sweep runs
wins, and two sweeps running at once (several beat or worker processes) cannot
time a session out twice or free a slot that was re-taken. A run lock per sweep
keeps the second one from doing the work twice in the first place.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, and_, or_, select

from app.coordination.run_locks import run_lock
from app.db import utcnow
from app.errors import AutoSessionError
from app.observability.metrics import record_sweep
from app.runtime import Runtime
from app.sessions.enums import SessionStatus
from app.sessions.models import SESSIONS
from app.sweeps.bulk import DueSession, expire_batch
from app.transfers.enums import TransferStatus
from app.transfers.expiry import expire_transfer
from app.transfers.first_response import flag_overdue_first_responses
from app.transfers.models import Transfer

log = logging.getLogger(__name__)
S = SessionStatus

# Occupants first, so the slots they free are promoted before waiters are judged.
SWEPT_STATUSES = (S.ACTIVE, S.TRANSFERRED, S.PAUSED, S.PENDING)
# Batches being expired at once. A batch's time is split between Python (reading,
# hashing, rendering) and the database (writing): with two in flight, one is being
# prepared while the other's statements run, and each gets a core. SQLite has one
# writer at a time: one batch there.
BATCHES_IN_FLIGHT = 2
MAX_SKIPPED = 5000  # transfers left behind by one run (errors) before it gives up


@dataclass
class SweepReport:
    ran: bool = True  # False: another process held the sweep's run lock
    timed_out: list[str] = field(default_factory=list)
    busy: int = 0  # left for the next run: their slot was locked by a live request
    refreshed: int = 0  # no longer due when re-checked under the lock
    expired_transfers: list[str] = field(default_factory=list)
    reoffered: list[str] = field(default_factory=list)
    first_response_overdue: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def add(self, other: SweepReport) -> None:
        self.timed_out += other.timed_out
        self.busy += other.busy
        self.refreshed += other.refreshed
        self.errors += other.errors


def due_sessions(
    conn: Connection, status: SessionStatus, now: datetime, limit: int,
    after: tuple[datetime, int] | None = None,
) -> list[DueSession]:
    """The next `limit` sessions of `status` past their deadline, oldest deadline first,
    from after `after` (the deadline and primary key of the last one handed out)."""
    s = SESSIONS.c
    stmt = (
        select(s.id, s.session_id, s.account_id, s.shop_id, s.deadline_at)
        .where(s.status == status, s.deadline_at <= now)
        .order_by(s.deadline_at, s.id)
        .limit(limit)
    )
    if after is not None:
        deadline, pk = after
        # Spelled so that MariaDB reads it as a range of the index (its PK suffix too).
        stmt = stmt.where(or_(and_(s.deadline_at == deadline, s.id > pk),
                              s.deadline_at > deadline))
    return [DueSession(*row) for row in conn.execute(stmt).all()]


def sweep_sessions(
    runtime: Runtime, *, now: datetime | None = None, batch_size: int | None = None,
    time_budget: float | None = None, in_flight: int | None = None,
) -> SweepReport:
    """Time out every session past its deadline (robot idle, PENDING never activated,
    human too long), freeing and promoting their slots.

    Each status is walked once along its deadline index. A session whose slot lock
    was busy gets one more try when its status is done; one still left behind (or
    hit by an error) waits for the next run, like one that fell due meanwhile."""
    settings = runtime.settings
    batch = batch_size or settings.sweep_batch_size
    budget = time_budget if time_budget is not None else max(60.0, settings.sweep_interval * 10)
    workers = in_flight or (1 if runtime.database.dialect == "sqlite" else BATCHES_IN_FLIGHT)
    started = time.monotonic()
    report = SweepReport()
    with run_lock(runtime.redis, f"{settings.redis_key_prefix}:sweep:sessions",
                  ttl=budget + 30) as mine:
        if not mine:
            return SweepReport(ran=False)
        at = now or utcnow()
        until = started + budget
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sweep") as pool:
            for status in SWEPT_STATUSES:
                busy = _walk(runtime, pool, workers, status, at, batch, until, report)
                # A slot can be locked by the other batch in flight (waiters of one slot
                # in two batches) as well as by a live request: one more try, then the
                # next run.
                for i in range(0, len(busy), batch):
                    if time.monotonic() >= until:
                        report.busy += len(busy) - i
                        break
                    part, left = _sweep_batch(runtime, busy[i:i + batch], at)
                    report.add(part)
                    report.busy += len(left)
    report.seconds = time.monotonic() - started
    record_sweep("sessions", report)
    if report.timed_out:
        log.info("sweep: %d sessions timed out in %.2fs (%d busy, %d refreshed)",
                 len(report.timed_out), report.seconds, report.busy, report.refreshed)
    return report


def _walk(
    runtime: Runtime, pool: ThreadPoolExecutor, workers: int, status: SessionStatus,
    at: datetime, batch: int, until: float, report: SweepReport,
) -> list[DueSession]:
    """Expire the sessions of `status` due at `at`, `workers` batches at a time, along
    the deadline index; answers those whose slot lock was busy."""
    running: deque[Future[tuple[SweepReport, list[DueSession]]]] = deque()
    busy: list[DueSession] = []
    after: tuple[datetime, int] | None = None
    reading = True
    while reading or running:
        if reading and time.monotonic() < until:
            with runtime.database.engine.connect() as conn:
                due = due_sessions(conn, status, at, batch, after)
            if due:
                last = due[-1]
                assert last.deadline_at is not None  # it was due
                after = (last.deadline_at, last.pk)
                running.append(pool.submit(_sweep_batch, runtime, due, at))
            else:
                reading = False
        else:
            reading = False
        if running and (len(running) >= workers or not reading):
            part, left = running.popleft().result()
            report.add(part)
            busy.extend(left)
    return busy


def _sweep_batch(
    runtime: Runtime, due: list[DueSession], at: datetime
) -> tuple[SweepReport, list[DueSession]]:
    """Expire one batch: in bulk where safe, the rest one by one. Answers what was done
    and the sessions whose slot lock was busy."""
    service = runtime.sessions
    outcome = expire_batch(service, [d.session_id for d in due], at, found=due)
    part = SweepReport(timed_out=outcome.expired, refreshed=outcome.not_due)
    for session_id in outcome.one_by_one:
        try:
            view = service.expire(session_id, now=at)
        except AutoSessionError as exc:
            log.warning("sweep: %s not expired this run: %s", session_id, exc)
            part.errors += 1
            continue
        if view is None:
            part.refreshed += 1
        else:
            part.timed_out.append(session_id)
    busy = set(outcome.busy)
    return part, [d for d in due if d.session_id in busy]


def sweep_transfers(
    runtime: Runtime, *, now: datetime | None = None, batch_size: int | None = None
) -> SweepReport:
    """Expire, escalate and re-offer every PENDING transfer past TRANSFER_TIMEOUT."""
    settings = runtime.settings
    batch = batch_size or settings.sweep_batch_size
    started = time.monotonic()
    report = SweepReport()
    with run_lock(runtime.redis, f"{settings.redis_key_prefix}:sweep:transfers",
                  ttl=max(60.0, settings.transfer_sweep_interval * 10)) as mine:
        if not mine:
            return SweepReport(ran=False)
        at = now or utcnow()
        skip: set[str] = set()
        while len(skip) < MAX_SKIPPED:
            with runtime.database.read() as db:
                stmt = (
                    select(Transfer.transfer_id)
                    .where(Transfer.status == TransferStatus.PENDING, Transfer.expires_at <= at)
                    .order_by(Transfer.expires_at)
                    .limit(batch)
                )
                if skip:
                    stmt = stmt.where(Transfer.transfer_id.not_in(list(skip)))
                ids = list(db.execute(stmt).scalars())
            if not ids:
                break
            for transfer_id in ids:
                try:
                    offer = expire_transfer(runtime.sessions, transfer_id, now=at)
                except AutoSessionError as exc:
                    log.warning("sweep: transfer %s not expired this run: %s", transfer_id, exc)
                    report.errors += 1
                    skip.add(transfer_id)
                    continue
                report.expired_transfers.append(transfer_id)
                if offer is not None:
                    report.reoffered.append(offer.transfer_id)
                    skip.add(offer.transfer_id)  # a short TRANSFER_TIMEOUT must not loop
    report.seconds = time.monotonic() - started
    record_sweep("transfers", report)
    return report


def sweep_first_responses(
    runtime: Runtime, *, now: datetime | None = None, batch_size: int | None = None
) -> SweepReport:
    """Flag every accepted transfer still without a human message FIRST_RESPONSE_TIMEOUT
    after its accept (`transfer.first_response_overdue`, once each), SPEC §12."""
    settings = runtime.settings
    batch = batch_size or settings.sweep_batch_size
    started = time.monotonic()
    report = SweepReport()
    with run_lock(runtime.redis, f"{settings.redis_key_prefix}:sweep:first-response",
                  ttl=max(60.0, settings.transfer_sweep_interval * 10)) as mine:
        if not mine:
            return SweepReport(ran=False)
        at = now or utcnow()
        while True:
            flagged = flag_overdue_first_responses(
                runtime.database, now=at, timeout=settings.first_response_timeout,
                limit=batch, events_written=runtime.hooks.events_written)
            report.first_response_overdue += flagged
            if not flagged and not _first_responses_due(runtime, at):
                break
    report.seconds = time.monotonic() - started
    record_sweep("first_response", report)
    return report


def _first_responses_due(runtime: Runtime, at: datetime) -> bool:
    with runtime.database.read() as db:
        return db.execute(
            select(Transfer.id).where(Transfer.first_response_due_at <= at).limit(1)
        ).first() is not None
