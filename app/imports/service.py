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
"""

from __future__ import annotations

import builtins
import heapq
import io
import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any, Protocol

from pydantic import BaseModel
from sqlalchemy import delete, exists, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session as DbSession

from app.db import Database, affected_rows, utcnow
from app.errors import AutoSessionError, NotFound, ServiceUnavailable, ValidationFailed
from app.events.outbox import Audience, record_event
from app.ids import new_id
from app.imports import formats
from app.imports.chunking import TASK_ROWS, ChunkSpool, StagedRow, chunk_count, slot_of
from app.imports.formats import ENCODINGS, ImportFormat, UnreadableUpload
from app.imports.grouping import (
    ACTOR,
    BatchContext,
    ImportCounts,
    Msg,
    Segmenter,
    Slot,
    core_insert,
    import_messages,
    resolve_session_slots,
    split_at_gaps,
    validate_row,
)
from app.imports.models import (
    ImportChunk,
    ImportChunkPart,
    ImportJob,
    ImportSlotMark,
    ImportSplitPart,
    ImportUploadPart,
)
from app.imports.pages import (
    RUN_SEQ_BASE,
    PageLimits,
    RowErrors,
    SortedRuns,
    SortKey,
    read_staged,
    slot_pages,
    sort_key,
)
from app.imports.review import BoundaryReviewer, ReviewEndpoint
from app.imports.segmenting import Grouping, GroupingOptions
from app.validation import LATEST_AHEAD

log = logging.getLogger(__name__)

UPLOAD_PIECE = 1 << 20
MAX_ERRORS = 100
MAX_SESSION_GAP = 30 * 86400  # an upload's session_gap, at most (s)
# A chunk attempted this often without finishing (its worker killed, timed out) fails:
# a job always ends, however its chunks die.
MAX_CHUNK_ATTEMPTS = 10
TERMINAL = ("succeeded", "partially_succeeded", "failed")
# A split that shows no sign of life (a staged batch, a piece of the upload read) for
# this long may be taken over by another run of prepare; until then, prepare leaves it
# alone and looks again later. Taking over a live split is safe, only wasteful: the
# old splitter's next write is refused by the job's split token.
SPLIT_LEASE = 60.0
SPLIT_HEARTBEAT = 10.0
# An NDJSON upload of at least two of these (decompressed) is split in parts, one task
# each, so that every worker splits (`ImportService.split_part`); a smaller one, and CSV
# or a JSON array (whose records may span lines), is split by one run of prepare.
PART_MIN_BYTES = 8 << 20
# Parts are cut at line starts found by the upload's scan every this many bytes (or an
# eighth of the smallest part, if less), so parts come out about equal.
CUT_EVERY = 1 << 20
# Staged pieces of part `p` are numbered from p << PART_SEQ_SHIFT (below RUN_SEQ_BASE).
PART_SEQ_SHIFT = 20
MAX_PARTS = RUN_SEQ_BASE >> PART_SEQ_SHIFT


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


class UploadTooLarge(AutoSessionError):
    """An upload past MAX_UPLOAD_BYTES on the wire: refused, nothing of it kept."""

    status = 413
    type = "/problems/upload-too-large"
    title = "Upload too large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the upload is larger than MAX_UPLOAD_BYTES ({limit} bytes)",
                         max_upload_bytes=limit)


class AlreadyApplied(Exception):
    """The chunk's 'done' marker was committed by another run."""


class SplitTakenOver(Exception):
    """Another run of prepare took this job's split over; this one stops, unwritten."""


@dataclass
class PrepareOutcome:
    job_id: str
    chunk_pks: list[int]
    ready_to_finish: bool
    retry_in: float | None = None  # another run is splitting: look again after this long
    part_pks: list[int] = field(default_factory=list)  # split parts to send, one task each


class _Claim:
    """A token a split run wrote on its row, refreshed with every write (`write`, in the
    write's own transaction) and, between writes, by `beat` now and then."""

    def __init__(self, database: Database, pk: int, token: str) -> None:
        self.database = database
        self.pk = pk
        self.token = token
        self._last = time.monotonic()

    def write(self, db: DbSession, staged_rows: int = 0) -> None:
        raise NotImplementedError

    def beat(self) -> None:
        """Between writes (while the upload is read), refresh the heartbeat now and then."""
        if time.monotonic() - self._last < SPLIT_HEARTBEAT:
            return
        with self.database.unit_of_work() as uow:
            self.write(uow.session)
            uow.commit()


class SplitFence(_Claim):
    """A split's claim on its job: the token it wrote when it began. Every write of the
    split checks the token in the same transaction (and refreshes the heartbeat), so a
    splitter that was taken over cannot stage a row more."""

    @property
    def job_pk(self) -> int:
        return self.pk

    def write(self, db: DbSession, staged_rows: int = 0) -> None:
        """In the caller's transaction, before its writes: count `staged_rows` and refresh
        the heartbeat iff the split is still ours (the job row stays locked till commit,
        so a take-over waits for this transaction, then deletes what it staged)."""
        result = db.execute(
            update(ImportJob)
            .where(ImportJob.id == self.job_pk, ImportJob.split_token == self.token)
            .values(staged_rows=ImportJob.staged_rows + staged_rows,
                    split_heartbeat_at=utcnow())
        )
        if affected_rows(result) != 1:
            raise SplitTakenOver(f"import job {self.job_pk}: split taken over by another run")
        self._last = time.monotonic()


class Fence(Protocol):
    """What a split checks with every write: `SplitFence` (the job's) or `PartFence`."""

    def write(self, db: DbSession, staged_rows: int = 0) -> None: ...

    def beat(self) -> None: ...


class PartFence(_Claim):
    """A split part's claim: the token its run wrote on the part's row. Like
    `SplitFence`, checked (and the heartbeat refreshed) in every write's transaction; a
    part of a job that failed meanwhile is refused too (the failure clears its token)."""

    @property
    def part_pk(self) -> int:
        return self.pk

    def write(self, db: DbSession, staged_rows: int = 0) -> None:
        result = db.execute(
            update(ImportSplitPart)
            .where(ImportSplitPart.id == self.part_pk, ImportSplitPart.token == self.token,
                   ImportSplitPart.status == "pending")
            .values(staged_rows=ImportSplitPart.staged_rows + staged_rows,
                    heartbeat_at=utcnow())
        )
        if affected_rows(result) != 1:
            raise SplitTakenOver(f"split part {self.part_pk}: taken over or ended")
        self._last = time.monotonic()


class StagingWriter:
    """The split's staged pieces, written on a thread of their own while the split reads
    on: compressing a batch (zlib lets go of the GIL) and its fenced INSERT overlap the
    parsing of the next rows, instead of the splitter waiting for them. One batch waits
    at most while another is written, so memory stays bounded; batches are written in
    the order given. The first error of a write (SplitTakenOver, the database away) is
    raised in the splitter at its next `put` or at `close`, and nothing after it is
    written."""

    def __init__(self, write: Callable[[Any], None]) -> None:
        self._write = write
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="import-staging", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (batch := self._queue.get()) is not _DONE:
            if self._error is None:
                try:
                    self._write(batch)
                except BaseException as exc:  # raised in the splitter's thread
                    self._error = exc

    def put(self, batch: Any) -> None:
        self._raise()
        self._queue.put(batch)

    def close(self) -> None:
        """Wait for every batch given; raise the first write's error, if any."""
        if self._thread.is_alive():
            self._queue.put(_DONE)
            self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop: batches not yet started are dropped, the one being written ends."""
        if not self._thread.is_alive():
            return
        self._error = self._error or SplitTakenOver("the split stopped")
        while True:  # make room: drop what waits (its rows were never staged)
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_DONE)
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


_DONE = object()


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


class ImportService:
    """Every step of an import job; each one safe to run twice."""

    def __init__(self, runtime: Any, *, segmenter: Segmenter = split_at_gaps,
                 split_lease: float = SPLIT_LEASE,
                 page_limits: PageLimits | None = None, task_rows: int = TASK_ROWS,
                 split_parts: int = 1, part_min_bytes: int = PART_MIN_BYTES) -> None:
        self.runtime = runtime
        self.database: Database = runtime.database
        self.settings = runtime.settings
        self.segmenter = segmenter
        self.split_lease = split_lease
        self.page_limits = page_limits or PageLimits()
        self.task_rows = task_rows  # rows one chunk task takes (about)
        # At most this many parts a split (the task layer passes the worker's cores)
        self.split_parts = max(1, min(split_parts, MAX_PARTS))
        self.part_min_bytes = part_min_bytes

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
                formats.GZIP_MAGIC) else None
            uow.commit()
            return self._view(uow.session, job)

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

    def _job_grouping(self, job: ImportJob) -> tuple[GroupingOptions, BoundaryReviewer | None]:
        """The options a job was uploaded with (a job from before them: the defaults),
        and its reviewer when it asked for review."""
        options = GroupingOptions(
            session_gap=job.session_gap or self.settings.session_gap,
            grouping=Grouping(job.grouping or Grouping.AUTO), review=bool(job.review))
        endpoint = self.settings.grouping_review_endpoint
        if not options.review:
            return options, None
        if endpoint is None:
            log.warning("import %s asked for review, but no endpoint is configured any more: "
                        "the gap rule's boundaries are kept", job.job_id)
            return options, None
        settings, job_pk = self.settings, job.id
        return options, BoundaryReviewer(
            endpoint=ReviewEndpoint(*endpoint), confidence=settings.grouping_review_confidence,
            reserve=lambda: self._reserve_review_call(job_pk),
            min_gap=timedelta(seconds=settings.grouping_review_min_gap),
            max_gap=timedelta(seconds=settings.grouping_review_max_gap))

    def _reserve_review_call(self, job_pk: int) -> bool:
        """Spend one call of the job's review budget (GROUPING_REVIEW_MAX_CALLS): one
        conditional UPDATE, so chunks on any number of workers share it."""
        with self.database.unit_of_work() as uow:
            result = uow.session.execute(
                update(ImportJob)
                .where(ImportJob.id == job_pk,
                       ImportJob.review_calls < self.settings.grouping_review_max_calls)
                .values(review_calls=ImportJob.review_calls + 1)
                .execution_options(synchronize_session=False))
            uow.commit()
        return affected_rows(result) == 1

    # ---- split ----------------------------------------------------------------------------
    def prepare(self, job_id: str) -> PrepareOutcome:
        """Split the staged upload into chunks. On a job already split, answer its
        pending chunks (so a lost dispatch is recovered by running this again). On a job
        another run is splitting right now, do nothing and say when to look again."""
        with self.database.unit_of_work() as uow:
            job = self._job(uow.session, job_id, lock=True)
            if job.status in TERMINAL:
                return PrepareOutcome(job_id, [], False)
            if job.phase in ("chunks", "finishing"):
                pending = self._pending_chunks(uow.session, job.id)
                return PrepareOutcome(job_id, pending, not pending)
            if job.phase == "split_parts":  # split in parts: send those left, or merge
                parts = self._pending_parts(uow.session, job.id)
                if parts:
                    return PrepareOutcome(job_id, [], False, part_pks=parts)
                merge = True
            else:
                merge = False
            now = utcnow()
            if not merge:
                if job.phase == "splitting" and job.split_heartbeat_at is not None:
                    quiet = (now - job.split_heartbeat_at).total_seconds()
                    if quiet < self.split_lease:
                        return PrepareOutcome(job_id, [], False,
                                              retry_in=self.split_lease - quiet)
                    log.warning("import %s: split quiet for %.0f s; taking it over", job_id,
                                quiet)
                token = new_id("spl")
                job.status, job.phase = JobStatus.RUNNING, "splitting"
                job.split_token, job.split_heartbeat_at = token, now
                job.started_at = job.started_at or now
                job.staged_rows = 0
                # Leftovers of an earlier attempt that died (or was taken over) while
                # splitting, in one run or in parts
                uow.session.execute(delete(ImportChunkPart)
                                    .where(ImportChunkPart.job_pk == job.id))
                uow.session.execute(delete(ImportSplitPart)
                                    .where(ImportSplitPart.job_pk == job.id))
                uow.commit()
            job_pk, parts_in, batch = job.id, job.upload_parts, job.batch_size
            filename, fmt_name, encoding = job.filename, job.format, job.encoding
        if merge:
            return self.merge_parts(job_id)
        fence = SplitFence(self.database, job_pk, token)
        expanded = self.settings.max_upload_expanded_bytes

        def opener() -> IO[bytes]:
            return UploadReader(self.database, job_pk, parts_in,  # type: ignore[return-value]
                                on_piece=fence.beat)

        try:
            cut_every = max(1, min(CUT_EVERY, self.part_min_bytes // 8))
            scan = formats.scan_upload(opener, encoding, max_bytes=expanded,
                                       cut_every=cut_every if self.split_parts > 1 else None)
            encoding = scan.encoding
            fmt = ImportFormat(fmt_name) if fmt_name else formats.detect_format(
                filename, opener, encoding, expanded)
            if fmt is ImportFormat.NDJSON:
                rows_hint = scan.lines  # at most one record per line: no parse to size chunks
                cuts = self._part_cuts(scan)
                if cuts:
                    return self._plan_parts(job_id, job_pk, token, scan, cuts)
            else:
                with formats.open_text(opener, encoding, expanded) as text:
                    rows_hint = formats.count_records(text, fmt)
            used_encoding = encoding
            outcome = self._split(
                job_pk, lambda: formats.open_text(opener, used_encoding, expanded), fmt,
                chunk_count(rows_hint, self.task_rows), batch, clean=scan.clean, fence=fence)
        except SplitTakenOver:
            log.info("import %s: split taken over by another run; this one stops", job_id)
            return PrepareOutcome(job_id, [], False)
        except UnreadableUpload as exc:  # DecompressedTooLarge (a gzip bomb) among them
            self._fail(job_id, str(exc), encoding=encoding, split_token=token)
            return PrepareOutcome(job_id, [], False)
        except (UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:  # a broken gzip
            self._fail(job_id, f"the upload cannot be read: {exc}", encoding=encoding,
                       split_token=token)
            return PrepareOutcome(job_id, [], False)
        except (OperationalError, ServiceUnavailable):
            raise  # the database or Redis is away: the task retries, the split resumes
        except Exception as exc:  # anything else would leave the job 'running' for good
            log.exception("import %s: the split failed", job_id)
            self._fail(job_id, f"the upload could not be read: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", encoding=encoding, split_token=token)
            return PrepareOutcome(job_id, [], False)
        with self.database.unit_of_work() as uow:
            job = self._job(uow.session, job_id, lock=True)
            if job.split_token != token or job.status in TERMINAL:
                log.info("import %s: split taken over at its end; this one stops", job_id)
                return PrepareOutcome(job_id, [], False)
            self._add_chunks(uow.session, job_pk, outcome.rows_per_bucket)
            job.format, job.encoding = fmt.value, encoding
            job.total_rows = outcome.records
            job.staged_rows = sum(outcome.rows_per_bucket.values())
            job.chunk_count = len(outcome.rows_per_bucket)
            job.prepare_invalid = outcome.invalid
            job.prepare_errors = outcome.errors
            job.phase = "chunks"
            uow.session.flush()
            pending = self._pending_chunks(uow.session, job_pk)
            uow.commit()
        return PrepareOutcome(job_id, pending, not pending)

    @dataclass
    class _Split:
        records: int
        rows_per_bucket: dict[int, int]
        invalid: int
        errors: list[dict[str, Any]]

    def _split(self, job_pk: int, open_text: Callable[[], IO[str]], fmt: ImportFormat,
               buckets: int, batch: int, *, clean: bool, fence: Fence, first_line: int = 1,
               seq_base: int = 0) -> ImportService._Split:
        """Route every record to its slot's chunk, one of `buckets` of about `task_rows`
        rows (the rows of a task, not BATCH_SIZE: `batch` bounds only the pieces one
        INSERT stages). Chunks wait for the split, so it only finds each row's slot; the
        chunks validate. The text is the whole upload, or one part of it whose lines
        are numbered from `first_line` and whose pieces from `seq_base`."""
        records = 0
        seqs: dict[int, int] = {}

        def write_batch(bucket: int, rows: list[StagedRow]) -> None:
            pending.append((bucket, rows))

        pending: list[tuple[int, list[StagedRow]]] = []
        # Every bucket's buffer is written out once the spool holds about 500 rows a
        # bucket, 5,000 to 20,000 rows in all (pieces of 100 to 500 rows): with one
        # batch waiting for the staging writer and one being written, memory holds
        # about 60,000 staged rows at most, whatever the size of the upload.
        spool = ChunkSpool(buckets, write_batch,
                           spool_rows=max(5_000, min(20_000, 500 * buckets)))
        invalid = 0
        errors: list[dict[str, Any]] = []
        unresolved: list[tuple[int, dict[str, Any]]] = []

        def bad(line: int, text: str) -> None:
            nonlocal invalid
            invalid += 1
            if len(errors) < MAX_ERRORS:
                errors.append({"line": line, "error": text})

        def resolve(batch_rows: list[tuple[int, dict[str, Any]]]) -> None:
            slots = resolve_session_slots(self.runtime, [
                str(f.get("session_id")) for _, f in batch_rows])
            for line, fields in batch_rows:
                slot = slots.get(str(fields.get("session_id")))
                if slot is None:
                    bad(line, f"session_id: no session {fields.get('session_id')!r}, and no "
                              "account_id/shop_id given")
                    continue
                fields["account_id"], fields["shop_id"] = slot
                spool.add(slot, line, fields)

        def stage(batch_pieces: list[tuple[int, int, list[StagedRow]]]) -> None:
            """One fenced transaction: the split still ours, these pieces staged."""
            with self.database.unit_of_work() as uow:
                fence.write(uow.session, sum(len(rows) for _, _, rows in batch_pieces))
                core_insert(uow.session, ImportChunkPart, [
                    {"job_pk": job_pk, "bucket": bucket, "seq": seq, "row_count": len(rows),
                     "payload": formats.pack_staged(rows)}
                    for bucket, seq, rows in batch_pieces], batch=batch)
                uow.commit()

        writer = StagingWriter(stage)

        def flush_pending() -> None:
            if not pending:
                return
            pieces = []
            for bucket, rows in pending:
                seq = seqs.get(bucket, seq_base)
                seqs[bucket] = seq + 1
                pieces.append((bucket, seq, rows))
            pending.clear()
            writer.put(pieces)

        try:
            with open_text() as text:
                for record in formats.iter_records(text, fmt, clean=clean,
                                                   first_line=first_line):
                    records += 1
                    if record.fields is None:
                        bad(record.line, record.error or "unreadable record")
                        continue
                    slot = slot_of(record.fields)
                    if slot is None:
                        if record.fields.get("session_id") not in (None, ""):
                            unresolved.append((record.line, record.fields))
                            if len(unresolved) >= 500:
                                resolve(unresolved)
                                unresolved.clear()
                            continue
                        missing = "account_id" if slot_of(
                            {**record.fields, "account_id": "x"}) else "shop_id"
                        if not record.fields.get("shop_id") and missing == "account_id":
                            missing = "account_id, shop_id"
                        bad(record.line, f"{missing}: is missing (required unless "
                                         "session_id is given)")
                        continue
                    spool.add(slot, record.line, record.fields, record.source)
                    if pending:
                        flush_pending()
            if unresolved:
                resolve(unresolved)
            spool.flush()
            flush_pending()
            writer.close()  # every piece written (or the first error of the writer raised)
        finally:
            writer.abort()  # whatever happened, no write of this split is left in flight
        return ImportService._Split(records, dict(spool.rows_per_bucket), invalid, errors)

    # ---- the split in parts ---------------------------------------------------------------
    def _part_cuts(self, scan: formats.Scan) -> list[tuple[int, int]]:
        """Where an NDJSON upload is cut into parts: `(offset, line)` of each part's start
        after the first; none for an upload smaller than two parts. Parts are about equal
        in bytes, at most `split_parts` of them (more parts than workers would only
        inflate a gzip's head again for each)."""
        parts = min(self.split_parts, scan.size // max(1, self.part_min_bytes))
        if parts < 2 or not scan.cuts:
            return []
        cuts: list[tuple[int, int]] = []
        for index in range(1, parts):
            target = scan.size * index // parts
            cut = min(scan.cuts, key=lambda c: abs(c[0] - target))
            if (not cuts or cut[0] > cuts[-1][0]) and cut[0] < scan.size:
                cuts.append(cut)
        return cuts

    def _plan_parts(self, job_id: str, job_pk: int, token: str, scan: formats.Scan,
                    cuts: list[tuple[int, int]]) -> PrepareOutcome:
        """Write the parts of an NDJSON upload (still this split's: its token) and move
        the job to `split_parts`: the task layer sends one task per part."""
        buckets = chunk_count(scan.lines, self.task_rows)
        starts = [(0, 1), *cuts]
        with self.database.unit_of_work() as uow:
            job = self._job(uow.session, job_id, lock=True)
            if job.split_token != token or job.status in TERMINAL:
                log.info("import %s: split taken over at its end; this one stops", job_id)
                return PrepareOutcome(job_id, [], False)
            for index, (start, line) in enumerate(starts):
                end = starts[index + 1][0] if index + 1 < len(starts) else scan.size
                uow.session.add(ImportSplitPart(
                    job_pk=job_pk, part=index, start_byte=start, end_byte=end,
                    first_line=line, buckets=buckets, clean=scan.clean, status="pending",
                    attempts=0, staged_rows=0, records=0, invalid=0))
            job.format, job.encoding = ImportFormat.NDJSON.value, scan.encoding
            job.phase = "split_parts"
            uow.session.flush()
            part_pks = self._pending_parts(uow.session, job_pk)
            uow.commit()
        log.info("import %s: split in %d parts", job_id, len(part_pks))
        return PrepareOutcome(job_id, [], False, part_pks=part_pks)

    def split_part(self, job_id: str, part_pk: int) -> PrepareOutcome:
        """Split one part: stage its rows for the job's chunks (by the same slot hash as
        every part) and mark it done with its counts. A part done already, or of a job
        that ended, is left; a part another run is splitting right now is left to it
        (`retry_in`: look again once its lease could have run out); a quiet one is
        taken over, and what it staged is deleted first. A part gone (its job ended and
        its staged data with it) is nothing to do."""
        with self.database.unit_of_work() as uow:
            part = uow.session.get(ImportSplitPart, part_pk, with_for_update=True)
            if part is None:
                return PrepareOutcome(job_id, [], False)
            job = uow.session.get(ImportJob, part.job_pk)
            assert job is not None
            if part.status != "pending" or job.status in TERMINAL:
                return PrepareOutcome(job_id, [], False)
            now = utcnow()
            if part.token is not None and part.heartbeat_at is not None:
                quiet = (now - part.heartbeat_at).total_seconds()
                if quiet < self.split_lease:
                    return PrepareOutcome(job_id, [], False,
                                          retry_in=self.split_lease - quiet)
                log.warning("import %s: split part %d quiet for %.0f s; taking it over",
                            job_id, part.part, quiet)
            part.attempts += 1
            if part.attempts > MAX_CHUNK_ATTEMPTS:
                uow.commit()
                self._fail(job_id, f"the upload could not be split: part {part.part} gave "
                                   f"up after {MAX_CHUNK_ATTEMPTS} attempts")
                return PrepareOutcome(job_id, [], False)
            token = new_id("spl")
            part.token, part.heartbeat_at, part.staged_rows = token, now, 0
            low = part.part << PART_SEQ_SHIFT
            uow.session.execute(delete(ImportChunkPart).where(  # an earlier run's pieces
                ImportChunkPart.job_pk == part.job_pk, ImportChunkPart.seq >= low,
                ImportChunkPart.seq < low + (1 << PART_SEQ_SHIFT)))
            uow.commit()
            job_pk, upload_parts, batch = job.id, job.upload_parts, job.batch_size
            encoding, start, end = job.encoding or "utf-8", part.start_byte, part.end_byte
            first_line, buckets, clean = part.first_line, part.buckets, part.clean
        fence = PartFence(self.database, part_pk, token)
        expanded = self.settings.max_upload_expanded_bytes

        def opener() -> IO[bytes]:
            return UploadReader(self.database, job_pk, upload_parts,  # type: ignore[return-value]
                                on_piece=fence.beat)

        try:
            outcome = self._split(
                job_pk, lambda: formats.open_text_range(opener, encoding, start, end, expanded),
                ImportFormat.NDJSON, buckets, batch, clean=clean, fence=fence,
                first_line=first_line, seq_base=low)
            with self.database.unit_of_work() as uow:
                fence.write(uow.session)
                uow.session.execute(update(ImportSplitPart).where(
                    ImportSplitPart.id == part_pk).values(
                    status="done", records=outcome.records, invalid=outcome.invalid,
                    errors=outcome.errors,
                    rows_per_bucket=sorted([b, n] for b, n in outcome.rows_per_bucket.items())))
                uow.commit()
        except SplitTakenOver:
            log.info("import %s: split part %s taken over or ended; this run stops", job_id,
                     part_pk)
        except UnreadableUpload as exc:
            self._fail(job_id, str(exc), part_token=(part_pk, token))
        except (UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
            self._fail(job_id, f"the upload cannot be read: {exc}", part_token=(part_pk, token))
        except (OperationalError, ServiceUnavailable):
            raise  # the database or Redis is away: the task retries, the part starts again
        except Exception as exc:  # anything else would leave the job 'running' for good
            log.exception("import %s: split part %s failed", job_id, part_pk)
            self._fail(job_id, f"the upload could not be read: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", part_token=(part_pk, token))
        return PrepareOutcome(job_id, [], False)

    def parts_left(self, job_id: str) -> int:
        """Split parts still pending (every part task asks after its own commit)."""
        with self.database.read() as db:
            job = self._job(db, job_id)
            return db.execute(select(func.count()).select_from(ImportSplitPart).where(
                ImportSplitPart.job_pk == job.id, ImportSplitPart.status == "pending")
            ).scalar_one()

    def merge_parts(self, job_id: str) -> PrepareOutcome:
        """Once every part is done, make the job's chunks from what the parts staged and
        move it to its chunks, once: under the job's row lock, only a job still in
        `split_parts` with no part pending is merged (a second caller finds it merged and
        answers no chunk)."""
        with self.database.unit_of_work() as uow:
            job = self._job(uow.session, job_id, lock=True)
            if job.status in TERMINAL or job.phase != "split_parts":
                return PrepareOutcome(job_id, [], False)
            parts = list(uow.session.execute(select(ImportSplitPart).where(
                ImportSplitPart.job_pk == job.id).order_by(ImportSplitPart.part)).scalars())
            if not parts or any(p.status != "done" for p in parts):
                return PrepareOutcome(job_id, [], False)
            rows_per_bucket: dict[int, int] = {}
            for p in parts:
                for bucket, rows in p.rows_per_bucket or []:
                    rows_per_bucket[bucket] = rows_per_bucket.get(bucket, 0) + rows
            errors = heapq.nsmallest(MAX_ERRORS, (e for p in parts for e in p.errors or []),
                                     key=lambda e: (e["line"], e["error"]))
            self._add_chunks(uow.session, job.id, rows_per_bucket)
            job.total_rows = sum(p.records for p in parts)
            job.staged_rows = sum(rows_per_bucket.values())
            job.chunk_count = len(rows_per_bucket)
            job.prepare_invalid = sum(p.invalid for p in parts)
            job.prepare_errors = errors
            job.phase = "chunks"
            uow.session.flush()
            pending = self._pending_chunks(uow.session, job.id)
            uow.commit()
        return PrepareOutcome(job_id, pending, not pending)

    @staticmethod
    def _add_chunks(db: DbSession, job_pk: int, rows_per_bucket: dict[int, int]) -> None:
        for bucket, rows in sorted(rows_per_bucket.items()):
            db.add(ImportChunk(
                job_pk=job_pk, bucket=bucket, row_count=rows, status="pending", attempts=0,
                inserted=0, duplicates=0, invalid=0, sessions_created=0, sessions_updated=0,
                conflicts=0, boundaries_reviewed=0, boundaries_merged=0,
            ))

    @staticmethod
    def _pending_parts(db: DbSession, job_pk: int) -> builtins.list[int]:
        return list(db.execute(
            select(ImportSplitPart.id).where(ImportSplitPart.job_pk == job_pk,
                                             ImportSplitPart.status == "pending")
            .order_by(ImportSplitPart.part)
        ).scalars())

    # ---- one chunk --------------------------------------------------------------------------
    def process_chunk(
        self, chunk_pk: int, *, after_write: Callable[[], None] | None = None
    ) -> ImportCounts | None:
        """Validate, group and store one chunk; None if it was already done (or another
        run of it is ahead). A chunk whose valid rows fit one run is stored in one
        transaction whose commit marks it done; a bigger one (a huge slot) is stored in
        time-ordered pages (`app.imports.pages`), each committed with the chunk's
        progress, so that a retry goes on after the last page stored."""
        with self.database.unit_of_work() as uow:  # count the attempt (visible on crashes)
            db = uow.session
            chunk = db.get(ImportChunk, chunk_pk, with_for_update=True)
            if chunk is None:
                raise NotFound(f"import chunk {chunk_pk} not found")
            if chunk.status != "pending":
                return None
            job = db.get(ImportJob, chunk.job_pk)
            assert job is not None
            if job.status in TERMINAL:
                return None  # failed while this chunk waited: its staged rows are gone
            job_id, job_pk, bucket = job.job_id, chunk.job_pk, chunk.bucket
            row_count, batch = chunk.row_count, job.batch_size
            options, reviewer = self._job_grouping(job)
            # Rows are judged against the job's start, so every attempt judges alike.
            latest = (job.started_at or job.created_at) + LATEST_AHEAD
            attempt = chunk.attempts + 1  # read under the row lock: this attempt's own
            db.execute(update(ImportChunk).where(ImportChunk.id == chunk_pk)
                       .values(attempts=attempt))
            uow.commit()
        if attempt > MAX_CHUNK_ATTEMPTS:
            self.fail_chunk(chunk_pk, f"gave up after {MAX_CHUNK_ATTEMPTS} attempts (each "
                                      "died, timed out or failed before finishing)")
            return None
        limits = self.page_limits
        checked = RowErrors(MAX_ERRORS)
        runs = SortedRuns(self.database, job_pk, bucket, attempt, limits)
        msgs: list[Msg] = []
        chars = 0
        tz = self.settings.tz
        try:
            for line, fields in read_staged(self.database, job_pk, bucket, rows=row_count,
                                            group_rows=limits.read_rows):
                result = validate_row(line, fields, tz, latest=latest)
                if isinstance(result, str):
                    checked.add(line, result)
                    continue
                msgs.append(result)
                chars += len(result.content) + 160  # msg_chars, inline: every row passes
                if len(msgs) >= limits.run_rows or chars >= limits.run_chars:
                    runs.add_run(msgs)
                    msgs, chars = [], 0
            if not runs.pieces:
                return self._store_at_once(chunk_pk, job_id, msgs, checked.counts(),
                                           after_write, batch, options, reviewer)
            if msgs:
                runs.add_run(msgs)
                msgs = []
            return self._store_in_pages(chunk_pk, job_id, runs, checked.counts(),
                                        after_write, batch, options, reviewer)
        finally:
            if runs.pieces:
                try:
                    runs.discard()
                except Exception:  # the job's end deletes them anyway
                    log.warning("import chunk %s: sorted runs not deleted", chunk_pk)

    def _mark_done(self, db: DbSession, chunk_pk: int, counts: ImportCounts) -> None:
        body = counts.as_dict(MAX_ERRORS)
        body["first_error_line"] = body["errors"][0]["line"] if body["errors"] else None
        result = db.execute(
            update(ImportChunk)
            .where(ImportChunk.id == chunk_pk, ImportChunk.status == "pending")
            .values(status="done", done_at=utcnow(), **body)
        )
        if affected_rows(result) != 1:
            raise AlreadyApplied(f"chunk {chunk_pk} was committed by another run")

    def _store_at_once(self, chunk_pk: int, job_id: str, msgs: list[Msg],
                       checked: ImportCounts, after_write: Callable[[], None] | None,
                       batch: int, options: GroupingOptions,
                       reviewer: BoundaryReviewer | None) -> ImportCounts | None:
        """The usual chunk: one transaction, whose commit also marks the chunk done."""
        context = BatchContext(
            job_id=job_id, chunk_pk=chunk_pk, segmenter=self.segmenter, batch_rows=batch,
            options=options, reviewer=reviewer,
            before_commit=lambda db, counts: self._mark_done(db, chunk_pk,
                                                             combined(checked, counts)),
            after_write=after_write,
            live_marks=lambda db: self._slot_marks(db, chunk_pk),
            mark_slot=lambda db, slot, counts: self._mark_slot(db, chunk_pk, slot, counts),
        )
        try:
            counts = import_messages(self.runtime, msgs, actor=ACTOR, context=context)
        except AlreadyApplied:
            return None
        counts.add(checked)
        return counts

    def _store_in_pages(self, chunk_pk: int, job_id: str, runs: SortedRuns,
                        checked: ImportCounts, after_write: Callable[[], None] | None,
                        batch: int, options: GroupingOptions,
                        reviewer: BoundaryReviewer | None) -> ImportCounts | None:
        """A chunk too big for one transaction: one page (one slot's rows, cut where its
        conversation pauses) per transaction, each committed with the chunk's progress
        mark — the pages stored, their counts, the last row stored — which is advanced
        only from the value this run read (another run ahead of it stops this one)."""
        progress = self._progress(chunk_pk)
        totals = progress.counts
        gap = options.gap
        stream: Iterator[Msg] = runs.merged()
        if progress.cursor is not None:
            cursor = progress.cursor
            stream = (m for m in stream if sort_key(m) > cursor)
        try:
            for page in slot_pages(stream, gap, self.page_limits):
                commit = _PageCommit(self, progress, totals, page)
                context = BatchContext(
                    job_id=job_id, chunk_pk=chunk_pk, segmenter=self.segmenter,
                    options=options, reviewer=reviewer,
                    batch_rows=batch, before_commit=commit.in_bulk, after_write=after_write,
                    live_marks=commit.already_stored, mark_slot=commit.in_slot,
                )
                counts = import_messages(self.runtime, page, actor=ACTOR, context=context)
                counts.errors = []
                totals = combined(totals, counts)
                progress.pages += 1
                progress.cursor = commit.last
            final = combined(totals, checked)
            with self.database.unit_of_work() as uow:
                self._mark_done(uow.session, chunk_pk, final)
                uow.commit()
        except AlreadyApplied:
            return None
        return final

    # The chunk's progress through its pages: a mark with no slot (account_id "") whose
    # shop_id counts the pages stored, so that advancing it is a conditional update.
    @dataclass
    class _Progress:
        pk: int
        pages: int
        counts: ImportCounts
        cursor: SortKey | None

    def _progress(self, chunk_pk: int) -> ImportService._Progress:
        def read() -> ImportService._Progress | None:
            with self.database.read() as db:
                mark = db.execute(select(ImportSlotMark).where(
                    ImportSlotMark.chunk_pk == chunk_pk, ImportSlotMark.account_id == ""
                )).scalar_one_or_none()
                if mark is None:
                    return None
                cursor = mark.counts.get("cursor")
                return ImportService._Progress(
                    pk=mark.id, pages=int(mark.shop_id),
                    counts=ImportCounts.from_dict(mark.counts),
                    cursor=(cursor[0], cursor[1], datetime.fromisoformat(cursor[2]),
                            int(cursor[3])) if cursor else None)

        found = read()
        if found is None:
            try:
                with self.database.unit_of_work() as uow:
                    uow.session.add(ImportSlotMark(chunk_pk=chunk_pk, account_id="",
                                                   shop_id="0",
                                                   counts=ImportCounts().as_dict(0)))
                    uow.commit()
            except IntegrityError:  # another run made it first
                pass
            found = read()
        assert found is not None
        return found

    @staticmethod
    def _progress_moved(db: DbSession, progress: ImportService._Progress) -> bool:
        pages = db.execute(select(ImportSlotMark.shop_id).where(
            ImportSlotMark.id == progress.pk)).scalar_one()
        return pages != str(progress.pages)

    @staticmethod
    def _advance(db: DbSession, progress: ImportService._Progress, totals: ImportCounts,
                 last: SortKey) -> None:
        body = totals.as_dict(0)
        body["cursor"] = [last[0], last[1], last[2].isoformat(), last[3]]
        result = db.execute(
            update(ImportSlotMark)
            .where(ImportSlotMark.id == progress.pk,
                   ImportSlotMark.shop_id == str(progress.pages))
            .values(shop_id=str(progress.pages + 1), counts=body)
        )
        if affected_rows(result) != 1:
            raise AlreadyApplied("another run of the chunk stored this page")

    @staticmethod
    def _slot_marks(db: DbSession, chunk_pk: int) -> dict[Slot, ImportCounts]:
        return {
            (m.account_id, m.shop_id): ImportCounts.from_dict(m.counts)
            for m in db.execute(
                select(ImportSlotMark).where(ImportSlotMark.chunk_pk == chunk_pk)
            ).scalars()
        }

    @staticmethod
    def _mark_slot(db: DbSession, chunk_pk: int, slot: Slot, counts: ImportCounts) -> None:
        db.add(ImportSlotMark(chunk_pk=chunk_pk, account_id=slot[0], shop_id=slot[1],
                              counts=counts.as_dict(MAX_ERRORS)))
        db.flush()

    def fail_chunk(self, chunk_pk: int, detail: str) -> None:
        """A chunk that cannot be applied (after its retries): its rows count as invalid,
        with one error naming the chunk, and the job goes on with the other chunks. Slots
        of it already applied through the slot lock (live segments, each committed with
        its mark) keep their counts: those rows are stored."""
        with self.database.unit_of_work() as uow:
            chunk = uow.session.get(ImportChunk, chunk_pk, with_for_update=True)
            if chunk is None or chunk.status != "pending":
                return
            lines = self._chunk_first_line(uow.session, chunk)
            applied = ImportCounts()
            for counts in self._slot_marks(uow.session, chunk_pk).values():
                applied.add(counts)
            for name in ImportCounts.COUNTERS:
                setattr(chunk, name, getattr(applied, name))
            chunk.status = "failed"
            chunk.invalid = chunk.row_count - applied.inserted - applied.duplicates
            chunk.first_error_line = lines
            chunk.errors = [{"line": lines, "error": f"chunk of {chunk.row_count} rows "
                                                     f"failed: {detail}"[:500]}]
            chunk.detail = detail[:2000]
            chunk.done_at = utcnow()
            uow.commit()

    @staticmethod
    def _chunk_first_line(db: DbSession, chunk: ImportChunk) -> int:
        payload = db.execute(
            select(ImportChunkPart.payload).where(
                ImportChunkPart.job_pk == chunk.job_pk, ImportChunkPart.bucket == chunk.bucket,
                ImportChunkPart.seq < RUN_SEQ_BASE)
            .order_by(ImportChunkPart.seq).limit(1)
        ).scalar_one_or_none()
        if payload is None:
            return 0
        return min((line for line, _ in formats.unpack_rows(payload)), default=0)

    def chunks_left(self, job_id: str) -> int:
        """Chunks still pending (every chunk task asks: a count, not the list)."""
        with self.database.read() as db:
            job = self._job(db, job_id)
            return db.execute(select(func.count()).select_from(ImportChunk).where(
                ImportChunk.job_pk == job.id, ImportChunk.status == "pending")).scalar_one()

    # ---- close ----------------------------------------------------------------------------
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
            job = self._job(db, job_id)
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
            self._delete_staged(db, job.id)
            uow.after_commit(self.runtime.hooks.events_written)
            uow.commit()
            view = self._view(db, job)
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
        record_event(db, type="import.finished", at=job.finished_at or utcnow(),
                     audience=Audience.ADMIN, data={
                         "job_id": job.job_id, "status": job.status,
                         "total_rows": job.total_rows, "inserted": job.inserted,
                         "duplicates": job.duplicates, "invalid": job.invalid,
                         "sessions_created": job.sessions_created,
                         "sessions_updated": job.sessions_updated, "conflicts": job.conflicts,
                     })

    def fail_job(self, job_id: str, detail: str) -> None:
        """Close a job that cannot go on as failed (the task layer's last resort: a split
        or a close that keeps failing), so that no job stays 'running' for good."""
        self._fail(job_id, detail)

    def _fail(self, job_id: str, detail: str, *, encoding: str | None = None,
              split_token: str | None = None,
              part_token: tuple[int, str] | None = None) -> None:
        """Close the job as failed (unless it is closed, or, for a split that failed,
        someone else's split by now). Its staged data is deleted (the upload and the
        staged rows: README, "the upload is deleted when the job ends"); chunks still
        pending are failed too, and a split still running is fenced off."""
        with self.database.unit_of_work() as uow:
            job = self._job(uow.session, job_id, lock=True)
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
            self._delete_staged(uow.session, job.id)
            uow.after_commit(self.runtime.hooks.events_written)
            uow.commit()

    @staticmethod
    def _delete_staged(db: DbSession, job_pk: int) -> None:
        delete_staged(db, job_pk)

    # ---- reads ----------------------------------------------------------------------------
    def get(self, job_id: str) -> ImportJobView:
        with self.database.read() as db:
            return self._view(db, self._job(db, job_id))

    def list(self, *, limit: int = 50, before: str | None = None,
             status: str | None = None) -> list[ImportJobView]:
        """Newest first; `before` is a job_id to continue after."""
        with self.database.read() as db:
            stmt = select(ImportJob).order_by(ImportJob.id.desc()).limit(limit)
            if before:
                anchor = self._job(db, before)
                stmt = stmt.where(ImportJob.id < anchor.id)
            if status:
                stmt = stmt.where(ImportJob.status == status.lower())
            return [self._view(db, job) for job in db.execute(stmt).scalars()]

    def unfinished(self) -> builtins.list[str]:
        """Jobs not closed yet (for recovery after a worker died)."""
        with self.database.read() as db:
            return list(db.execute(
                select(ImportJob.job_id).where(ImportJob.status.in_(
                    [JobStatus.QUEUED, JobStatus.RUNNING])).order_by(ImportJob.id)
            ).scalars())

    def _view(self, db: DbSession, job: ImportJob) -> ImportJobView:
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

    @staticmethod
    def _job(db: DbSession, job_id: str, *, lock: bool = False) -> ImportJob:
        stmt = select(ImportJob).where(ImportJob.job_id == job_id)
        if lock:
            stmt = stmt.with_for_update()
        job = db.execute(stmt).scalar_one_or_none()
        if job is None:
            raise NotFound(f"import job {job_id} not found")
        return job

    @staticmethod
    def _pending_chunks(db: DbSession, job_pk: int) -> builtins.list[int]:
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


def combined(*parts: ImportCounts) -> ImportCounts:
    total = ImportCounts()
    for part in parts:
        total.add(part)
    return total


class _PageCommit:
    """How one page of a paged chunk commits: with the chunk's progress mark advanced
    in the same transaction — the bulk one, or the slot transaction when the page's slot
    has anything live (then the bulk transaction that follows has nothing to add)."""

    def __init__(self, service: ImportService, progress: ImportService._Progress,
                 totals: ImportCounts, page: list[Msg]) -> None:
        self.service = service
        self.progress = progress
        self.totals = totals
        self.slot = (page[0].account_id, page[0].shop_id)
        self.last = sort_key(page[-1])
        self.stored_by_slot = False

    def in_bulk(self, db: DbSession, counts: ImportCounts) -> None:
        if not self.stored_by_slot:
            self.service._advance(db, self.progress, combined(self.totals, counts), self.last)

    def in_slot(self, db: DbSession, _slot: Slot, counts: ImportCounts) -> None:
        self.service._advance(db, self.progress, combined(self.totals, counts), self.last)
        self.stored_by_slot = True  # holds once run_on_slot returns (it commits last)

    def already_stored(self, db: DbSession) -> dict[Slot, ImportCounts]:
        """Another run stored this page (it advanced the mark): nothing to do here; the
        commit that follows then fails the advance and this run stops."""
        if self.service._progress_moved(db, self.progress):
            return {self.slot: ImportCounts()}
        return {}


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
            f"unknown {name} {value!r}", [{"field": name, "error": f"use one of {allowed}"}])
    return text
