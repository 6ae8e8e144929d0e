"""An import job's lifecycle as operators see it: progress, row errors, and retry.

Reads and resets of the job rows the import service writes; the caller enqueues a
retried job after `retry_import_job` has committed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session as DbSession

from app.db import Database
from app.errors import Conflict, NotFound
from app.imports.lifecycle import ImportJobView
from app.imports.models import ImportChunk, ImportJob, ImportUploadPart
from app.validation import BoundaryModel

FINISHED_IMPORT_STATUSES = ("succeeded", "partially_succeeded", "failed")


def import_progress(view: ImportJobView) -> dict[str, Any]:
    """The import service's job view plus a 0..1 `progress` for the console's bar."""
    body = view.model_dump(mode="json")
    if view.status in FINISHED_IMPORT_STATUSES:
        progress = 1.0
    elif view.total_rows:
        progress = min(1.0, view.processed / view.total_rows)
    else:
        progress = 0.0
    body["progress"] = round(progress, 4)
    body["finished"] = view.status in FINISHED_IMPORT_STATUSES
    return body


def load_import_job(db: DbSession, job_id: str) -> ImportJob:
    job = db.execute(select(ImportJob).where(ImportJob.job_id == job_id)).scalar_one_or_none()
    if job is None:
        raise NotFound(f"import job {job_id} not found")
    return job


class ImportRetry(BoundaryModel):
    """Body of a retry: optionally read the staged upload with another format/encoding
    (the usual reason an upload failed as a whole)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "ndjson", "csv"] | None = None
    encoding: Literal["utf-8", "utf-8-sig", "gbk"] | None = None


def retry_import_job(database: Database, job_id: str, retry: ImportRetry) -> str:
    """Make a job runnable again; the caller enqueues it after this returns (committed).

    - queued/running: nothing to reset; re-dispatching is harmless (prepare re-sends only
      pending chunks, a done chunk is a no-op) and revives a job whose worker died;
    - failed while reading the upload (the staged upload is still there): back to
      `queued` with its counts cleared, optionally with another format/encoding;
    - anything else (succeeded, or ended after its staged rows were discarded): 409,
      upload the file again.
    Answers the status the job had."""
    with database.unit_of_work() as uow:
        db = uow.session
        job = db.execute(
            select(ImportJob).where(ImportJob.job_id == job_id).with_for_update()
        ).scalar_one_or_none()
        if job is None:
            raise NotFound(f"import job {job_id} not found")
        before = job.status
        if before in ("queued", "running"):
            return before
        staged = db.execute(
            select(func.count()).select_from(ImportUploadPart)
            .where(ImportUploadPart.job_pk == job.id)
        ).scalar_one()
        if before != "failed" or not staged:
            raise Conflict(
                f"import job {job_id} is {before}; only a failed job whose upload is still "
                "staged can be retried (upload the file again)",
                current_status=before,
            )
        db.execute(delete(ImportChunk).where(ImportChunk.job_pk == job.id))
        job.status, job.phase = "queued", "queued"
        job.format = retry.format or job.format
        job.encoding = retry.encoding or job.encoding
        job.total_rows = None
        job.staged_rows = job.chunk_count = job.prepare_invalid = 0
        job.prepare_errors = job.errors = None
        job.processed = job.inserted = job.duplicates = job.invalid = 0
        job.sessions_created = job.sessions_updated = job.conflicts = 0
        job.detail = None
        job.finished_at = None
        uow.commit()
        return before


def import_job_errors(db: DbSession, job_id: str, *, offset: int = 0, limit: int = 100
                      ) -> dict[str, Any]:
    """Row errors `{"line", "error"}` sorted by line: refused while splitting the file, and
    refused by the chunks processed so far (all of them once the job has ended)."""
    job = load_import_job(db, job_id)
    errors: list[dict[str, Any]] = list(job.prepare_errors or [])
    for chunk_errors in db.execute(
        select(ImportChunk.errors).where(ImportChunk.job_pk == job.id,
                                         ImportChunk.errors.is_not(None))
    ).scalars():
        errors.extend(chunk_errors or [])
    if not errors and job.errors:
        errors = list(job.errors)
    unique = {(e.get("line"), e.get("error")): e for e in errors}
    ordered = sorted(unique.values(), key=lambda e: (e.get("line") or 0, str(e.get("error"))))
    return {"job_id": job_id, "status": job.status, "total": len(ordered),
            "items": ordered[offset: offset + limit],
            "next": offset + limit if offset + limit < len(ordered) else None}
