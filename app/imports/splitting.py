"""Splitting a staged upload into chunks (SPEC §4): one pass over the upload routes
every record to its slot's chunk (`app.imports.chunking`) and stages it, fenced by the
job's split token; a big NDJSON upload is cut at line starts into parts, each split by a
task of its own into the same chunks, and `merge_parts` makes the chunks once every
part is done. A split that shows no sign of life for SPLIT_LEASE is taken over."""

from __future__ import annotations

import builtins
import heapq
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session as DbSession

from app.db import Database, utcnow
from app.errors import ServiceUnavailable
from app.fastsql import core_insert
from app.ids import new_id
from app.imports import decoding, formats
from app.imports.chunking import (
    TASK_ROWS,
    ChunkSpool,
    StagedRow,
    chunk_count,
    pack_staged,
    slot_of,
)
from app.imports.decoding import UnreadableUpload
from app.imports.dedup import resolve_session_slots
from app.imports.formats import ImportFormat
from app.imports.lifecycle import (
    MAX_CHUNK_ATTEMPTS,
    MAX_ERRORS,
    TERMINAL,
    JobLifecycle,
    JobStatus,
    find_job,
    pending_chunks,
)
from app.imports.models import ImportChunk, ImportChunkPart, ImportJob, ImportSplitPart
from app.imports.pages import RUN_SEQ_BASE
from app.imports.staging import (
    Fence,
    PartFence,
    SplitFence,
    SplitTakenOver,
    StagingWriter,
)
from app.imports.upload import UploadReader
from app.observability.metrics import record_split_refused

log = logging.getLogger(__name__)

# A split that shows no sign of life (a staged batch, a piece of the upload read) for
# this long may be taken over by another run of prepare; until then, prepare leaves it
# alone and looks again later. Taking over a live split is safe, only wasteful: the
# old splitter's next write is refused by the job's split token.
SPLIT_LEASE = 60.0
# An NDJSON upload of at least two of these (decompressed) is split in parts, one task
# each, so that every worker splits (`Splitter.split_part`); a smaller one, and CSV
# or a JSON array (whose records may span lines), is split by one run of prepare.
PART_MIN_BYTES = 8 << 20
# Parts are cut at line starts found by the upload's scan every this many bytes (or an
# eighth of the smallest part, if less), so parts come out about equal.
CUT_EVERY = 1 << 20
# Staged pieces of part `p` are numbered from p << PART_SEQ_SHIFT (below RUN_SEQ_BASE).
PART_SEQ_SHIFT = 20
MAX_PARTS = RUN_SEQ_BASE >> PART_SEQ_SHIFT


@dataclass
class PrepareOutcome:
    job_id: str
    chunk_pks: list[int]
    ready_to_finish: bool
    retry_in: float | None = None  # another run is splitting: look again after this long
    part_pks: list[int] = field(default_factory=list)  # split parts to send, one task each


class Splitter:
    """Splits staged uploads into chunks; each step safe to run twice."""

    def __init__(self, runtime: Any, jobs: JobLifecycle, *, split_lease: float = SPLIT_LEASE,
                 task_rows: int = TASK_ROWS, split_parts: int = 1,
                 part_min_bytes: int = PART_MIN_BYTES) -> None:
        self.runtime = runtime
        self.database: Database = runtime.database
        self.settings = runtime.settings
        self.jobs = jobs
        self.split_lease = split_lease
        self.task_rows = task_rows  # rows one chunk task takes (about)
        # At most this many parts a split (the task layer passes the worker's cores)
        self.split_parts = max(1, min(split_parts, MAX_PARTS))
        self.part_min_bytes = part_min_bytes

    def prepare(self, job_id: str) -> PrepareOutcome:
        """Split the staged upload into chunks. On a job already split, answer its
        pending chunks (so a lost dispatch is recovered by running this again). On a job
        another run is splitting right now, do nothing and say when to look again."""
        with self.database.unit_of_work() as uow:
            job = find_job(uow.session, job_id, lock=True)
            if job.status in TERMINAL:
                return PrepareOutcome(job_id, [], False)
            if job.phase in ("chunks", "finishing"):
                pending = pending_chunks(uow.session, job.id)
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
            scan = decoding.scan_upload(opener, encoding, max_bytes=expanded,
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
                with decoding.open_text(opener, encoding, expanded) as text:
                    rows_hint = formats.count_records(text, fmt)
            used_encoding = encoding
            outcome = self._split(
                job_pk, lambda: decoding.open_text(opener, used_encoding, expanded), fmt,
                chunk_count(rows_hint, self.task_rows), batch, clean=scan.clean, fence=fence)
        except SplitTakenOver:
            log.info("import %s: split taken over by another run; this one stops", job_id)
            return PrepareOutcome(job_id, [], False)
        except UnreadableUpload as exc:  # DecompressedTooLarge (a gzip bomb) among them
            self.jobs.fail(job_id, str(exc), encoding=encoding, split_token=token)
            return PrepareOutcome(job_id, [], False)
        except (UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:  # a broken gzip
            self.jobs.fail(job_id, f"the upload cannot be read: {exc}", encoding=encoding,
                       split_token=token)
            return PrepareOutcome(job_id, [], False)
        except (OperationalError, ServiceUnavailable):
            raise  # the database or Redis is away: the task retries, the split resumes
        except Exception as exc:  # anything else would leave the job 'running' for good
            log.exception("import %s: the split failed", job_id)
            self.jobs.fail(job_id, f"the upload could not be read: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", encoding=encoding, split_token=token)
            return PrepareOutcome(job_id, [], False)
        with self.database.unit_of_work() as uow:
            job = find_job(uow.session, job_id, lock=True)
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
            pending = pending_chunks(uow.session, job_pk)
            uow.after_commit(lambda: record_split_refused(outcome.invalid))
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
               seq_base: int = 0) -> Splitter._Split:
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
                     "payload": pack_staged(rows)}
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
        return Splitter._Split(records, dict(spool.rows_per_bucket), invalid, errors)

    # ---- the split in parts ---------------------------------------------------------------
    def _part_cuts(self, scan: decoding.Scan) -> list[tuple[int, int]]:
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

    def _plan_parts(self, job_id: str, job_pk: int, token: str, scan: decoding.Scan,
                    cuts: list[tuple[int, int]]) -> PrepareOutcome:
        """Write the parts of an NDJSON upload (still this split's: its token) and move
        the job to `split_parts`: the task layer sends one task per part."""
        buckets = chunk_count(scan.lines, self.task_rows)
        starts = [(0, 1), *cuts]
        with self.database.unit_of_work() as uow:
            job = find_job(uow.session, job_id, lock=True)
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
                self.jobs.fail(job_id, f"the upload could not be split: part {part.part} gave "
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
                job_pk, lambda: decoding.open_text_range(opener, encoding, start, end, expanded),
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
            self.jobs.fail(job_id, str(exc), part_token=(part_pk, token))
        except (UnicodeDecodeError, OSError, EOFError, zlib.error) as exc:
            self.jobs.fail(job_id, f"the upload cannot be read: {exc}", part_token=(part_pk, token))
        except (OperationalError, ServiceUnavailable):
            raise  # the database or Redis is away: the task retries, the part starts again
        except Exception as exc:  # anything else would leave the job 'running' for good
            log.exception("import %s: split part %s failed", job_id, part_pk)
            self.jobs.fail(job_id, f"the upload could not be read: {type(exc).__name__}: "
                               f"{str(exc)[:300]}", part_token=(part_pk, token))
        return PrepareOutcome(job_id, [], False)

    def parts_left(self, job_id: str) -> int:
        """Split parts still pending (every part task asks after its own commit)."""
        with self.database.read() as db:
            job = find_job(db, job_id)
            return db.execute(select(func.count()).select_from(ImportSplitPart).where(
                ImportSplitPart.job_pk == job.id, ImportSplitPart.status == "pending")
            ).scalar_one()

    def merge_parts(self, job_id: str) -> PrepareOutcome:
        """Once every part is done, make the job's chunks from what the parts staged and
        move it to its chunks, once: under the job's row lock, only a job still in
        `split_parts` with no part pending is merged (a second caller finds it merged and
        answers no chunk)."""
        with self.database.unit_of_work() as uow:
            job = find_job(uow.session, job_id, lock=True)
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
            refused = job.prepare_invalid = sum(p.invalid for p in parts)
            job.prepare_errors = errors
            job.phase = "chunks"
            uow.session.flush()
            pending = pending_chunks(uow.session, job.id)
            uow.after_commit(lambda: record_split_refused(refused))
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
