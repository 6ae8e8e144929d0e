"""One chunk of an import job (SPEC §4): its staged rows validated, de-duplicated,
grouped and stored (`app.imports.batch.import_messages`) in one transaction whose commit
also marks the chunk done, so a retry is harmless; a chunk too big for memory is stored
in time-ordered pages (`app.imports.pages`), each committed with the chunk's progress.
A chunk that keeps dying fails after MAX_CHUNK_ATTEMPTS, its rows counted as invalid."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session as DbSession

from app.db import Database, affected_rows, utcnow
from app.errors import NotFound
from app.imports.batch import ACTOR, BatchContext, import_messages
from app.imports.chunking import unpack_rows
from app.imports.counts import ImportCounts, combined
from app.imports.lifecycle import MAX_CHUNK_ATTEMPTS, MAX_ERRORS, TERMINAL, find_job
from app.imports.models import ImportChunk, ImportChunkPart, ImportJob, ImportSlotMark
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
from app.imports.rows import Msg, Slot, validate_row
from app.imports.segmenting import Grouping, GroupingOptions, Segmenter, split_at_gaps
from app.validation import LATEST_AHEAD

log = logging.getLogger(__name__)


class AlreadyApplied(Exception):
    """The chunk's 'done' marker was committed by another run."""



class ChunkProcessor:
    """Stores chunks; each run of a chunk safe to repeat."""

    def __init__(self, runtime: Any, *, segmenter: Segmenter = split_at_gaps,
                 page_limits: PageLimits | None = None) -> None:
        self.runtime = runtime
        self.database: Database = runtime.database
        self.settings = runtime.settings
        self.segmenter = segmenter
        self.page_limits = page_limits or PageLimits()

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
                       .values(attempts=attempt, started_at=utcnow()))
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

    def _progress(self, chunk_pk: int) -> ChunkProcessor._Progress:
        def read() -> ChunkProcessor._Progress | None:
            with self.database.read() as db:
                mark = db.execute(select(ImportSlotMark).where(
                    ImportSlotMark.chunk_pk == chunk_pk, ImportSlotMark.account_id == ""
                )).scalar_one_or_none()
                if mark is None:
                    return None
                cursor = mark.counts.get("cursor")
                return ChunkProcessor._Progress(
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
    def _progress_moved(db: DbSession, progress: ChunkProcessor._Progress) -> bool:
        pages = db.execute(select(ImportSlotMark.shop_id).where(
            ImportSlotMark.id == progress.pk)).scalar_one()
        return pages != str(progress.pages)

    @staticmethod
    def _advance(db: DbSession, progress: ChunkProcessor._Progress, totals: ImportCounts,
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
        return min((line for line, _ in unpack_rows(payload)), default=0)

    def chunks_left(self, job_id: str) -> int:
        """Chunks still pending (every chunk task asks: a count, not the list)."""
        with self.database.read() as db:
            job = find_job(db, job_id)
            return db.execute(select(func.count()).select_from(ImportChunk).where(
                ImportChunk.job_pk == job.id, ImportChunk.status == "pending")).scalar_one()


class _PageCommit:
    """How one page of a paged chunk commits: with the chunk's progress mark advanced
    in the same transaction — the bulk one, or the slot transaction when the page's slot
    has anything live (then the bulk transaction that follows has nothing to add)."""

    def __init__(self, service: ChunkProcessor, progress: ChunkProcessor._Progress,
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

