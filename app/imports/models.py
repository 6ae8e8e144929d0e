"""Tables of the history import (SPEC §4): the job, its staged upload, its chunks.

The raw upload and the chunked rows live in the database, never on the web
server's disk, so any worker on any machine can pick up any step. A chunk's
`status = 'done'` is committed in the same transaction as its messages and
sessions: a chunk retried after a crash either sees the marker and stops, or
starts again from nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, IdStr, JsonDoc, UTCDateTime
from app.sessions.models import ID_LEN

# MySQL's BLOB stops at 64 KiB; staged pieces are up to a few MiB.
Blob = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql")


class ImportJob(Base):
    """One uploaded export and what became of it."""

    __tablename__ = "import_jobs"
    __table_args__ = (Index("ix_import_jobs_created", "created_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(IdStr(40), unique=True)
    status: Mapped[str] = mapped_column(String(24))
    phase: Mapped[str] = mapped_column(String(16), default="queued")
    filename: Mapped[str | None] = mapped_column(String(255), nullable=True)
    format: Mapped[str | None] = mapped_column(String(8), nullable=True)
    encoding: Mapped[str | None] = mapped_column(String(16), nullable=True)
    compression: Mapped[str | None] = mapped_column(String(8), nullable=True)
    size_bytes: Mapped[int] = mapped_column(BigId, default=0)
    upload_parts: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(80))

    total_rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    staged_rows: Mapped[int] = mapped_column(Integer, default=0)
    chunk_count: Mapped[int] = mapped_column(Integer, default=0)
    # The split's fence: whoever splits holds `split_token` and refreshes the heartbeat
    # with every write; a split that went quiet for SPLIT_LEASE may be taken over, and the
    # old splitter's next write is then refused (the token no longer matches).
    split_token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    split_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Rows refused while splitting (unparseable records, rows without a slot)
    prepare_invalid: Mapped[int] = mapped_column(Integer, default=0)
    prepare_errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc, nullable=True)

    # Final counts, written when the job closes (read from the chunks while it runs)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    inserted: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    sessions_created: Mapped[int] = mapped_column(Integer, default=0)
    sessions_updated: Mapped[int] = mapped_column(Integer, default=0)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Grouping options of the upload (SPEC §4; null on jobs from before them: the
    # settings' defaults) and what the LLM review did: `review_calls` is the job's spent
    # call budget (reserved one call at a time), the boundary counts add up the chunks'.
    session_gap: Mapped[int | None] = mapped_column(Integer, nullable=True)
    grouping: Mapped[str | None] = mapped_column(String(8), nullable=True)
    review: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    review_calls: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    boundaries_reviewed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    boundaries_merged: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When the beat last sent the job again after it showed no sign of life
    # (`JobLifecycle.take_stalled`); at most once per stall period.
    resumed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ImportUploadPart(Base):
    """The raw upload, in pieces of about 1 MiB, in arrival order."""

    __tablename__ = "import_upload_parts"

    job_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("import_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(Blob)


class ImportChunk(Base):
    """About BATCH_SIZE rows, every row of a slot in the same chunk; one transaction."""

    __tablename__ = "import_chunks"
    __table_args__ = (
        UniqueConstraint("job_pk", "bucket", name="uq_import_chunks_job_bucket"),
        Index("ix_import_chunks_job_status", "job_pk", "status"),
        Index("ix_import_chunks_job_first_error", "job_pk", "first_error_line"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(BigId, ForeignKey("import_jobs.id", ondelete="CASCADE"))
    bucket: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(8), default="pending")  # pending, done, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    inserted: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    sessions_created: Mapped[int] = mapped_column(Integer, default=0)
    sessions_updated: Mapped[int] = mapped_column(Integer, default=0)
    conflicts: Mapped[int] = mapped_column(Integer, default=0)
    boundaries_reviewed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    boundaries_merged: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc, nullable=True)
    # The line of its first row error: a job's first errors come from the chunks with
    # the lowest ones, so a status read loads a hundred error lists, not thousands.
    first_error_line: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # When its last run began (a sign of life for `JobLifecycle.take_stalled`)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ImportSplitPart(Base):
    """A line-aligned part of a big NDJSON upload, split by a task of its own so that
    every worker splits (`ImportService.split_part`). Every part routes its rows by the
    same hash of their slot into the job's `buckets`, so the rows of one slot meet in one
    chunk whichever parts they came from; the chunks are made once every part is done.

    The part's fence: the run splitting it holds `token` and refreshes `heartbeat_at`
    with every write (a part quiet for SPLIT_LEASE may be taken over: the new run deletes
    what the old one staged, and the old run's next write is refused). `done` is written
    with the part's counts, so a retried part either sees it or starts from nothing."""

    __tablename__ = "import_split_parts"
    __table_args__ = (UniqueConstraint("job_pk", "part", name="uq_import_split_parts_part"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(BigId, ForeignKey("import_jobs.id", ondelete="CASCADE"))
    part: Mapped[int] = mapped_column(Integer)
    # Bytes [start_byte, end_byte) of the decompressed upload; its first line's number
    start_byte: Mapped[int] = mapped_column(BigId)
    end_byte: Mapped[int] = mapped_column(BigId)
    first_line: Mapped[int] = mapped_column(Integer)
    buckets: Mapped[int] = mapped_column(Integer)
    clean: Mapped[bool] = mapped_column(Boolean)  # every byte of the upload decodes
    status: Mapped[str] = mapped_column(String(8), default="pending")  # pending, done, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    staged_rows: Mapped[int] = mapped_column(Integer, default=0)
    records: Mapped[int] = mapped_column(Integer, default=0)
    invalid: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonDoc, nullable=True)
    # [[bucket, rows], …]: what the part staged for each chunk
    rows_per_bucket: Mapped[list[list[int]] | None] = mapped_column(JsonDoc, nullable=True)


class ImportChunkPart(Base):
    """Rows staged for one chunk: a zlib-compressed JSON array of `[line, {field: value}]`."""

    __tablename__ = "import_chunk_parts"
    __table_args__ = (Index("ix_import_chunk_parts_bucket", "job_pk", "bucket", "seq"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_pk: Mapped[int] = mapped_column(BigId, ForeignKey("import_jobs.id", ondelete="CASCADE"))
    bucket: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(Blob)


class ImportSlotMark(Base):
    """A slot of a chunk already applied through the slot lock (live segments).

    Such a slot commits in its own slot transaction; the mark, written in that
    same transaction with the slot's counts, lets a retried chunk skip it."""

    __tablename__ = "import_slot_marks"
    __table_args__ = (
        UniqueConstraint("chunk_pk", "account_id", "shop_id", name="uq_import_slot_marks_slot"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    chunk_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("import_chunks.id", ondelete="CASCADE")
    )
    account_id: Mapped[str] = mapped_column(IdStr(ID_LEN))
    shop_id: Mapped[str] = mapped_column(IdStr(ID_LEN))
    counts: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
