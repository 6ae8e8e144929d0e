"""The history import pipeline (SPEC §4), as plain Python over the database.

    create_job   stage the raw upload in the database (pieces of 1 MiB); job `queued`
    prepare      read the staged upload as a stream: one pass over its bytes (encoding,
                 lines, line starts; CSV and JSON records are counted by parsing), then
                 split the records into chunks of about TASK_ROWS rows (`chunking`), all
                 rows of a slot in one chunk (the split only finds each row's slot) —
                 or, for a big NDJSON upload, cut it at line starts into parts
    split_part   split one part into the same chunks as every other part (the same hash
                 of the slot); `merge_parts`, once every part is done, makes the chunks
    process_chunk  validate, de-duplicate, group and store one chunk in one transaction
                 whose commit also marks the chunk done (a retry is harmless); its rows
                 go to the database in batches of at most BATCH_SIZE rows (the job's
                 `batch_size`, the seed's 批处理大小: one database batch)
    finish       claim the job (one conditional UPDATE: running, every chunk done, not
                 finished), add up the chunks, keep the first row errors, emit
                 `import.finished` — in one transaction, so the close happens once
                 however many callers race for it

The task layer (`tasks.imports`) runs these steps on Celery workers: prepare, then one
task per split part (the last one merges), then one task per chunk; the chunk task that
finds no chunk left pending closes the job. Nothing here imports Celery or Flask.

The steps live in their own modules: `upload` (create_job), `splitting` (prepare,
split_part, merge_parts; `staging` fences its writes), `chunks` (process_chunk) and
`lifecycle` (the job's close, its failure, its reads); `ImportService` is their one door.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from datetime import timedelta
from typing import IO, Any

from app.db import Database, utcnow
from app.imports.batch import ACTOR
from app.imports.chunking import TASK_ROWS
from app.imports.chunks import ChunkProcessor
from app.imports.counts import ImportCounts
from app.imports.lifecycle import ImportJobView, JobLifecycle
from app.imports.pages import PageLimits
from app.imports.segmenting import GroupingOptions, Segmenter, split_at_gaps
from app.imports.splitting import PART_MIN_BYTES, SPLIT_LEASE, PrepareOutcome, Splitter
from app.imports.upload import Uploads


class ImportService:
    """Every step of an import job; each one safe to run twice."""

    def __init__(self, runtime: Any, *, segmenter: Segmenter = split_at_gaps,
                 split_lease: float = SPLIT_LEASE,
                 page_limits: PageLimits | None = None, task_rows: int = TASK_ROWS,
                 split_parts: int = 1, part_min_bytes: int = PART_MIN_BYTES) -> None:
        self.runtime = runtime
        self.database: Database = runtime.database
        self.settings = runtime.settings
        self.jobs = JobLifecycle(runtime)
        self.uploads = Uploads(runtime, self.jobs)
        self.splitter = Splitter(runtime, self.jobs, split_lease=split_lease,
                                 task_rows=task_rows, split_parts=split_parts,
                                 part_min_bytes=part_min_bytes)
        self.chunks = ChunkProcessor(runtime, segmenter=segmenter, page_limits=page_limits)

    @property
    def task_rows(self) -> int:
        """Rows one chunk task takes (about)."""
        return self.splitter.task_rows

    # ---- upload -------------------------------------------------------------------------
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
        """Stage an upload and queue it (`Uploads.create_job`)."""
        return self.uploads.create_job(
            stream, filename=filename, format=format, encoding=encoding, actor=actor,
            max_bytes=max_bytes, session_gap=session_gap, grouping=grouping, review=review)

    def grouping_options(self, *, session_gap: int | None = None, grouping: str | None = None,
                         review: bool | None = None) -> GroupingOptions:
        """An upload's grouping options, checked and resolved against the settings."""
        return self.uploads.grouping_options(session_gap=session_gap, grouping=grouping,
                                              review=review)

    # ---- split ----------------------------------------------------------------------------
    def prepare(self, job_id: str) -> PrepareOutcome:
        """Split the staged upload into chunks (`Splitter.prepare`)."""
        return self.splitter.prepare(job_id)

    def split_part(self, job_id: str, part_pk: int) -> PrepareOutcome:
        """Split one part of a big NDJSON upload (`Splitter.split_part`)."""
        return self.splitter.split_part(job_id, part_pk)

    def parts_left(self, job_id: str) -> int:
        """Split parts still pending."""
        return self.splitter.parts_left(job_id)

    def merge_parts(self, job_id: str) -> PrepareOutcome:
        """Make the job's chunks once every part is done (`Splitter.merge_parts`)."""
        return self.splitter.merge_parts(job_id)

    # ---- one chunk --------------------------------------------------------------------------
    def process_chunk(
        self, chunk_pk: int, *, after_write: Callable[[], None] | None = None
    ) -> ImportCounts | None:
        """Store one chunk; None if it was done already (`ChunkProcessor.process_chunk`)."""
        return self.chunks.process_chunk(chunk_pk, after_write=after_write)

    def fail_chunk(self, chunk_pk: int, detail: str) -> None:
        """A chunk that cannot be applied: its rows count as invalid."""
        self.chunks.fail_chunk(chunk_pk, detail)

    def chunks_left(self, job_id: str) -> int:
        """Chunks still pending (every chunk task asks: a count, not the list)."""
        return self.chunks.chunks_left(job_id)

    # ---- close ----------------------------------------------------------------------------
    def finish(self, job_id: str) -> ImportJobView:
        """Close the job once every chunk is done (safe to call early or twice)."""
        return self.jobs.finish(job_id)

    def close(self, job_id: str) -> ImportJobView | None:
        """Close the job if every chunk is done and nobody closed it (`JobLifecycle.close`)."""
        return self.jobs.close(job_id)

    def fail_job(self, job_id: str, detail: str) -> None:
        """Close a job that cannot go on as failed (the task layer's last resort: a split
        or a close that keeps failing), so that no job stays 'running' for good."""
        self.jobs.fail(job_id, detail)

    # ---- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> ImportJobView:
        return self.jobs.get(job_id)

    def list(self, *, limit: int = 50, before: str | None = None,
             status: str | None = None) -> builtins.list[ImportJobView]:
        """Newest first; `before` is a job_id to continue after."""
        return self.jobs.list(limit=limit, before=before, status=status)

    def unfinished(self) -> builtins.list[str]:
        """Jobs not closed yet (for recovery after a worker died)."""
        return self.jobs.unfinished()

    def take_stalled(self, quiet: timedelta) -> builtins.list[str]:
        """Unfinished jobs with no sign of life for `quiet`, marked sent again
        (`JobLifecycle.take_stalled`)."""
        return self.jobs.take_stalled(utcnow(), quiet)
