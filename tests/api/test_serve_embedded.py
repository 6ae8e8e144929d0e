"""`auto-session serve` on the embedded default, as `make run` starts it: a fresh data
directory, no configuration, a real server process. The periodic sweeps run inside it
(there is no beat on the embedded default), so an idle robot session times out and the
session waiting behind it takes the slot."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.api.test_server_e2e import free_port

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
