"""An import job's life (SPEC §4): queued → running (split, then its chunks) → closed
once as succeeded, partially_succeeded or failed, with its counts, its first row errors
and an `import.finished` event; and the job as clients read it (`ImportJobView`).

A job always ends: the close is claimed by one conditional UPDATE (`JobLifecycle.close`),
a step that cannot go on fails the job (`JobLifecycle.fail`), and either way the staged
upload is deleted (`delete_staged`).
"""

from __future__ import annotations

import builtins
import heapq
import logging
import threading
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import and_, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session as DbSession

from app.db import Database, affected_rows, utcnow
from app.errors import NotFound
from app.events.outbox import Audience, record_event
from app.events.types import EventType
from app.imports.counts import ImportCounts
from app.imports.models import (
    ImportChunk,
    ImportChunkPart,
    ImportJob,
    ImportSplitPart,
    ImportUploadPart,
)
from app.imports.segmenting import Grouping

log = logging.getLogger(__name__)

MAX_ERRORS = 100
# A chunk attempted this often without finishing (its worker killed, timed out) fails:
# a job always ends, however its chunks die.
MAX_CHUNK_ATTEMPTS = 10
TERMINAL = ("succeeded", "partially_succeeded", "failed")


class JobStatus:
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIALLY_SUCCEEDED = "partially_succeeded"
    FAILED = "failed"


class RowError(BaseModel):
    line: int
    error: str


class ImportJobView(BaseModel):
    """An import job as clients see it (SPEC §8 field names)."""

    job_id: str
    status: str
    phase: str
    filename: str | None
    format: str | None
    encoding: str | None
    size_bytes: int
    total_rows: int | None
    processed: int
    inserted: int
    duplicates: int
    invalid: int
    sessions_created: int
    sessions_updated: int
    conflicts: int
    # Grouping options (SPEC §4) and what the LLM review did
    session_gap: int
    grouping: str
    review: bool
    boundaries_reviewed: int = 0
    boundaries_merged: int = 0
    review_calls: int = 0  # calls spent of GROUPING_REVIEW_MAX_CALLS
    errors: list[RowError]
    chunks: int
    chunks_done: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    detail: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


class JobLifecycle:
    """A job's close, its failure and its reads."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.database: Database = runtime.database
        self.settings = runtime.settings

    def finish(self, job_id: str) -> ImportJobView:
        """Close the job once every chunk is done (safe to call early or twice): the job
        as it is now, closed by this call or not."""
        return self.close(job_id) or self.get(job_id)

    def close(self, job_id: str) -> ImportJobView | None:
        """Close the job if every chunk is done and nobody closed it: the closed job, or
        None when this call did not close it (a chunk still pending, the job closed or
        failed already, or closed by a caller that raced this one).

        The claim is one conditional UPDATE — the job running in its chunks phase, not
        finished, no chunk pending — in the same transaction as the close: of callers
        racing for it, the first takes the job row's lock and the others wait for its
        commit, then match nothing (a close that rolls back leaves the claim to the
        next). So the close, its counts and its `import.finished` event happen once."""
        with self.database.unit_of_work() as uow:
            db = uow.session
            job_pk = db.execute(select(ImportJob.id).where(ImportJob.job_id == job_id)
                                ).scalar_one_or_none()
            if job_pk is None:
                raise NotFound(f"import job {job_id} not found")
            pending = exists().where(ImportChunk.job_pk == job_pk,
                                     ImportChunk.status == "pending")
            claimed = db.execute(
                update(ImportJob)
                .where(ImportJob.id == job_pk, ImportJob.status == JobStatus.RUNNING,
                       ImportJob.phase == "chunks", ImportJob.finished_at.is_(None), ~pending)
                .values(phase="finishing")
                .execution_options(synchronize_session=False)
            )
            if affected_rows(claimed) != 1:
                return None
            job = find_job(db, job_id)
            totals = ImportCounts(invalid=job.prepare_invalid)
            failed = 0
            for chunk in db.execute(select(ImportChunk).where(ImportChunk.job_pk == job.id)
                                    ).scalars():
                totals.add(ImportCounts(
                    inserted=chunk.inserted, duplicates=chunk.duplicates, invalid=chunk.invalid,
                    sessions_created=chunk.sessions_created,
                    sessions_updated=chunk.sessions_updated, conflicts=chunk.conflicts,
                    boundaries_reviewed=chunk.boundaries_reviewed,
                    boundaries_merged=chunk.boundaries_merged,
                ))
                failed += chunk.status == "failed"
            job.inserted, job.duplicates, job.invalid = (
                totals.inserted, totals.duplicates, totals.invalid)
            job.sessions_created, job.sessions_updated, job.conflicts = (
                totals.sessions_created, totals.sessions_updated, totals.conflicts)
            job.boundaries_reviewed, job.boundaries_merged = (
                totals.boundaries_reviewed, totals.boundaries_merged)
            job.processed = totals.inserted + totals.duplicates + totals.invalid
            job.errors = self._first_errors(db, job)
            stored = totals.inserted + totals.duplicates
            if not job.total_rows:
                job.status, job.detail = JobStatus.FAILED, "the upload holds no rows"
            elif stored == 0:
                job.status = JobStatus.FAILED
                first = job.errors[0] if job.errors else None
                job.detail = job.detail or "no row could be imported" + (
                    f" (line {first['line']}: {first['error']})"[:500] if first else "")
            elif totals.invalid or failed:
                job.status = JobStatus.PARTIALLY_SUCCEEDED
                if failed:
                    job.detail = f"{failed} chunk(s) failed; their rows are counted as invalid"
            else:
                job.status = JobStatus.SUCCEEDED
            job.phase = "finished"
            job.finished_at = utcnow()
            self._announce(db, job)
            # The staged upload has served its purpose; counts and errors stay on the job.
            delete_staged(db, job.id)
            uow.after_commit(self.runtime.hooks.events_written)
            uow.commit()
            view = self.view(db, job)
        return view

    def _first_errors(self, db: DbSession, job: ImportJob) -> list[dict[str, Any]]:
        sources: list[list[dict[str, Any]]] = [job.prepare_errors or []]
        with_errors = (ImportChunk.job_pk == job.id, ImportChunk.invalid > 0)
        # The first MAX_ERRORS errors lie in the MAX_ERRORS chunks whose first errors come
        # first (chunks done before this column existed have none: they are read too).
        for query in (
            select(ImportChunk.errors).where(*with_errors, ImportChunk.first_error_line
                                             .is_not(None))
            .order_by(ImportChunk.first_error_line).limit(MAX_ERRORS),
            select(ImportChunk.errors).where(*with_errors,
                                             ImportChunk.first_error_line.is_(None)),
        ):
            sources.extend(errors or [] for errors in db.execute(query).scalars())
        merged = heapq.nsmallest(MAX_ERRORS, (e for source in sources for e in source),
                                 key=lambda e: (e.get("line", 0), e.get("error", "")))
        return [{"line": int(e["line"]), "error": str(e["error"])} for e in merged]

    def _announce(self, db: DbSession, job: ImportJob) -> None:
        record_event(db, type=EventType.IMPORT_FINISHED, at=job.finished_at or utcnow(),
                     audience=Audience.ADMIN, data={
                         "job_id": job.job_id, "status": job.status,
                         "total_rows": job.total_rows, "inserted": job.inserted,
                         "duplicates": job.duplicates, "invalid": job.invalid,
                         "sessions_created": job.sessions_created,
                         "sessions_updated": job.sessions_updated, "conflicts": job.conflicts,
                     })

    def fail(self, job_id: str, detail: str, *, encoding: str | None = None,
              split_token: str | None = None,
              part_token: tuple[int, str] | None = None) -> None:
        """Close the job as failed (unless it is closed, or, for a split that failed,
        someone else's split by now). Its staged data is deleted (the upload and the
        staged rows: README, "the upload is deleted when the job ends"); chunks still
        pending are failed too, and a split still running is fenced off."""
        with self.database.unit_of_work() as uow:
            job = find_job(uow.session, job_id, lock=True)
            if job.status in TERMINAL:
                return
            if split_token is not None and job.split_token != split_token:
                return
            if part_token is not None and uow.session.execute(
                    select(ImportSplitPart.token).where(ImportSplitPart.id == part_token[0])
            ).scalar_one_or_none() != part_token[1]:
                return  # that part's run was taken over: the failure is not its to call
            job.status, job.phase, job.detail = JobStatus.FAILED, "finished", detail[:2000]
            job.encoding = job.encoding or encoding
            job.finished_at = utcnow()
            job.errors = job.errors or job.prepare_errors or []
            job.invalid = job.invalid or job.prepare_invalid
            job.split_token = None
            uow.session.execute(
                update(ImportChunk)
                .where(ImportChunk.job_pk == job.id, ImportChunk.status == "pending")
                .values(status="failed", detail="the job failed", done_at=utcnow()))
            uow.session.execute(  # parts still splitting: their next write is refused
                update(ImportSplitPart)
                .where(ImportSplitPart.job_pk == job.id, ImportSplitPart.status == "pending")
                .values(status="failed", token=None))
            self._announce(uow.session, job)
            delete_staged(uow.session, job.id)
            uow.after_commit(self.runtime.hooks.events_written)
            uow.commit()

    # ---- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> ImportJobView:
        with self.database.read() as db:
            return self.view(db, find_job(db, job_id))

    def list(self, *, limit: int = 50, before: str | None = None,
             status: str | None = None) -> list[ImportJobView]:
        """Newest first; `before` is a job_id to continue after."""
        with self.database.read() as db:
            stmt = select(ImportJob).order_by(ImportJob.id.desc()).limit(limit)
            if before:
                anchor = find_job(db, before)
                stmt = stmt.where(ImportJob.id < anchor.id)
            if status:
                stmt = stmt.where(ImportJob.status == status.lower())
            return [self.view(db, job) for job in db.execute(stmt).scalars()]

    def unfinished(self) -> builtins.list[str]:
        """Jobs not closed yet (for recovery after a worker died)."""
        with self.database.read() as db:
            return list(db.execute(
                select(ImportJob.job_id).where(ImportJob.status.in_(
                    [JobStatus.QUEUED, JobStatus.RUNNING])).order_by(ImportJob.id)
            ).scalars())

    def take_stalled(self, now: datetime, quiet: timedelta) -> builtins.list[str]:
        """Unfinished jobs that showed no sign of life for `quiet` — no chunk run started
        or ended, no split heartbeat, not created, started or sent again — marked sent
        again now (`resumed_at`; of two callers at once, one takes a job). A chunk run
        marks its start, so with `quiet` longer than a chunk task may run, nothing is
        running for such a job: its tasks were lost (a broker that restarted without its
        data), and the caller sends it again."""
        cutoff = now - quiet
        chunk, part = ImportChunk, ImportSplitPart

        def since(column: Any) -> Any:  # false, not NULL, for a time not set
            return and_(column.is_not(None), column >= cutoff)

        alive = or_(
            ImportJob.created_at >= cutoff, since(ImportJob.started_at),
            since(ImportJob.split_heartbeat_at), since(ImportJob.resumed_at),
            exists().where(chunk.job_pk == ImportJob.id,
                           or_(chunk.started_at >= cutoff, chunk.done_at >= cutoff)),
            exists().where(part.job_pk == ImportJob.id, part.heartbeat_at >= cutoff),
        )
        taken = []
        with self.database.unit_of_work() as uow:
            candidates = uow.session.execute(
                select(ImportJob.id, ImportJob.job_id).where(
                    ImportJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                    ~alive).order_by(ImportJob.id)).all()
            for pk, job_id in candidates:
                claimed = uow.session.execute(
                    update(ImportJob).where(
                        ImportJob.id == pk,
                        ImportJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                        or_(ImportJob.resumed_at.is_(None), ImportJob.resumed_at < cutoff))
                    .values(resumed_at=now))
                if affected_rows(claimed) == 1:
                    taken.append(job_id)
            uow.commit()
        return taken

    def view(self, db: DbSession, job: ImportJob) -> ImportJobView:
        counts = {name: getattr(job, name) for name in ImportCounts.COUNTERS}
        errors = job.errors or []
        done = job.chunk_count if job.status in TERMINAL else 0
        processed = job.processed
        if job.status not in TERMINAL and job.phase == "chunks":
            row = db.execute(
                select(
                    func.count(), func.coalesce(func.sum(ImportChunk.row_count), 0),
                    *[func.coalesce(func.sum(getattr(ImportChunk, n)), 0)
                      for n in ImportCounts.COUNTERS],
                ).where(ImportChunk.job_pk == job.id, ImportChunk.status != "pending")
            ).one()
            done = int(row[0])
            counts = {n: int(v) for n, v in zip(ImportCounts.COUNTERS, row[2:], strict=True)}
            counts["invalid"] += job.prepare_invalid
            processed = int(row[1]) + job.prepare_invalid
            # A chunk's errors never change once it is done: while no chunk ends, a
            # status poll answers the errors it found last time instead of reading the
            # error lists of up to a hundred chunks again.
            seen = (job.job_id, done, counts["invalid"])
            found = _errors_seen.get(seen)
            errors = found if found is not None else _errors_seen.keep(
                seen, self._first_errors(db, job))
        elif job.status not in TERMINAL:
            counts["invalid"] = job.prepare_invalid
            errors = job.prepare_errors or []
        return ImportJobView(
            job_id=job.job_id, status=job.status, phase=job.phase, filename=job.filename,
            format=job.format, encoding=job.encoding, size_bytes=job.size_bytes,
            total_rows=job.total_rows, processed=processed,
            errors=errors,  # type: ignore[arg-type]  # dicts, validated by pydantic
            chunks=job.chunk_count, chunks_done=done, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at, detail=job.detail,
            session_gap=job.session_gap or self.settings.session_gap,
            grouping=job.grouping or str(Grouping.AUTO), review=bool(job.review),
            review_calls=job.review_calls or 0, **counts,
        )



def find_job(db: DbSession, job_id: str, *, lock: bool = False) -> ImportJob:
    stmt = select(ImportJob).where(ImportJob.job_id == job_id)
    if lock:
        stmt = stmt.with_for_update()
    job = db.execute(stmt).scalar_one_or_none()
    if job is None:
        raise NotFound(f"import job {job_id} not found")
    return job


def pending_chunks(db: DbSession, job_pk: int) -> builtins.list[int]:
    return list(db.execute(
        select(ImportChunk.id).where(ImportChunk.job_pk == job_pk,
                                     ImportChunk.status == "pending")
        .order_by(ImportChunk.id)
    ).scalars())


def delete_staged(db: DbSession, job_pk: int) -> None:
    """An ended job's staged data: its upload, its staged rows and runs and its split
    parts; the job keeps its counts and first errors. The retention purge runs it too,
    for whatever a crash between a job's end and this left behind, and then also
    deletes the job's slot marks (`app.retention.service`)."""
    db.execute(delete(ImportChunkPart).where(ImportChunkPart.job_pk == job_pk))
    db.execute(delete(ImportSplitPart).where(ImportSplitPart.job_pk == job_pk))
    db.execute(delete(ImportUploadPart).where(ImportUploadPart.job_pk == job_pk))


class _ErrorsSeen:
    """The first errors of running jobs as status reads last found them, by (job, chunks
    done, invalid rows); the oldest entries go first (a few jobs run at once)."""

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, int]) -> list[dict[str, Any]] | None:
        return self._entries.get(key)

    def keep(self, key: tuple[str, int, int], errors: list[dict[str, Any]]
             ) -> list[dict[str, Any]]:
        with self._lock:
            self._entries[key] = errors
            while len(self._entries) > self._size:
                del self._entries[next(iter(self._entries))]
        return errors


_errors_seen = _ErrorsSeen()
