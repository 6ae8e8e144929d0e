"""Retention (SPEC §6, §13): the tables that grow with traffic are purged in batches.

- events older than `EVENTS_RETENTION`, as an id *prefix*: a batch deletes ids up to
  the last one before the first event still young enough to keep, and records that
  id in `retention_marks` in the same transaction. The events feed answers a cursor
  below the mark with `410 /problems/cursor-expired` and never mistakes the purged
  ids for a hole left by an open transaction (`app.events.feed`);
- webhook deliveries and their attempts older than `DELIVERIES_RETENTION`, the same
  way (attempts first, along their delivery index);
- console log-ins past their expiry (they let nobody in any more);
- staged upload data left by an import job that has ended (the job's own close or
  failure deletes it; this catches what a crash between the two left behind).

Every batch is its own short transaction that touches only old rows: no slot lock,
no lock on a row a slot operation writes (new events are appended at the other end
of the primary key, and MySQL runs at READ COMMITTED, so a range delete takes no gap
locks). Sessions, messages and the audit trail are kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, delete, insert, select, union, update
from sqlalchemy.orm import Session as DbSession

from admin.models import ConsoleLogin
from app.db import Database, affected_rows, utcnow
from app.delivery.models import WebhookAttempt, WebhookDelivery
from app.events.feed import purged_through
from app.events.models import EVENTS
from app.imports.lifecycle import TERMINAL, delete_staged
from app.imports.models import (
    ImportChunk,
    ImportChunkPart,
    ImportJob,
    ImportSlotMark,
    ImportSplitPart,
    ImportUploadPart,
)
from app.retention.models import EVENTS_MARK, RetentionMark

log = logging.getLogger(__name__)

PURGE_BATCH = 2000
# After each batch the purge rests this many times as long as the batch took, so that it
# takes at most about 1/(1 + PAUSE_RATIO) of a core and of the database's write time:
# live traffic keeps its latency (tests/benchmarks/bench_retention.py), and the backlog
# of a first run is spread over a few minutes instead of seconds.
PAUSE_RATIO = 1.0


@dataclass
class PurgeReport:
    events: int = 0
    deliveries: int = 0
    attempts: int = 0
    console_logins: int = 0
    import_jobs: int = 0
    complete: bool = True  # False: the time budget ran out; the next run goes on
    seconds: float = 0.0
    batches: list[float] = field(default_factory=list)  # seconds each batch's transaction took

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "deliveries": self.deliveries,
                "attempts": self.attempts, "console_logins": self.console_logins,
                "import_jobs": self.import_jobs, "complete": self.complete,
                "seconds": round(self.seconds, 3),
                "longest_batch": round(max(self.batches, default=0.0), 3)}


# ---- the events mark (read by the feed: app.events.feed.purged_through) -----------------
def _set_mark(db: DbSession, name: str, upto: int, now: datetime) -> None:
    moved = db.execute(
        update(RetentionMark)
        .where(RetentionMark.name == name, RetentionMark.purged_through < upto)
        .values(purged_through=upto, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if affected_rows(moved) == 0 and db.get(RetentionMark, name) is None:
        db.execute(insert(RetentionMark).values(name=name, purged_through=upto,
                                                updated_at=now))


# ---- id-prefix purges ------------------------------------------------------------------
def _prefix_end(db: DbSession, table: Table, time_column: str, *, after: int,
                cutoff: datetime, batch: int) -> tuple[int | None, bool]:
    """The last id of the next batch (ids above `after`, in order) such that it and every
    id before it is older than `cutoff`; and whether the batch ended on a young row or
    the table's end (nothing more to purge now)."""
    rows = db.execute(
        select(table.c.id, table.c[time_column]).where(table.c.id > after)
        .order_by(table.c.id).limit(batch)
    ).all()
    upto = None
    for row_id, at in rows:
        if at >= cutoff:
            return upto, True
        upto = row_id
    return upto, len(rows) < batch


def purge_events(database: Database, *, older_than: timedelta, batch: int = PURGE_BATCH,
                 deadline: float | None = None, report: PurgeReport | None = None,
                 pause_ratio: float = PAUSE_RATIO) -> int:
    """Delete the events older than `older_than` (an id prefix), batch by batch."""
    report = report if report is not None else PurgeReport()
    cutoff = utcnow() - older_than
    purged = 0
    while True:
        started = time.monotonic()
        with database.unit_of_work() as uow:
            db = uow.session
            after = purged_through(db)
            upto, done = _prefix_end(db, EVENTS, "occurred_at", after=after, cutoff=cutoff,
                                     batch=batch)
            if upto is None:
                return purged
            deleted = affected_rows(db.execute(
                delete(EVENTS).where(EVENTS.c.id > after, EVENTS.c.id <= upto)))
            _set_mark(db, EVENTS_MARK, upto, utcnow())
            uow.commit()
        report.batches.append(time.monotonic() - started)
        purged += deleted
        report.events += deleted
        if done:
            return purged
        if deadline is not None and time.monotonic() > deadline:
            report.complete = False
            return purged
        _rest(report, pause_ratio)


def purge_deliveries(database: Database, *, older_than: timedelta, batch: int = PURGE_BATCH,
                     deadline: float | None = None, report: PurgeReport | None = None,
                     pause_ratio: float = PAUSE_RATIO) -> int:
    """Delete webhook deliveries created more than `older_than` ago (an id prefix), with
    their attempts, whatever their status."""
    report = report if report is not None else PurgeReport()
    cutoff = utcnow() - older_than
    table = WebhookDelivery.__table__
    assert isinstance(table, Table)
    after, purged = 0, 0
    while True:
        started = time.monotonic()
        with database.unit_of_work() as uow:
            db = uow.session
            upto, done = _prefix_end(db, table, "created_at", after=after, cutoff=cutoff,
                                     batch=batch)
            if upto is None:
                return purged
            attempts = affected_rows(db.execute(
                delete(WebhookAttempt).where(WebhookAttempt.delivery_pk > after,
                                             WebhookAttempt.delivery_pk <= upto)
                .execution_options(synchronize_session=False)))
            deleted = affected_rows(db.execute(
                delete(WebhookDelivery).where(WebhookDelivery.id > after,
                                              WebhookDelivery.id <= upto)
                .execution_options(synchronize_session=False)))
            uow.commit()
        report.batches.append(time.monotonic() - started)
        after = upto
        purged += deleted
        report.deliveries += deleted
        report.attempts += attempts
        if done:
            return purged
        if deadline is not None and time.monotonic() > deadline:
            report.complete = False
            return purged
        _rest(report, pause_ratio)


def _rest(report: PurgeReport, pause_ratio: float) -> None:
    if pause_ratio > 0 and report.batches:
        time.sleep(report.batches[-1] * pause_ratio)


# ---- other tables ----------------------------------------------------------------------
def purge_console_logins(database: Database, *, now: datetime | None = None,
                         batch: int = PURGE_BATCH) -> int:
    """Delete console log-ins past their expiry (ended or not: they admit nobody)."""
    now = now or utcnow()
    purged = 0
    while True:
        with database.unit_of_work() as uow:
            ids = list(uow.session.execute(
                select(ConsoleLogin.login_id).where(ConsoleLogin.expires_at < now)
                .order_by(ConsoleLogin.expires_at).limit(batch)
            ).scalars())
            if not ids:
                return purged
            purged += affected_rows(uow.session.execute(
                delete(ConsoleLogin).where(ConsoleLogin.login_id.in_(ids))
                .execution_options(synchronize_session=False)))
            uow.commit()
        if len(ids) < batch:
            return purged


def purge_ended_imports(database: Database) -> int:
    """Delete staged data still held by ended jobs (one transaction per job); returns
    how many jobs had some."""
    staged = union(  # UNION removes the duplicates
        select(ImportUploadPart.job_pk.label("job_pk")),
        select(ImportChunkPart.job_pk.label("job_pk")),
        select(ImportSplitPart.job_pk.label("job_pk")),
        select(ImportChunk.job_pk.label("job_pk"))
        .join(ImportSlotMark, ImportSlotMark.chunk_pk == ImportChunk.id),
    ).subquery()
    with database.read() as db:
        ended = list(db.execute(
            select(ImportJob.id).where(ImportJob.id.in_(select(staged.c.job_pk)),
                                       ImportJob.status.in_(TERMINAL))
        ).scalars())
    for job_pk in ended:
        with database.unit_of_work() as uow:
            delete_staged(uow.session, job_pk)
            # A closed job's chunks never run again: their slot marks are done with.
            uow.session.execute(delete(ImportSlotMark).where(ImportSlotMark.chunk_pk.in_(
                select(ImportChunk.id).where(ImportChunk.job_pk == job_pk)))
                .execution_options(synchronize_session=False))
            uow.commit()
    return len(ended)


def purge_expired(
    database: Database, *, events_retention: float, deliveries_retention: float,
    time_budget: float = 300.0, batch: int = PURGE_BATCH, pause_ratio: float = PAUSE_RATIO,
) -> PurgeReport:
    """One retention run over every purged table, within `time_budget` seconds (a
    backlog left over is taken up by the next run)."""
    report = PurgeReport()
    started = time.monotonic()
    deadline = started + time_budget
    purge_events(database, older_than=timedelta(seconds=events_retention), batch=batch,
                 deadline=deadline, report=report, pause_ratio=pause_ratio)
    purge_deliveries(database, older_than=timedelta(seconds=deliveries_retention),
                     batch=batch, deadline=deadline, report=report, pause_ratio=pause_ratio)
    report.console_logins = purge_console_logins(database, batch=batch)
    report.import_jobs = purge_ended_imports(database)
    report.seconds = time.monotonic() - started
    log.info("retention purge: %s", report.as_dict())
    return report
