"""A job closes once: finishers racing for it (two chunk tasks ending together, a
redelivered finish, the recovery on a worker's start) leave one close, one set of
counts and one `import.finished` event; the close waits for the last chunk."""

from __future__ import annotations

import io
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from app.events.models import Event
from app.imports.lifecycle import ImportJobView, JobLifecycle
from app.imports.models import ImportChunk, ImportJob
from app.imports.service import ImportService
from tasks import imports as tasks
from tests.imports.helpers import as_ndjson, conversation, message_count

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def export(slots: int = 30) -> bytes:
    rows = []
    for i in range(slots):
        rows += conversation(f"shop-{i}", T0 + timedelta(minutes=i), "crcrh")
    return as_ndjson(rows + rows[:4])  # 4 duplicates


def finished_events(runtime: Any) -> int:
    with runtime.database.read() as db:
        return db.execute(select(func.count()).select_from(Event)
                          .where(Event.type == "import.finished")).scalar_one()


def run_together(*calls: Any) -> list[Any]:
    """Start every call at once on its own thread; their results, in order."""
    start = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index: int, call: Any) -> None:
        try:
            start.wait(10)
            results[index] = call()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return results


def test_two_finishers_racing_close_the_job_once(runtime, monkeypatch):
    service = ImportService(runtime, task_rows=20)
    job = service.create_job(io.BytesIO(export()), filename="x.ndjson")
    pks = service.prepare(job.job_id).chunk_pks
    assert len(pks) > 2
    for pk in pks:
        service.process_chunk(pk)
    closes = {"n": 0}
    first_errors = JobLifecycle._first_errors

    def slow_first_errors(self: JobLifecycle, db: Any, job_row: Any) -> Any:
        closes["n"] += 1  # runs only after the claim: once per close that does the work
        time.sleep(0.5)  # the other finisher arrives while this close is under way
        return first_errors(self, db, job_row)

    monkeypatch.setattr(JobLifecycle, "_first_errors", slow_first_errors)
    results = run_together(lambda: ImportService(runtime).close(job.job_id),
                           lambda: ImportService(runtime).close(job.job_id))
    closed = [r for r in results if r is not None]
    assert len(closed) == 1 and closes["n"] == 1, results
    assert isinstance(closed[0], ImportJobView) and closed[0].status == "succeeded"
    assert finished_events(runtime) == 1
    view = service.get(job.job_id)
    assert (view.status, view.phase, view.inserted, view.duplicates) == (
        "succeeded", "finished", 150, 4)
    assert view.chunks_done == len(pks)
    # later finishers (a redelivered task, the recovery on a worker's start) change nothing
    assert service.close(job.job_id) is None
    assert tasks.finish_import_task(job_id=job.job_id)["closed"] is None
    assert service.finish(job.job_id).finished_at == view.finished_at
    assert finished_events(runtime) == 1


def test_the_last_two_chunk_tasks_ending_together_close_the_job_once(runtime, monkeypatch):
    """Both chunk tasks commit, then both count no chunk left: each tries the close, one
    closes the job, the other finds it closed. No finish task is sent on top."""
    service = ImportService(runtime, task_rows=20)
    job = service.create_job(io.BytesIO(export()), filename="x.ndjson")
    pks = service.prepare(job.job_id).chunk_pks
    assert len(pks) > 2
    for pk in pks[:-2]:
        assert tasks.import_chunk_task(job.job_id, pk)["closed"] is None  # others pending
    both_committed = threading.Barrier(2)
    chunks_left = ImportService.chunks_left

    def left_after_both(self: ImportService, job_id: str) -> int:
        both_committed.wait(30)  # both last chunks are committed before either counts
        return chunks_left(self, job_id)

    sent: list[Any] = []
    monkeypatch.setattr(ImportService, "chunks_left", left_after_both)
    monkeypatch.setattr(tasks, "service", lambda: ImportService(runtime, task_rows=20))
    monkeypatch.setattr(tasks.finish_import_task, "apply_async",
                        lambda *a, **kw: sent.append((a, kw)))
    monkeypatch.setattr(tasks.finish_import_task, "delay",
                        lambda *a, **kw: sent.append((a, kw)))
    results = run_together(lambda: tasks.import_chunk_task(job.job_id, pks[-2]),
                           lambda: tasks.import_chunk_task(job.job_id, pks[-1]))
    assert sorted(str(r["closed"]) for r in results) == ["None", "succeeded"], results
    assert sent == []
    assert finished_events(runtime) == 1
    view = service.get(job.job_id)
    assert (view.status, view.inserted, view.duplicates, view.sessions_created) == (
        "succeeded", 150, 4, 30)
    assert message_count(runtime) == 150


def test_the_close_waits_for_the_last_chunk_and_a_failed_job_never_closes(runtime):
    service = ImportService(runtime, task_rows=20)
    job = service.create_job(io.BytesIO(export()), filename="x.ndjson")
    pks = service.prepare(job.job_id).chunk_pks
    for pk in pks[:-1]:
        service.process_chunk(pk)
    assert service.close(job.job_id) is None  # one chunk still pending
    assert service.get(job.job_id).status == "running" and finished_events(runtime) == 0
    service.process_chunk(pks[-1])
    assert service.close(job.job_id) is not None
    assert finished_events(runtime) == 1

    other = service.create_job(io.BytesIO(export(3)), filename="y.ndjson")
    service.prepare(other.job_id)
    service.fail_job(other.job_id, "given up")
    assert service.close(other.job_id) is None
    with runtime.database.read() as db:
        row = db.execute(select(ImportJob).where(ImportJob.job_id == other.job_id)
                         ).scalar_one()
        pending = db.execute(select(func.count()).select_from(ImportChunk).where(
            ImportChunk.job_pk == row.id, ImportChunk.status == "pending")).scalar_one()
    assert (row.status, row.detail, pending) == ("failed", "given up", 0)
    assert finished_events(runtime) == 2  # the failure's own announcement, once
