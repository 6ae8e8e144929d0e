"""The dashboard's figures (SPEC §7, §12): sessions, the transfer queue, first-response
times, and what happened hour by hour over the last 24 hours."""

from __future__ import annotations

import math
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session as DbSession

from app.audit.models import Operation
from app.audit.operations import AuditOperation
from app.db import utcnow
from app.events.models import Event
from app.events.types import EventType
from app.imports.models import ImportJob
from app.sessions.enums import SessionStatus, SessionType
from app.sessions.models import Session
from app.transfers.enums import TransferStatus, TransferTrigger
from app.transfers.models import Transfer

HOURS = 24
# A conflict is a request that met an occupied slot (SPEC §3.5): it preempted or
# interrupted the occupant (these audit operations), or it had to wait in line (the
# `session.queued` event of a create or a resume). Rejected requests create nothing
# and so are not counted.
CONFLICT_OPERATIONS = (AuditOperation.PREEMPT, AuditOperation.INTERRUPT)
QUEUED_EVENT = EventType.SESSION_QUEUED


def _percentile(ordered: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def first_response_figures(db: DbSession, now: datetime) -> dict[str, Any]:
    """First-response time over the last 24 hours (SPEC §12): from the accept to the first
    human message, for transfers answered in that window; the median and p90 are the
    nearest-rank values. `overdue_24h`: transfers flagged in the window; `waiting`:
    accepted transfers still unanswered now. Hand-offs found in imported history (trigger
    `history`) were answered outside the system and are not counted."""
    since = now - timedelta(hours=24)
    live = Transfer.trigger != TransferTrigger.HISTORY
    answered = db.execute(
        select(Transfer.accepted_at, Transfer.first_response_at)
        .where(Transfer.first_response_at >= since, Transfer.accepted_at.is_not(None), live)
    ).all()
    seconds = sorted(max((f - a).total_seconds(), 0.0) for a, f in answered
                     if a is not None and f is not None)
    overdue = db.execute(
        select(func.count()).select_from(Transfer)
        .where(Transfer.first_response_overdue_at >= since)
    ).scalar_one()
    waiting = db.execute(
        select(func.count()).select_from(Transfer)
        .where(Transfer.status == TransferStatus.ACCEPTED, Transfer.first_response_at.is_(None),
               live)
    ).scalar_one()
    return {"answered_24h": len(seconds), "median_s": _percentile(seconds, 0.5),
            "p90_s": _percentile(seconds, 0.9), "overdue_24h": int(overdue),
            "waiting": int(waiting)}


# ---- statistics -------------------------------------------------------------------------------
def _hour_bucket(db: DbSession, column: Any) -> Any:
    """`YYYY-MM-DD HH` of a UTC datetime column, in the backend's own SQL."""
    if db.get_bind().dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H", column)
    return func.date_format(column, "%Y-%m-%d %H")


def _hourly(db: DbSession, column: Any, since: datetime, *conditions: Any) -> Counter[str]:
    bucket = _hour_bucket(db, column)
    rows = db.execute(
        select(bucket, func.count()).where(column >= since, *conditions).group_by(bucket)
    ).all()
    return Counter({str(key): int(count) for key, count in rows})


def statistics(db: DbSession, *, now: datetime | None = None) -> dict[str, Any]:
    """The dashboard's figures: sessions by status and type, the transfer queue and its age,
    time to accept, and timeouts, conflicts, sessions and transfers per hour over 24 hours."""
    now = (now or utcnow()).astimezone(UTC)
    end_hour = now.replace(minute=0, second=0, microsecond=0)
    since = end_hour - timedelta(hours=HOURS - 1)
    hours = [since + timedelta(hours=i) for i in range(HOURS)]
    keys = [h.strftime("%Y-%m-%d %H") for h in hours]

    by_pair = db.execute(
        select(Session.status, Session.session_type, func.count())
        .group_by(Session.status, Session.session_type)
    ).all()
    by_status: Counter[str] = Counter()
    by_type: Counter[str] = Counter()
    for status, stype, count in by_pair:
        by_status[str(status)] += count
        by_type[str(stype)] += count

    waiting = db.execute(
        select(func.count(), func.min(Transfer.created_at))
        .where(Transfer.status == TransferStatus.PENDING)
    ).one()
    waiting_times = db.execute(
        select(Transfer.created_at).where(Transfer.status == TransferStatus.PENDING)
        .order_by(Transfer.created_at).limit(10_000)
    ).scalars().all()
    ages = [(now - t).total_seconds() for t in waiting_times]
    accepted = db.execute(
        select(Transfer.created_at, Transfer.accepted_at)
        .where(Transfer.accepted_at.is_not(None), Transfer.accepted_at >= now - timedelta(hours=24))
    ).all()
    accept_seconds = [(a - c).total_seconds() for c, a in accepted if a is not None]

    started = _hourly(db, Session.created_at, since)
    transfers = _hourly(db, Transfer.created_at, since)
    timeouts = _hourly(db, Operation.created_at, since,
    Operation.operation == AuditOperation.TIMEOUT)
    conflicts = _hourly(db, Operation.created_at, since,
                        Operation.operation.in_(CONFLICT_OPERATIONS))
    conflicts.update(_hourly(db, Event.occurred_at, since, Event.type == QUEUED_EVENT))

    finished_jobs = db.execute(
        select(ImportJob.processed, ImportJob.started_at, ImportJob.finished_at, ImportJob.status)
        .where(ImportJob.finished_at.is_not(None),
               ImportJob.finished_at >= now - timedelta(hours=24))
    ).all()
    rows_24h = sum(p or 0 for p, *_ in finished_jobs)
    busy_seconds = sum(  # each job's wall time, from its start to its end
        max((end - (begin or end)).total_seconds(), 0.0)
        for _, begin, end, _ in finished_jobs if end is not None
    )
    running_jobs = db.execute(
        select(func.count()).select_from(ImportJob)
        .where(ImportJob.status.in_(["queued", "running"]))
    ).scalar_one()

    def series(counter: Counter[str]) -> list[int]:
        return [counter.get(k, 0) for k in keys]

    return {
        "generated_at": now.isoformat(),
        "sessions": {
            "total": sum(by_status.values()),
            "by_status": {str(s): by_status.get(str(s), 0) for s in SessionStatus},
            "by_type": {str(t): by_type.get(str(t), 0) for t in SessionType},
            "by_status_and_type": [
                {"status": str(s), "session_type": str(t), "count": c} for s, t, c in by_pair
            ],
        },
        "transfers": {
            "waiting": int(waiting[0]),
            "oldest_waiting_seconds": (now - waiting[1]).total_seconds() if waiting[1] else None,
            "average_waiting_seconds": sum(ages) / len(ages) if ages else None,
            "accepted_24h": len(accept_seconds),
            "average_accept_seconds": (sum(accept_seconds) / len(accept_seconds)
                                       if accept_seconds else None),
        },
        "first_response": first_response_figures(db, now),
        "last_24h": {
            "sessions_started": sum(series(started)),
            "transfers": sum(series(transfers)),
            "timeouts": sum(series(timeouts)),
            "conflicts": sum(series(conflicts)),
        },
        "hourly": {
            "hours": [h.isoformat() for h in hours],
            "sessions_started": series(started),
            "transfers": series(transfers),
            "timeouts": series(timeouts),
            "conflicts": series(conflicts),
        },
        "imports": {
            "jobs_finished_24h": len(finished_jobs),
            "failed_24h": sum(1 for *_, status in finished_jobs if status == "failed"),
            "rows_24h": rows_24h,
            "rows_per_second": rows_24h / busy_seconds if busy_seconds else None,
            "running": int(running_jobs),
        },
    }
