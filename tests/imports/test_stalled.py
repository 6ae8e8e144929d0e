"""Which unfinished jobs the beat sends again (`JobLifecycle.take_stalled`): those with
no sign of life — created, started, a split heartbeat, a chunk run started or ended, a
split part's heartbeat, an earlier resume — for the quiet period; each once a period,
of two callers one. The end to end fault (a Redis restarted without its data) is in
test_lost_tasks.py."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from app.db import utcnow
from app.imports.models import ImportChunk, ImportJob, ImportSplitPart
from app.imports.service import ImportService
from tests.imports.helpers import as_ndjson, conversation, run_job

QUIET = timedelta(seconds=960)


def queued_job(service: ImportService, shop: str) -> tuple[str, int]:
    rows = conversation(shop, utcnow() - timedelta(days=1), "crh")
    job = service.create_job(io.BytesIO(as_ndjson(rows)), filename=f"{shop}.ndjson")
    with service.database.read() as db:
        pk = db.query(ImportJob.id).filter(ImportJob.job_id == job.job_id).scalar()
    return job.job_id, pk


def set_job(runtime: Any, pk: int, **values: Any) -> None:
    with runtime.database.unit_of_work() as uow:
        uow.session.execute(update(ImportJob).where(ImportJob.id == pk).values(**values))
        uow.commit()


def add(runtime: Any, row: Any) -> None:
    with runtime.database.unit_of_work() as uow:
        uow.session.add(row)
        uow.commit()


def test_a_job_quiet_for_the_period_is_taken_once_a_period(runtime):
    service = ImportService(runtime)
    job_id, _pk = queued_job(service, "quiet")
    now = utcnow()
    assert service.jobs.take_stalled(now, QUIET) == []  # just created
    later = now + QUIET + timedelta(seconds=1)
    assert service.jobs.take_stalled(later, QUIET) == [job_id]
    # sent again: quiet for another period before it is taken again
    assert service.jobs.take_stalled(later + timedelta(seconds=1), QUIET) == []
    assert service.jobs.take_stalled(later + QUIET, QUIET) == []
    assert service.jobs.take_stalled(later + QUIET + timedelta(seconds=1), QUIET) == [job_id]


def test_any_sign_of_life_within_the_period_keeps_a_job_from_being_taken(runtime):
    service = ImportService(runtime)
    now = utcnow()
    at = now + QUIET * 3  # when the beat looks: every job was created long before
    recent = at - QUIET + timedelta(seconds=5)
    old = at - QUIET - timedelta(seconds=5)
    jobs = {name: queued_job(service, name) for name in (
        "started", "split-beat", "chunk-started", "chunk-done", "part-beat", "old-signs",
        "finished")}
    set_job(runtime, jobs["started"][1], status="running", started_at=recent)
    set_job(runtime, jobs["split-beat"][1], status="running", started_at=old,
            split_heartbeat_at=recent)
    add(runtime, ImportChunk(job_pk=jobs["chunk-started"][1], bucket=0, started_at=recent,
                             done_at=old))
    add(runtime, ImportChunk(job_pk=jobs["chunk-done"][1], bucket=0, status="done",
                             started_at=old, done_at=recent))
    add(runtime, ImportSplitPart(job_pk=jobs["part-beat"][1], part=0, start_byte=0,
                                 end_byte=10, first_line=1, buckets=1, clean=True,
                                 heartbeat_at=recent))
    set_job(runtime, jobs["old-signs"][1], status="running", started_at=old,
            split_heartbeat_at=old)
    add(runtime, ImportChunk(job_pk=jobs["old-signs"][1], bucket=0, started_at=old,
                             done_at=old))
    add(runtime, ImportSplitPart(job_pk=jobs["old-signs"][1], part=0, start_byte=0,
                                 end_byte=10, first_line=1, buckets=1, clean=True,
                                 heartbeat_at=old))
    set_job(runtime, jobs["finished"][1], status="succeeded", finished_at=old)
    assert service.jobs.take_stalled(at, QUIET) == [jobs["old-signs"][0]]


def test_a_chunk_run_marks_its_start(runtime):
    before = utcnow()
    job = run_job(runtime, as_ndjson(conversation("one", before - timedelta(days=1), "cr")))
    assert job.status == "succeeded"
    with runtime.database.read() as db:
        (started,) = db.query(ImportChunk.started_at).one()
    assert started is not None and before <= started <= utcnow()


@pytest.mark.sqlite_only  # tasks run in this process: the job it sends runs here
def test_the_beat_looks_for_stalled_jobs_and_sends_them_again(runtime):
    from tasks.celery_app import celery
    from tasks.imports import STALL_CHECK_INTERVAL, STALLED_AFTER, resume_stalled_imports

    entry = celery.conf.beat_schedule["resume-stalled-imports"]
    assert (entry["task"], entry["schedule"]) == (resume_stalled_imports.name,
                                                  STALL_CHECK_INTERVAL)
    assert STALLED_AFTER > 900  # longer than a chunk task may run: nothing still runs
    service = ImportService(runtime)
    job_id, pk = queued_job(service, "lost")  # its prepare task was lost
    set_job(runtime, pk, created_at=utcnow() - timedelta(seconds=STALLED_AFTER + 60))
    assert resume_stalled_imports() == [job_id]
    job = service.get(job_id)
    assert (job.status, job.inserted, job.sessions_created) == ("succeeded", 3, 1)
    assert resume_stalled_imports() == []
