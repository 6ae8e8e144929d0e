"""What a job reports while it runs and after a chunk fails: the first row errors come
from the chunks whose errors come first, and a failed chunk's live slots, already
stored through the slot lock, are counted as stored, not as invalid."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from app.db import utcnow
from app.imports.jobs import import_job_errors
from app.imports.lifecycle import MAX_ERRORS
from app.imports.models import ImportChunk
from app.imports.service import ImportService
from tests.imports.helpers import as_ndjson, conversation, message_count, row

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def test_the_first_errors_of_a_running_job_are_its_lowest_lines(runtime):
    rows = []
    for i in range(400):  # 400 slots, one bad row each, spread over ~250 chunks
        rows += conversation(f"shop-{i}", T0 + timedelta(minutes=i), "cr")
        rows.append(row(f"shop-{i}", "robot", T0, "no time", sent_at="yesterday-ish"))
    service = ImportService(runtime, task_rows=4)
    job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
    outcome = service.prepare(job.job_id)
    assert len(outcome.chunk_pks) > MAX_ERRORS
    for pk in outcome.chunk_pks[:-1]:  # all but one chunk: the job is still running
        service.process_chunk(pk)
    view = service.get(job.job_id)
    assert view.status == "running" and view.invalid >= MAX_ERRORS
    with runtime.database.read() as db:
        every_error = import_job_errors(db, job.job_id, limit=10_000)["items"]
        with_errors = db.execute(select(ImportChunk.first_error_line)
                                 .where(ImportChunk.invalid > 0)).scalars().all()
    # more chunks have errors than a status read loads: the ordering must pick the right ones
    assert len(with_errors) > MAX_ERRORS and None not in with_errors
    expected = [(e["line"], e["error"]) for e in every_error[:MAX_ERRORS]]
    assert [(e.line, e.error) for e in view.errors] == expected
    assert len(view.errors) == MAX_ERRORS


def test_a_failed_chunk_counts_its_live_slots_as_stored(runtime):
    """The live slot of a chunk commits in its own slot transaction (with its mark); the
    chunk's bulk transaction then dies. The job must count what is stored, exactly."""
    now = utcnow()
    live = conversation("live-shop", now - timedelta(minutes=5), "crc",
                        step=timedelta(seconds=30))
    past = conversation("old-shop", now - timedelta(days=3), "crcrh")
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(as_ndjson(live + past)), filename="x.ndjson")
    outcome = service.prepare(job.job_id)
    assert len(outcome.chunk_pks) == 1  # 8 rows: one chunk holds both slots

    def die_before_commit() -> None:
        raise RuntimeError("worker lost its database connection")

    with pytest.raises(RuntimeError):
        service.process_chunk(outcome.chunk_pks[0], after_write=die_before_commit)
    assert message_count(runtime) == len(live)  # the live slot is stored, the rest is not
    service.fail_chunk(outcome.chunk_pks[0], "RuntimeError: worker lost its connection")
    view = service.finish(job.job_id)
    assert view.status == "partially_succeeded"
    assert (view.inserted, view.invalid, view.sessions_created) == (len(live), len(past), 1)
    assert view.processed == len(live) + len(past)
    assert view.errors[0].error.startswith("chunk of 8 rows failed")


def test_status_reads_follow_every_chunk_that_ends_while_they_reuse_errors(runtime):
    """Status reads of a running job reuse the first errors they found while no chunk
    ended since; each chunk that ends shows at the next read."""
    rows = []
    for i in range(30):  # 30 slots, one bad row each (its line), a few chunks
        rows += conversation(f"shop-{i}", T0 + timedelta(minutes=i), "cr")
        rows.append(row(f"shop-{i}", "robot", T0, "no time", sent_at="yesterday-ish"))
    service = ImportService(runtime, task_rows=20)
    job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
    chunks = service.prepare(job.job_id).chunk_pks
    assert len(chunks) > 2
    seen = []
    for pk in chunks[:-1]:
        service.process_chunk(pk)
        first, again = service.get(job.job_id), service.get(job.job_id)
        assert first.errors == again.errors and first.invalid == again.invalid
        seen.append([e.line for e in first.errors])
    with runtime.database.read() as db:
        every_error = import_job_errors(db, job.job_id, limit=10_000)["items"]
    assert seen[-1] == [e["line"] for e in every_error]
    assert [len(lines) for lines in seen] == sorted({len(lines) for lines in seen})
    assert len(seen[-1]) == service.get(job.job_id).invalid < 30  # one chunk still to go
