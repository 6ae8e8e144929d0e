"""A real Celery worker, its address space capped, takes a gzip bomb and a huge upload
whose every row belongs to one slot: the bomb's job fails at MAX_UPLOAD_EXPANDED_BYTES
with nothing kept, the huge slot is stored whole, and the worker's peak memory stays
small throughout. MariaDB + Redis only."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from app.imports.service import ImportService
from app.sessions.models import Session
from tests.imports.helpers import (
    BIN,
    ROOT,
    gzip_of_repeated,
    peak_rss_of_group,
    staged_left,
    start_worker,
    stop,
    stored_by_job,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.slow]

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
ROWS = 120_000
PAUSE_EVERY = 100  # a 45-minute pause every 100 messages: one session per 100 rows
WORKER_ADDRESS_SPACE = 3 << 30
PEAK_RSS_BOUND = 200 << 20  # the code before paging peaked at 309 MiB here, this at 118


def write_one_slot_history(path: Path, rows: int) -> None:
    """`rows` messages of one slot, written a line at a time (the test stays small)."""
    at = T0
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            at += timedelta(minutes=45 if i % PAUSE_EVERY == 0 else 1)
            role = "counterpart" if i % 2 else "robot"
            out.write(json.dumps({
                "message_id": f"m-{i}", "account_id": "acc-huge", "shop_id": "shop-huge",
                "sender_role": role, "sender_id": f"{role}-1",
                "content": f"message {i} of a very long history", "sent_at": at.isoformat(),
            }) + "\n")


def queue(path: Path, env: dict[str, str]) -> str:
    queued = subprocess.run([str(BIN / "auto-session"), "import", str(path)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert queued.returncode == 0, queued.stderr
    found = re.search(r"import job (\S+) queued", queued.stdout)
    assert found, queued.stdout
    return found.group(1)


@pytest.mark.timeout(600)
def test_a_capped_worker_takes_a_bomb_and_a_huge_slot_with_flat_memory(
        runtime, backend, tmp_path):
    env = {**backend.env(), "PYTHONPATH": str(ROOT),
           "MAX_UPLOAD_EXPANDED_BYTES": str(64 << 20)}
    bomb = tmp_path / "bomb.ndjson.gz"
    bomb.write_bytes(gzip_of_repeated(b"\0" * (1 << 20), 1 << 30))  # 1 GiB inflated
    huge = tmp_path / "huge.ndjson"
    write_one_slot_history(huge, ROWS)
    bomb_job, huge_job = queue(bomb, env), queue(huge, env)

    log = tmp_path / "worker.log"
    worker = start_worker(env, log, "hostile", memory_cap=WORKER_ADDRESS_SPACE)
    service = ImportService(runtime)
    try:
        wait_until(lambda: service.get(bomb_job).finished and service.get(huge_job).finished,
                   480, "both jobs to finish", log)
        peak = peak_rss_of_group(worker.pid)
    finally:
        stop(worker)

    failed = service.get(bomb_job)
    assert failed.status == "failed" and "MAX_UPLOAD_EXPANDED_BYTES" in (failed.detail or "")
    assert stored_by_job(runtime, bomb_job) == 0 and staged_left(runtime, bomb_job) == (0, 0)

    done = service.get(huge_job)
    assert (done.status, done.inserted, done.invalid) == ("succeeded", ROWS, 0), done
    assert done.sessions_created == ROWS // PAUSE_EVERY
    assert stored_by_job(runtime, huge_job) == ROWS and staged_left(runtime, huge_job) == (0, 0)
    with runtime.database.read() as db:
        sizes = db.execute(select(Session.message_count, func.count()).group_by(
            Session.message_count)).all()
    assert sizes == [(PAUSE_EVERY, ROWS // PAUSE_EVERY)]
    assert 0 < peak < PEAK_RSS_BOUND, (
        f"worker peak RSS {peak >> 20} MiB; log:\n{log.read_text()[-3000:]}")
