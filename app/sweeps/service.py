"""The beat sweeps (SPEC §3.7): stale sessions time out, unaccepted transfers escalate.

Due work is found through the indexed deadlines (`ix_sessions_status_deadline`,
`ix_transfers_status_expiry`), one status at a time so each query is a plain
index range read, in batches of SWEEP_BATCH_SIZE. Every change is made under its
slot lock and re-checked there, so a heartbeat that lands while the sweep runs
wins, and two sweeps running at once (several beat or worker processes) cannot
time a session out twice or free a slot that was re-taken. A run lock per sweep
keeps the second one from doing the work twice in the first place.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select

from app.db import utcnow
from app.errors import AutoSessionError
from app.runtime import Runtime
from app.sessions.enums import SessionStatus, TransferStatus
from app.sessions.models import Session
from app.sweeps.bulk import DueSession, expire_batch
from app.sweeps.locks import sweep_run_lock
from app.transfers.expiry import expire_transfer
from app.transfers.models import Transfer

log = logging.getLogger(__name__)
S = SessionStatus

# Occupants first, so the slots they free are promoted before waiters are judged.
SWEPT_STATUSES = (S.ACTIVE, S.TRANSFERRED, S.PAUSED, S.PENDING)
MAX_SKIPPED = 5000


@dataclass
class SweepReport:
    ran: bool = True  # False: another process held the sweep's run lock
    timed_out: list[str] = field(default_factory=list)
    busy: int = 0  # left for the next run: their slot was locked by a live request
    refreshed: int = 0  # no longer due when re-checked under the lock
    expired_transfers: list[str] = field(default_factory=list)
    reoffered: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0


def due_sessions(
    db: object, status: SessionStatus, now: datetime, limit: int, skip: set[str]
) -> list[DueSession]:
    """The next `limit` sessions of `status` past their deadline, oldest deadline first."""
    stmt = (
        select(Session.id, Session.session_id, Session.account_id, Session.shop_id)
        .where(Session.status == status, Session.deadline_at <= now)
        .order_by(Session.deadline_at)
        .limit(limit)
    )
    if skip:
        stmt = stmt.where(Session.session_id.not_in(list(skip)))
    return [DueSession(*row) for row in db.execute(stmt).all()]  # type: ignore[attr-defined]


def sweep_sessions(
    runtime: Runtime, *, now: datetime | None = None, batch_size: int | None = None,
    time_budget: float | None = None,
) -> SweepReport:
    """Time out every session past its deadline (robot idle, PENDING never activated,
    human too long), freeing and promoting their slots."""
    settings = runtime.settings
    batch = batch_size or settings.sweep_batch_size
    budget = time_budget if time_budget is not None else max(60.0, settings.sweep_interval * 10)
    started = time.monotonic()
    report = SweepReport()
    with sweep_run_lock(runtime.redis, f"{settings.redis_key_prefix}:sweep:sessions",
                        ttl=budget + 30) as mine:
        if not mine:
            return SweepReport(ran=False)
        at = now or utcnow()
        service = runtime.sessions
        for status in SWEPT_STATUSES:
            skip: set[str] = set()
            while time.monotonic() - started < budget and len(skip) < MAX_SKIPPED:
                with runtime.database.read() as db:
                    due = due_sessions(db, status, at, batch, skip)
                if not due:
                    break
                ids = [d.session_id for d in due]
                outcome = expire_batch(service, ids, at, found=due)
                report.timed_out += outcome.expired
                report.busy += len(outcome.busy)
                report.refreshed += outcome.not_due
                skip.update(outcome.busy)
                for session_id in outcome.one_by_one:
                    try:
                        view = service.expire(session_id, now=at)
                    except AutoSessionError as exc:
                        log.warning("sweep: %s not expired this run: %s", session_id, exc)
                        report.errors += 1
                        skip.add(session_id)
                        continue
                    if view is None:
                        report.refreshed += 1
                    else:
                        report.timed_out.append(session_id)
                # Rows neither expired nor refreshed (e.g. not found) must not loop forever.
                handled = set(outcome.expired) | set(outcome.one_by_one) | set(outcome.busy)
                skip.update(i for i in ids if i not in handled and _still_due(runtime, i, at))
    report.seconds = time.monotonic() - started
    if report.timed_out:
        log.info("sweep: %d sessions timed out in %.2fs (%d busy, %d refreshed)",
                 len(report.timed_out), report.seconds, report.busy, report.refreshed)
    return report


def _still_due(runtime: Runtime, session_id: str, at: datetime) -> bool:
    with runtime.database.read() as db:
        row = db.execute(
            select(Session.status, Session.deadline_at).where(Session.session_id == session_id)
        ).one_or_none()
    return row is not None and row.deadline_at is not None and row.deadline_at <= at and not (
        S(row.status).is_terminal
    )


def sweep_transfers(
    runtime: Runtime, *, now: datetime | None = None, batch_size: int | None = None
) -> SweepReport:
    """Expire, escalate and re-offer every PENDING transfer past TRANSFER_TIMEOUT."""
    settings = runtime.settings
    batch = batch_size or settings.sweep_batch_size
    started = time.monotonic()
    report = SweepReport()
    with sweep_run_lock(runtime.redis, f"{settings.redis_key_prefix}:sweep:transfers",
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
    return report
