"""The upload (SPEC §4): staged in the database in pieces of 1 MiB as it streams in —
refused past MAX_UPLOAD_BYTES, nothing of it kept — with its grouping options checked,
and read back by the split as a stream (`UploadReader`), so that no step depends on a
file on the web server's disk."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import IO, Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session as DbSession

from app.db import Database, utcnow
from app.errors import UploadTooLarge, ValidationFailed
from app.ids import new_id
from app.imports.batch import ACTOR
from app.imports.decoding import ENCODINGS, GZIP_MAGIC
from app.imports.formats import ImportFormat
from app.imports.lifecycle import ImportJobView, JobLifecycle, JobStatus
from app.imports.models import ImportJob, ImportUploadPart
from app.imports.segmenting import Grouping, GroupingOptions

UPLOAD_PIECE = 1 << 20
MAX_SESSION_GAP = 30 * 86400  # an upload's session_gap, at most (s)


class UploadReader(io.RawIOBase):
    """The staged upload as a binary stream, one piece in memory at a time."""

    def __init__(self, database: Database, job_pk: int, parts: int,
                 on_piece: Callable[[], None] | None = None) -> None:
        self._database = database
        self._job_pk = job_pk
        self._parts = parts
        self._on_piece = on_piece
        self._next = 0
        self._piece = b""
        self._offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._offset >= len(self._piece):
            if self._next >= self._parts:
                return 0
            if self._on_piece is not None:
                self._on_piece()
            with self._database.engine.connect() as conn:
                self._piece = conn.execute(
                    select(ImportUploadPart.data).where(
                        ImportUploadPart.job_pk == self._job_pk,
                        ImportUploadPart.seq == self._next,
                    )
                ).scalar_one()
            self._next += 1
            self._offset = 0
        size = min(len(buffer), len(self._piece) - self._offset)
        buffer[:size] = self._piece[self._offset:self._offset + size]
        self._offset += size
        return size



class Uploads:
    """Stages uploads as queued jobs."""

    def __init__(self, runtime: Any, jobs: JobLifecycle) -> None:
        self.database: Database = runtime.database
        self.settings = runtime.settings
        self.jobs = jobs

    def create_job(
        self,
        stream: IO[bytes],
        *,
        filename: str | None = None,
        format: str | None = None,
        encoding: str | None = None,
        actor: str = ACTOR,
        max_bytes: int | None = None,
        session_gap: int | None = None,
        grouping: str | None = None,
        review: bool | None = None,
    ) -> ImportJobView:
        """Stage an upload in the database and queue it, with its grouping options (SPEC
        §4; unset: SESSION_GAP, `auto`, GROUPING_REVIEW), checked here whatever the door.
        The caller starts the pipeline (`runtime.dispatcher.start_import`) once this has
        returned (i.e. committed). An upload past `max_bytes` (default MAX_UPLOAD_BYTES),
        counted as it streams in, is refused with UploadTooLarge and nothing of it is kept."""
        limit = max_bytes or self.settings.max_upload_bytes
        fmt = _choice("format", format, [f.value for f in ImportFormat])
        enc = _choice("encoding", encoding, list(ENCODINGS))
        options = self.grouping_options(session_gap=session_gap, grouping=grouping,
                                        review=review)
        with self.database.unit_of_work() as uow:
            job = ImportJob(
                job_id=new_id("imp"), status=JobStatus.QUEUED, phase="queued",
                filename=(filename or "")[:255] or None, format=fmt, encoding=enc,
                batch_size=self.settings.batch_size, actor=actor[:80], created_at=utcnow(),
                size_bytes=0, upload_parts=0, staged_rows=0, chunk_count=0,
                prepare_invalid=0, processed=0, inserted=0, duplicates=0, invalid=0,
                sessions_created=0, sessions_updated=0, conflicts=0,
                session_gap=options.session_gap, grouping=str(options.grouping),
                review=options.review, review_calls=0, boundaries_reviewed=0,
                boundaries_merged=0,
            )
            uow.session.add(job)
            uow.session.flush()
            size = parts = 0
            while piece := stream.read(UPLOAD_PIECE):
                if size + len(piece) > limit:
                    raise UploadTooLarge(limit)  # the transaction rolls back: nothing kept
                uow.session.execute(insert(ImportUploadPart),
                                    [{"job_pk": job.id, "seq": parts, "data": piece}])
                size += len(piece)
                parts += 1
            if size == 0:
                raise ValidationFailed("the upload is empty",
                                       [{"field": "file", "message": "no bytes received"}])
            job.size_bytes, job.upload_parts = size, parts
            job.compression = "gzip" if _first_bytes(uow.session, job.id).startswith(
                GZIP_MAGIC) else None
            uow.commit()
            return self.jobs.view(uow.session, job)

    def grouping_options(self, *, session_gap: int | None = None, grouping: str | None = None,
                         review: bool | None = None) -> GroupingOptions:
        """An upload's grouping options, checked (422 naming the option) and resolved
        against the settings."""
        errors = []
        if session_gap is not None and not (
                isinstance(session_gap, int) and 1 <= session_gap <= MAX_SESSION_GAP):
            errors.append({"field": "session_gap",
                           "message": f"seconds, an integer in 1..{MAX_SESSION_GAP}"})
        if grouping is not None and grouping not in tuple(Grouping):
            errors.append({"field": "grouping",
                           "message": f"use one of {[g.value for g in Grouping]}"})
        wants_review = self.settings.grouping_review if review is None else review
        if wants_review and self.settings.grouping_review_endpoint is None:
            errors.append({"field": "review", "message": "no review endpoint is configured "
                           "(GROUPING_LLM_BASE_URL and GROUPING_LLM_MODEL, or LLM_*)"})
        if errors:
            raise ValidationFailed("invalid grouping options: " + "; ".join(
                f"{e['field']}: {e['message']}" for e in errors), errors)
        return GroupingOptions(session_gap=session_gap or self.settings.session_gap,
                               grouping=Grouping(grouping or Grouping.AUTO),
                               review=bool(wants_review))


def _first_bytes(db: DbSession, job_pk: int) -> bytes:
    data = db.execute(select(ImportUploadPart.data).where(
        ImportUploadPart.job_pk == job_pk, ImportUploadPart.seq == 0)).scalar_one_or_none()
    return (data or b"")[:4]


def _choice(name: str, value: str | None, allowed: list[str]) -> str | None:
    if value is None or value == "" or value == "auto":
        return None
    text = value.strip().lower()
    if text == "utf8":
        text = "utf-8"
    if text in ("utf-8-bom", "utf8-sig", "utf-8-sig"):
        text = "utf-8-sig"
    if text not in allowed:
        raise ValidationFailed(
            f"unknown {name} {value!r}", [{"field": name, "message": f"use one of {allowed}"}])
    return text
