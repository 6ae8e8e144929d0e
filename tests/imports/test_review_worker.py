"""The LLM review runs in a real Celery worker process (never in a request): a job
uploaded through the CLI with `--review`, its chunks taken by a worker that asks the
chat-completions server on 127.0.0.1. MariaDB + Redis only."""

from __future__ import annotations

import re
import subprocess
from datetime import UTC, datetime, timedelta

import pytest

from app.imports.service import ImportService
from tests.imports.helpers import BIN, ROOT, as_ndjson, row, start_worker, stop, wait_until
from tests.imports.review_server import ReviewServer

pytestmark = [pytest.mark.services, pytest.mark.slow]

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def test_review_runs_in_the_worker_and_its_counts_reach_the_job(runtime, backend, tmp_path):
    rows = []
    for shop in ("s1", "s2", "s3"):
        rows += [row(shop, "counterpart", T0 + timedelta(minutes=i)) for i in range(3)]
        rows += [row(shop, "robot", T0 + timedelta(minutes=50 + i)) for i in range(3)]
    upload = tmp_path / "history.ndjson"
    upload.write_bytes(as_ndjson(rows))
    with ReviewServer() as server:
        env = {**backend.env(), "PYTHONPATH": str(ROOT),
               "GROUPING_LLM_BASE_URL": server.base_url, "GROUPING_LLM_MODEL": "m",
               "GROUPING_REVIEW_MAX_CALLS": "2"}
        queued = subprocess.run([str(BIN / "auto-session"), "import", str(upload), "--review"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert queued.returncode == 0, queued.stderr
        job_id = re.search(r"import job (\S+) queued", queued.stdout).group(1)
        assert server.requests == []  # nothing asked while uploading
        log = tmp_path / "worker.log"
        worker = start_worker(env, log, "review-a")
        service = ImportService(runtime)
        try:
            wait_until(lambda: service.get(job_id).finished, 90, "the job to finish", log)
        finally:
            stop(worker)
        job = service.get(job_id)
        assert (job.status, job.inserted, job.review) == ("succeeded", 18, True)
        assert len(server.requests) == 2  # three boundaries, a budget of two calls
        assert (job.boundaries_reviewed, job.boundaries_merged) == (2, 2)
        assert job.sessions_created == 3 * 2 - 2
