"""A real Celery worker is SIGKILLed in the middle of a chunk (rows written, commit not
yet made), then a new worker starts: the job finishes with exact counts, nothing lost,
nothing doubled. MariaDB + Redis only."""

from __future__ import annotations

import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from app.imports.models import ImportChunk
from app.imports.service import ImportService
from app.messages.models import Message
from app.sessions.models import Session
from tasks.imports import PAUSE_ENV
from tests.imports.helpers import (
    BIN,
    ROOT,
    as_ndjson,
    conversation,
    start_worker,
    stop,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def counts(runtime) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return (db.execute(select(func.count()).select_from(Message)).scalar_one(),
                db.execute(select(func.count()).select_from(Session)).scalar_one())


def test_worker_killed_mid_chunk_then_restarted_finishes_with_exact_counts(
        runtime, backend, tmp_path):
    rows = []
    for i in range(12):
        rows += conversation(f"shop-{i}", T0 + timedelta(minutes=i), "crcrh")
    upload = tmp_path / "history.ndjson"
    upload.write_bytes(as_ndjson(rows + rows[:5]) + b"not json\n")
    env = {**backend.env(), "BATCH_SIZE": "20", "PYTHONPATH": str(ROOT)}
    queued = subprocess.run([str(BIN / "auto-session"), "import", str(upload)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert queued.returncode == 0, queued.stderr
    job_id = re.search(r"import job (\S+) queued", queued.stdout).group(1)

    marker = tmp_path / "paused"
    log = tmp_path / "worker.log"
    first = start_worker({**env, PAUSE_ENV: f"120:{marker}"}, log, "imp-a")
    try:
        wait_until(marker.exists, 60, "a chunk to write its rows", log)
        stop(first, signal.SIGKILL)  # the whole worker: main process and its child
    finally:
        stop(first, signal.SIGKILL)
    assert counts(runtime) == (0, 0)  # the chunk's rows were never committed
    service = ImportService(runtime)
    assert service.get(job_id).status == "running"

    second = start_worker(env, log, "imp-b")
    try:
        wait_until(lambda: service.get(job_id).finished, 90, "the job to finish", log)
    finally:
        stop(second)
    job = service.get(job_id)
    assert job.status == "partially_succeeded"
    assert (job.total_rows, job.inserted, job.duplicates, job.invalid) == (66, 60, 5, 1)
    assert (job.sessions_created, job.processed) == (12, 66)
    assert job.errors[0].line == 66
    assert counts(runtime) == (60, 12)
    with runtime.database.read() as db:
        attempts = db.execute(select(func.max(ImportChunk.attempts))).scalar_one()
    assert attempts >= 2  # the killed chunk really ran again
