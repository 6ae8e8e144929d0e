"""`auto-session serve` on the embedded default, as `make run` starts it: a fresh data
directory, no configuration, a real server process. The periodic sweeps run inside it
(there is no beat on the embedded default), so an idle robot session times out and the
session waiting behind it takes the slot."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from tasks.imports import PAUSE_ENV
from tests.api.test_server_e2e import free_port, wait_answering

BIN = Path(sys.executable).parent


@pytest.mark.sqlite_only
def test_serve_embedded_default_answers_and_sweeps_in_process(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "TEST_"))}
    env.update(DATA_DIR=str(tmp_path / "data"), DEFAULT_SESSION_TIMEOUT="2",
               SWEEP_INTERVAL="0.5")
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "auto-session"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        banner = server.stdout.readline()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}" in banner and "embedded" in banner
        made = subprocess.run(
            [str(BIN / "auto-session"), "clients", "create", "--name", "bot-1", "--role",
             "bot", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=60, check=True,
        )
        token = json.loads(made.stdout)["token"]
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never answered"
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {token}"}
        body = {"account_id": "acc", "shop_id": "shop", "session_type": "AUTO_BARGAIN"}
        first = httpx.post(f"{base}/api/v1/sessions", json=body, headers=auth, timeout=10)
        second = httpx.post(f"{base}/api/v1/sessions", json=body, headers=auth, timeout=10)
        assert (first.status_code, second.status_code) == (201, 201)
        assert (first.json()["status"], second.json()["status"]) == ("ACTIVE", "PENDING")
        first_id, second_id = first.json()["session_id"], second.json()["session_id"]
        deadline = time.monotonic() + 20
        while True:
            status = httpx.get(f"{base}/api/v1/sessions/{first_id}", headers=auth,
                               timeout=10).json()["status"]
            if status == "TIMEOUT":
                break
            assert time.monotonic() < deadline, f"still {status}: no in-process sweep"
            time.sleep(0.3)
        promoted = httpx.get(f"{base}/api/v1/sessions/{second_id}", headers=auth,
                             timeout=10).json()
        assert promoted["status"] in ("ACTIVE", "TIMEOUT")  # promoted, then idle itself
        assert promoted["activated_at"] is not None
        # /metrics from the one process's own registry (no metrics folder embedded)
        scraped = httpx.get(f"{base}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert ('autosession_http_requests_total{method="POST",route="/api/v1/sessions",'
                'status="201"} 2.0') in scraped.text
        assert 'autosession_sweep_duration_seconds_count{sweep="sessions"}' in scraped.text
        assert not (tmp_path / "data" / "metrics").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def _serve(tmp_path: Path, env: dict[str, str], port: int) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [str(BIN / "auto-session"), "serve", "--port", str(port)], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    wait_answering(f"http://127.0.0.1:{port}/healthz", server)
    return server


def _stop(server: subprocess.Popen[str], sig: signal.Signals) -> str:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, sig)
    out, _ = server.communicate(timeout=30)
    return out


@pytest.mark.sqlite_only
def test_an_import_cut_by_a_stopped_server_is_resumed_when_it_starts_again(tmp_path):
    """On the embedded default an import's pipeline runs on threads of the server: a
    server killed in the middle of a chunk (rows written, not committed) leaves the job
    running, and nothing else would ever finish it. The next start resumes it: the job
    ends with exact counts, the killed chunk's rows stored once."""
    from tests.imports.helpers import as_ndjson, conversation

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DATABASE_", "REDIS_", "TEST_"))}
    env.update(DATA_DIR=str(tmp_path / "data"), BATCH_SIZE="20")
    made = subprocess.run(
        [str(BIN / "auto-session"), "clients", "create", "--name", "ops", "--role", "admin",
         "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        check=True)
    auth = {"Authorization": f"Bearer {json.loads(made.stdout)['token']}"}
    start = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
    rows = []
    for i in range(12):
        rows += conversation(f"shop-{i}", start + timedelta(minutes=i), "crcrh")
    marker = tmp_path / "paused"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    first = _serve(tmp_path, {**env, PAUSE_ENV: f"120:{marker}"}, port)
    try:
        queued = httpx.post(f"{base}/api/v1/imports", headers={
            **auth, "Content-Type": "application/x-ndjson"},
            content=as_ndjson(rows + rows[:5]) + b"not json\n", timeout=30)
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["job_id"]
        deadline = time.monotonic() + 60
        while not marker.exists():  # a chunk wrote its rows and waits before its commit
            assert time.monotonic() < deadline, "no chunk reached its commit"
            time.sleep(0.1)
    finally:
        _stop(first, signal.SIGKILL)

    database = tmp_path / "data" / "auto_session.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as db:
        status = db.execute("SELECT status FROM import_jobs WHERE job_id = ?",
                            (job_id,)).fetchone()[0]
        stored = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert (status, stored) == ("running", 0)  # cut mid-chunk: nothing committed

    second = _serve(tmp_path, env, port)
    try:
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{base}/api/v1/imports/{job_id}", headers=auth,
                                timeout=10).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"the job stayed {job['status']}"
            time.sleep(0.2)
    finally:
        log = _stop(second, signal.SIGTERM)
    assert f"import {job_id} was left unfinished: resuming it" in log
    assert job["status"] == "partially_succeeded"
    assert (job["total_rows"], job["inserted"], job["duplicates"], job["invalid"],
            job["sessions_created"], job["processed"]) == (66, 60, 5, 1, 12, 66)
    assert job["errors"][0]["line"] == 66
    with contextlib.closing(sqlite3.connect(database)) as db:
        assert db.execute("SELECT count(*), count(DISTINCT message_id) FROM messages"
                          ).fetchone() == (60, 60)
        assert db.execute("SELECT max(attempts) FROM import_chunks").fetchone()[0] >= 2
