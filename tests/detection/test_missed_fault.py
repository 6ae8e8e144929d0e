"""A counterpart asks for a person; the detection task waits in Redis, and Redis
restarts without its data before a worker takes it. The worker that then runs has
nothing to do and the session stays with the robot; the beat's safety net
(`detection.sweep_missed`) judges the message and the session goes to the desk.
Real gunicorn and a real Celery worker on MariaDB and a Redis of the test's own."""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from tests.api.test_server_e2e import BIN, ROOT, free_port, new_token, wait_answering
from tests.hostile.faults import PrivateRedis
from tests.imports.helpers import start_worker, stop, wait_until

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_a_detection_task_lost_with_a_restarted_redis_is_made_up_for_by_the_beat(
        runtime, backend, tmp_path):
    redis_server = PrivateRedis(tmp_path).start()
    env = {**backend.env(), "REDIS_URL": redis_server.url, "PYTHONPATH": str(ROOT)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    web = subprocess.Popen(
        [str(BIN / "gunicorn"), "--workers", "1", "--threads", "2", "--bind",
         f"127.0.0.1:{port}", "--no-control-socket", "--graceful-timeout", "5",
         "app.wsgi:app"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    log = tmp_path / "worker.log"
    log.touch()
    worker = None
    try:
        wait_answering(f"{base}/readyz", web)
        auth = {"Authorization": f"Bearer {new_token(env, 'bot')}"}
        created = httpx.post(f"{base}/api/v1/sessions", headers=auth, timeout=10, json={
            "account_id": "acc", "shop_id": "shop", "session_type": "AUTO_BARGAIN"})
        assert created.status_code == 201, created.text
        session_id = created.json()["session_id"]
        posted = httpx.post(f"{base}/api/v1/sessions/{session_id}/messages", headers=auth,
                            timeout=10, json={"messages": [{
                                "message_id": "m-1", "sender_role": "counterpart",
                                "sender_id": "buyer-1", "content": "算了，帮我转人工"}]})
        assert posted.status_code == 200, posted.text

        def status() -> str:
            return str(httpx.get(f"{base}/api/v1/sessions/{session_id}", headers=auth,
                                 timeout=10).json()["status"])

        redis_server.restart()  # the queued detection task is gone with Redis's data
        worker = start_worker(env, log, "det-lost")
        wait_until(lambda: " ready." in log.read_text(), 60, "the worker to start", log)
        time.sleep(3)  # it has nothing to run: the request for a person goes unanswered
        assert status() == "ACTIVE"

        sent = subprocess.run(
            [str(BIN / "celery"), "-A", "tasks.celery_app:celery", "call",
             "detection.sweep_missed"], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60)
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: status() == "TRANSFERRED", 60, "the session to go to the desk", log)
    finally:
        if worker is not None:
            stop(worker)
        web.terminate()
        web.wait(15)
        redis_server.stop()
    assert "1 sessions with counterpart messages no run has judged" in log.read_text()
