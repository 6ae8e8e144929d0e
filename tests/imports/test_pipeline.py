"""The job pipeline: chunks keep slots whole, bad rows sit next to good ones, a chunk
that dies before its commit is retried without loss or duplication."""

from __future__ import annotations

import io
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import event, func, select

from app.imports import chunking
from app.imports.chunking import TASK_ROWS
from app.imports.models import ImportChunk, ImportChunkPart, ImportUploadPart
from app.imports.service import ImportService
from app.messages.models import Message
from tests.imports.helpers import as_csv, as_ndjson, conversation, message_count, run_job

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=2)


def many_slots(n: int, roles: str = "crcrh") -> list[dict]:
    rows = []
    for i in range(n):
        rows += conversation(f"shop-{i}", T0 + timedelta(minutes=i), roles)
    # interleave slots, as exports sorted by time do
    return sorted(rows, key=lambda r: (r["sent_at"], r["shop_id"]))


def test_chunks_are_about_task_rows_and_hold_every_row_of_a_slot(runtime):
    rows = many_slots(40)
    service = ImportService(runtime, task_rows=20)
    with freeze_time(LATER):
        job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
        outcome = service.prepare(job.job_id)
        with runtime.database.read() as db:
            chunks = db.execute(select(ImportChunk)).scalars().all()
            slot_chunks = defaultdict(set)
            for chunk in chunks:
                for payload in db.execute(select(ImportChunkPart.payload).where(
                        ImportChunkPart.bucket == chunk.bucket)).scalars():
                    for _line, fields in chunking.unpack_rows(payload):
                        slot_chunks[fields["shop_id"]].add(chunk.bucket)
        assert len(outcome.chunk_pks) == len(chunks) >= 6  # 200 rows / 20, minus empty buckets
        assert sum(c.row_count for c in chunks) == 200
        assert all(len(b) == 1 for b in slot_chunks.values())
        for pk in outcome.chunk_pks:
            service.process_chunk(pk)
        view = service.finish(job.job_id)
    assert (view.status, view.inserted, view.sessions_created, view.chunks_done) == (
        "succeeded", 200, 40, len(chunks))
    with runtime.database.read() as db:  # the staged upload is cleaned away
        assert db.execute(select(func.count()).select_from(ImportChunkPart)).scalar() == 0
        assert db.execute(select(func.count()).select_from(ImportUploadPart)).scalar() == 0


def test_rows_per_task_are_not_batch_size_which_bounds_each_insert(runtime):
    """At the default, a task takes thousands of rows (TASK_ROWS), and BATCH_SIZE — the
    seed's 批处理大小 — bounds one database batch: no INSERT of the chunk holds more."""
    assert runtime.settings.batch_size == 100  # the shipped default
    runtime.settings.batch_size = 7
    rows = many_slots(60, "crcrh")  # 300 rows, 60 sessions, 60 audit rows
    service = ImportService(runtime)
    assert service.task_rows == TASK_ROWS >= 10 * 100
    inserts: dict[str, list[int]] = defaultdict(list)

    def count(_conn, _cursor, statement, parameters, _context, executemany):  # noqa: ANN001
        table = statement.split()[2].strip("`\"") if statement.startswith("INSERT") else None
        if table in ("messages", "sessions", "session_operations", "session_transfers"):
            # executemany, or one multi-row INSERT written out (MariaDB)
            inserts[table].append(len(parameters) if executemany
                                  else statement.count("),(") + 1)

    with freeze_time(LATER):
        job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
        pks = service.prepare(job.job_id).chunk_pks
        assert len(pks) == 1  # 300 rows: one task
        event.listen(runtime.database.engine, "before_cursor_execute", count)
        try:
            service.process_chunk(pks[0])
        finally:
            event.remove(runtime.database.engine, "before_cursor_execute", count)
        view = service.finish(job.job_id)
    assert (view.status, view.inserted, view.sessions_created) == ("succeeded", 300, 60)
    assert sum(inserts["messages"]) == 300 and sum(inserts["sessions"]) == 60
    assert sum(inserts["session_operations"]) == 60
    assert max(n for sizes in inserts.values() for n in sizes) == 7
    assert len(inserts["messages"]) == 43  # ceil(300 / 7)


def test_bad_rows_are_reported_by_line_and_every_good_row_is_stored(runtime):
    good = conversation("s", T0, "crcr")
    text = as_csv(good).decode()
    lines = text.splitlines()
    bad = [
        "a,s2,robot,r,oops,2024-13-01T00:00:00Z",            # no month 13
        "acc-1,s,martian,x,hello,2024-01-01T00:00:00Z",       # unknown role
        "acc-1,,robot,x,hello,2024-01-01T00:00:00Z",          # no shop
        "acc-1,s,robot,x,hello,not-a-time",                   # bad time
        "acc-1,s,robot,x",                                    # short record
    ]
    upload = "\n".join([lines[0], lines[1], *bad, *lines[2:]]) + "\n"
    with freeze_time(LATER):
        job = run_job(runtime, upload.encode(), filename="x.csv")
    assert job.status == "partially_succeeded"
    assert (job.total_rows, job.inserted, job.invalid, job.processed) == (9, 4, 5, 9)
    by_line = {e.line: e.error for e in job.errors}
    assert sorted(by_line) == [3, 4, 5, 6, 7] and "sent_at" in by_line[3]
    assert "sender_role" in by_line[4] and "shop_id" in by_line[5]
    assert "sent_at" in by_line[6] and "fields" in by_line[7]
    assert message_count(runtime) == 4


def test_content_too_long_for_the_column_is_refused_not_truncated(runtime):
    rows = conversation("s", T0, "cr")
    rows[1]["content"] = "长" * 30000  # 90,000 bytes of UTF-8
    with freeze_time(LATER):
        job = run_job(runtime, as_ndjson(rows), filename="x.ndjson")
    assert (job.inserted, job.invalid) == (1, 1)
    assert job.errors[0].line == 2 and "content" in job.errors[0].error


def test_a_chunk_that_dies_before_commit_is_retried_exactly_once(runtime):
    rows = many_slots(6, "crh")
    service = ImportService(runtime, task_rows=10)

    class Crash(RuntimeError):
        pass

    def crash() -> None:
        raise Crash("worker died after writing, before commit")

    with freeze_time(LATER):
        job = service.create_job(io.BytesIO(as_ndjson(rows + rows[:3])), filename="x.ndjson")
        pks = service.prepare(job.job_id).chunk_pks
        with pytest.raises(Crash):
            service.process_chunk(pks[0], after_write=crash)
        assert message_count(runtime) == 0  # nothing of the dead attempt survived
        for pk in pks:
            service.process_chunk(pk)
        assert service.process_chunk(pks[0]) is None  # a redelivery after success is a no-op
        view = service.finish(job.job_id)
        assert service.finish(job.job_id).status == view.status
    assert (view.inserted, view.duplicates, view.sessions_created) == (18, 3, 6)
    with runtime.database.read() as db:
        assert db.execute(select(func.count()).select_from(Message)).scalar() == 18


def test_progress_is_visible_while_the_job_runs_and_jobs_are_listed(runtime):
    service = ImportService(runtime, task_rows=10)
    with freeze_time(LATER):
        job = service.create_job(io.BytesIO(as_ndjson(many_slots(8, "cr"))), filename="a.ndjson")
        assert service.get(job.job_id).status == "queued"
        pks = service.prepare(job.job_id).chunk_pks
        service.process_chunk(pks[0])
        mid = service.get(job.job_id)
        assert mid.status == "running" and mid.total_rows == 16
        assert 0 < mid.processed < 16 and mid.chunks_done == 1 and mid.inserted == mid.processed
        for pk in pks[1:]:
            service.process_chunk(pk)
        done = service.finish(job.job_id)
    assert done.status == "succeeded" and done.started_at and done.finished_at
    assert [j.job_id for j in service.list()] == [job.job_id]
    from app.events.models import Event
    from tests.sessions.helpers import events_for  # noqa: F401

    with runtime.database.read() as db:
        finished = db.execute(select(Event).where(Event.type == "import.finished")).scalar_one()
    assert finished.data["job_id"] == job.job_id and finished.data["inserted"] == 16


def test_an_empty_or_unparseable_upload_fails_with_a_reason(runtime):
    from app.errors import ValidationFailed

    with pytest.raises(ValidationFailed):
        run_job(runtime, b"")
    job = run_job(runtime, b"[1, 2", filename="x.json")
    assert job.status == "failed" and job.detail
    job = run_job(runtime, b"account_id,shop_id\n", filename="x.csv")
    assert job.status == "failed" and job.total_rows == 0


def test_the_embedded_pipeline_runs_through_the_tasks_in_process(runtime):
    from tasks import imports as tasks
    from tasks.celery_app import celery

    if not celery.conf.task_always_eager:
        pytest.skip("Celery is configured for real workers in this environment")
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(as_ndjson(many_slots(3))), filename="x.ndjson")
    runtime.dispatcher.start_import(job.job_id)
    tasks.wait_eager(job.job_id, timeout=60)
    view = service.get(job.job_id)
    assert (view.status, view.inserted) == ("succeeded", 15)
