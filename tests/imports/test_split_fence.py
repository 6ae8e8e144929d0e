"""Two runs of prepare on one job (a worker that starts re-dispatches unfinished jobs;
a redelivered task): a live split is left alone, a quiet one is taken over, and the
split that was taken over cannot stage a row more. The job's counts stay exact. The
split's pieces are written on a thread of their own (`StagingWriter`), in order, and
its first error stops it."""

from __future__ import annotations

import io
import threading
import time
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.db import utcnow
from app.imports.models import ImportChunkPart, ImportJob
from app.imports.service import ImportService
from app.imports.splitting import SPLIT_LEASE, PrepareOutcome
from app.imports.staging import SplitTakenOver, StagingWriter
from tests.imports.helpers import as_ndjson, message_count, row

START = datetime(2026, 3, 2, 9, 0)


def export(rows: int, slots: int = 500) -> bytes:
    return as_ndjson([row(f"shop-{n % slots}", "counterpart" if n % 3 else "robot",
                          START + timedelta(seconds=n), f"message {n}", message_id=f"m-{n}")
                      for n in range(rows)])


def job_row(runtime, job_id: str) -> ImportJob:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        job = db.execute(select(ImportJob).where(ImportJob.job_id == job_id)).scalar_one()
        db.expunge(job)
        return job


def staged_in_parts(runtime, job_pk: int) -> int:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return int(db.execute(select(func.coalesce(func.sum(ImportChunkPart.row_count), 0))
                              .where(ImportChunkPart.job_pk == job_pk)).scalar_one())


def test_a_live_split_is_left_alone_and_looked_at_again(runtime):
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(export(50)), filename="x.ndjson")
    with runtime.database.unit_of_work() as uow:  # another worker is splitting right now
        uow.session.execute(ImportJob.__table__.update()
                            .where(ImportJob.__table__.c.job_id == job.job_id)
                            .values(status="running", phase="splitting", split_token="spl_b",
                                    split_heartbeat_at=utcnow()))
        uow.commit()
    outcome = service.prepare(job.job_id)
    assert outcome.chunk_pks == [] and not outcome.ready_to_finish
    assert outcome.retry_in is not None and 0 < outcome.retry_in <= SPLIT_LEASE
    assert job_row(runtime, job.job_id).split_token == "spl_b"  # untouched
    # once it has been quiet for the lease, the next look takes it over and splits
    taken = ImportService(runtime, split_lease=0.0).prepare(job.job_id)
    assert taken.retry_in is None and taken.chunk_pks
    after = job_row(runtime, job.job_id)
    assert after.split_token != "spl_b" and after.phase == "chunks"
    assert after.staged_rows == staged_in_parts(runtime, after.id) == 50


def test_a_split_taken_over_midway_stages_nothing_more_and_counts_stay_exact(runtime):
    rows = 60_000
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(export(rows)), filename="big.ndjson")
    first: list[PrepareOutcome] = []
    worker_a = threading.Thread(target=lambda: first.append(service.prepare(job.job_id)))
    worker_a.start()
    deadline = time.monotonic() + 60
    while job_row(runtime, job.job_id).staged_rows == 0:  # A has staged its first batch
        assert worker_a.is_alive(), "the split ended before the take-over could happen"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    second = ImportService(runtime, split_lease=0.0).prepare(job.job_id)  # B takes over
    worker_a.join(120)
    assert first == [PrepareOutcome(job.job_id, [], False)]  # A stopped without dispatching
    assert second.chunk_pks and second.retry_in is None
    final = job_row(runtime, job.job_id)
    assert final.phase == "chunks" and final.total_rows == rows
    assert final.staged_rows == staged_in_parts(runtime, final.id) == rows
    for chunk_pk in second.chunk_pks:
        service.process_chunk(chunk_pk)
    view = service.finish(job.job_id)
    assert (view.status, view.inserted, view.duplicates, view.invalid) == (
        "succeeded", rows, 0, 0)
    assert message_count(runtime) == rows


def test_the_staging_writer_writes_in_order_and_stops_at_its_first_error():
    written: list[int] = []

    def write(batch: int) -> None:
        time.sleep(0.001)
        if batch == 5:
            raise SplitTakenOver("taken over")
        written.append(batch)

    writer = StagingWriter(write)
    for batch in range(5):
        writer.put(batch)
    writer.close()
    assert written == [0, 1, 2, 3, 4]
    writer.abort()  # after close: nothing to do

    writer = StagingWriter(write)
    with pytest.raises(SplitTakenOver):
        for batch in range(5, 50):
            writer.put(batch)  # the error of batch 5 comes out at a later put
    writer.abort()
    assert written == [0, 1, 2, 3, 4]  # nothing after the failed batch was written

    started = threading.Event()
    release = threading.Event()

    def slow(batch: int) -> None:
        started.set()
        release.wait(5)
        written.append(batch)

    writer = StagingWriter(slow)
    writer.put(100)
    writer.put(101)  # waits while 100 is written
    started.wait(5)
    threading.Timer(0.2, release.set).start()
    writer.abort()  # the write in flight ends; the waiting one is dropped
    assert written[-1] == 100 and 101 not in written
