"""Redis restarts without its data while an import runs: the chunk tasks still queued are
gone, the worker reconnects and goes on, and nothing would ever send them again (a
worker resumes unfinished jobs only when it starts). The beat's safety net,
`imports.resume_stalled`, sends a job again once it showed no sign of life for longer
than a chunk task may run; the job then ends with exact counts. MariaDB + a Redis of
the test's own, a real Celery worker."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import func, select

from app.imports.models import ImportChunk
from app.imports.service import ImportService
from app.messages.models import Message
from tasks.imports import PAUSE_ENV, STALLED_AFTER
from tests.hostile.faults import PrivateRedis
from tests.imports.helpers import BIN, ROOT, as_ndjson, conversation, start_worker, stop, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
SHOPS, PER_SHOP = 250, 50  # 12,500 rows: three chunks of about 5,000


def chunk_statuses(runtime, job_pk: int) -> list[str]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return list(db.execute(select(ImportChunk.status).where(ImportChunk.job_pk == job_pk)
                               .order_by(ImportChunk.id)).scalars())


def test_chunk_tasks_lost_with_a_restarted_redis_are_sent_again_by_the_beat(
        runtime, backend, tmp_path):
    redis_server = PrivateRedis(tmp_path).start()
    env = {**backend.env(), "REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT)}
    rows = []
    for i in range(SHOPS):
        rows += conversation(f"shop-{i}", T0 + timedelta(minutes=i), "cr" * (PER_SHOP // 2))
    upload = tmp_path / "history.ndjson"
    upload.write_bytes(as_ndjson(rows))
    queued = subprocess.run([str(BIN / "auto-session"), "import", str(upload)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert queued.returncode == 0, queued.stderr
    job_id = re.search(r"import job (\S+) queued", queued.stdout).group(1)
    service = ImportService(runtime)

    marker = tmp_path / "paused"
    log = tmp_path / "worker.log"
    # every chunk waits 4 s before its commit: the others wait in the queue meanwhile
    worker = start_worker({**env, PAUSE_ENV: f"4:{marker}"}, log, "imp-lost")
    try:
        wait_until(marker.exists, 60, "the first chunk to write its rows", log)
        with runtime.database.read() as db:
            job_pk = db.execute(sa.text("SELECT id FROM import_jobs WHERE job_id = :j"),
                                {"j": job_id}).scalar_one()
        assert len(chunk_statuses(runtime, job_pk)) == 3
        redis_server.restart()  # the queued chunk tasks are gone with Redis's data

        wait_until(lambda: chunk_statuses(runtime, job_pk).count("done") == 1, 60,
                   "the running chunk to commit", log)
        time.sleep(8)  # the reconnected worker has nothing left to run
        assert chunk_statuses(runtime, job_pk).count("pending") == 2
        assert service.get(job_id).status == "running"

        # The job's signs of life an hour older: as if STALLED_AFTER had passed.
        with runtime.database.transaction() as conn:
            for table, columns in (("import_jobs", ("created_at", "started_at",
                                                    "split_heartbeat_at")),
                                   ("import_chunks", ("started_at", "done_at")),
                                   ("import_split_parts", ("heartbeat_at",))):
                key = "id" if table == "import_jobs" else "job_pk"
                for column in columns:
                    conn.execute(sa.text(
                        f"UPDATE {table} SET {column} = {column} - INTERVAL 1 HOUR "
                        f"WHERE {key} = :pk AND {column} IS NOT NULL"), {"pk": job_pk})
        sent = subprocess.run(
            [str(BIN / "celery"), "-A", "tasks.celery_app:celery", "call",
             "imports.resume_stalled"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: service.get(job_id).finished, 90, "the job to finish", log)
    finally:
        stop(worker)
        redis_server.stop()
    text = log.read_text()
    assert f"import {job_id} showed no sign of life for {STALLED_AFTER} s" in text
    job = service.get(job_id)
    assert job.status == "succeeded"
    assert (job.total_rows, job.inserted, job.duplicates, job.invalid, job.processed) == (
        SHOPS * PER_SHOP, SHOPS * PER_SHOP, 0, 0, SHOPS * PER_SHOP)
    assert job.sessions_created == SHOPS
    with runtime.database.read() as db:
        assert db.execute(select(func.count()).select_from(Message)).scalar_one() == \
            SHOPS * PER_SHOP
        attempts = db.execute(select(ImportChunk.attempts).where(ImportChunk.job_pk == job_pk)
                              .order_by(ImportChunk.id)).scalars().all()
    assert sorted(attempts) == [1, 1, 1]  # the committed chunk was not run again
