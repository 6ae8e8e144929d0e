"""Metrics and logs of the Procfile's real processes on MariaDB + Redis (SPEC §13):
gunicorn with three workers, a Celery worker with two pool processes and beat, all with
LOG_FORMAT=json and one METRICS_DIR, after known traffic.

- `/metrics` (scraped once, on loopback) counts exactly what was sent, summed over the
  web workers that served it and the worker processes that ran the tasks;
- every line each process wrote is one JSON object, and the trace id a request answered
  with is in the lines of the Celery task it caused;
- no token, password or API key sent or configured is in any line.
"""

from __future__ import annotations

import io
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from sqlalchemy import func, select

from app.delivery.models import DeliveryStatus, WebhookDelivery
from app.runtime import build_runtime
from tests.api.test_metrics import samples
from tests.api.test_server_e2e import new_token
from tests.conftest import _clean
from tests.delivery.receiver import WebhookReceiver
from tests.imports.helpers import as_csv

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WEB_WORKERS = 2
POOL = 2
CREATES = 24
SESSION_ROUTE = "/api/v1/sessions/<session_id>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class Run:
    """What one run of the processes sent, answered, counted and wrote."""

    metrics: dict[Any, float]
    sent: Counter[tuple[str, str, str]]
    logs: dict[str, list[str]]
    secrets: dict[str, str]
    bot_client_id: str
    detect_trace: str
    llm_trace: str
    imported: dict[str, int]
    delivered: int
    db_delivered: int
    notes: dict[str, Any] = field(default_factory=dict)


def wait_for(check: Any, timeout: float, what: str, logs: dict[str, Path]) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    tails = "\n".join(f"--- {name}\n" + path.read_text(errors="replace")[-3000:]
                      for name, path in logs.items())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def leftover_counter(folder: Path) -> None:
    """A previous run's file, as a killed server leaves it: the start must delete it."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = MmapedDict(str(folder / "counter_999999.db"))
    stale.write_value(mmap_key("autosession_http_requests", "autosession_http_requests_total",
                               ["method", "route", "status"],
                               ["POST", "/api/v1/sessions", "201"],
                               "HTTP requests answered"), 1000.0, 0.0)
    stale.close()


@pytest.fixture(scope="module")
def run(backend: Any, tmp_path_factory: pytest.TempPathFactory) -> Run:
    if not backend.is_mysql:  # before the per-test `services` check: this is module-wide
        pytest.skip("needs MariaDB + Redis: runs in the mysql pass (--backend mysql)")
    tmp = tmp_path_factory.mktemp("observed")
    metrics_dir = tmp / "metrics"
    leftover_counter(metrics_dir / "web")
    leftover_counter(metrics_dir / "worker")
    with socket.socket() as closed:  # a port nobody listens on: the LLM call fails
        closed.bind(("127.0.0.1", 0))
        llm_port = closed.getsockname()[1]
    configured = {
        "SECRET_KEY": "console-" + secrets.token_hex(16),
        "METRICS_TOKEN": "metrics-" + secrets.token_hex(16),
        "LLM_API_KEY": "sk-" + secrets.token_hex(16),
        "LLM_PASSWORD": "llmpw" + secrets.token_hex(12),
    }
    env = {**backend.env(), "PYTHONPATH": str(ROOT), "METRICS_DIR": str(metrics_dir),
           "LOG_FORMAT": "json", "WEBHOOK_ALLOW_PRIVATE": "true",
           "SECRET_KEY": configured["SECRET_KEY"], "METRICS_TOKEN": configured["METRICS_TOKEN"],
           "LLM_BASE_URL": f"http://gpt:{configured['LLM_PASSWORD']}@127.0.0.1:{llm_port}/v1",
           "LLM_MODEL": "test-model", "LLM_API_KEY": configured["LLM_API_KEY"],
           "SWEEP_INTERVAL": "1", "TRANSFER_SWEEP_INTERVAL": "1", "DELIVERY_INTERVAL": "2"}
    settings = backend.settings(tmp)
    runtime = build_runtime(settings)
    _clean(runtime)

    files = {name: tmp / f"{name}.log" for name in
             ("web.out", "web.err", "worker.out", "worker.err", "beat.out", "beat.err")}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, args: list[str]) -> None:
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env,
                                      stdout=files[f"{name}.out"].open("wb"),
                                      stderr=files[f"{name}.err"].open("wb")))

    celery = [sys.executable, "-m", "celery", "-A", "tasks.celery_app:celery"]
    try:
        start("web", [str(BIN / "gunicorn"), "--workers", str(WEB_WORKERS), "--threads", "2",
                      "--bind", f"127.0.0.1:{port}", "--access-logfile", "-",
                      "--no-control-socket", "--graceful-timeout", "5", "app.wsgi:app"])
        start("worker", [*celery, "worker", "--loglevel", "INFO", "--concurrency", str(POOL),
                         "-n", "metrics-test@%h", "--without-mingle", "--without-gossip"])
        start("beat", [*celery, "beat", "--loglevel", "INFO",
                       "--schedule", str(tmp / "beat-schedule")])

        def ready() -> bool:
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, 180, "gunicorn to answer", files)
        wait_for(lambda: b"ready" in files["worker.err"].read_bytes(), 180,
                 "the worker to be ready", files)
        tokens = {role: new_token(env, role) for role in ("bot", "admin")}
        bot_id = httpx.get(f"{base}/api/v1/sessions", timeout=10, headers={
            "Authorization": f"Bearer {tokens['bot']}"}).headers["X-Trace-Id"] and None
        sent: Counter[tuple[str, str, str]] = Counter()

        def call(client: httpx.Client, method: str, route: str, path: str,
                 **kw: Any) -> httpx.Response:
            response = client.request(method, path, **kw)
            sent[(method, route, str(response.status_code))] += 1
            return response

        bot = httpx.Client(base_url=base, timeout=20,
                           headers={"Authorization": f"Bearer {tokens['bot']}"})
        admin = httpx.Client(base_url=base, timeout=20,
                             headers={"Authorization": f"Bearer {tokens['admin']}"})
        sent[("GET", "/api/v1/sessions", "200")] += 1  # the look-up above
        with bot, admin, WebhookReceiver() as receiver, ThreadPoolExecutor(6) as pool:
            hook = call(bot, "PUT", "/api/v1/webhook", "/api/v1/webhook",
                        json={"url": receiver.url})
            assert hook.status_code == 200, hook.text
            configured["WEBHOOK_SECRET"] = hook.json()["secret"]

            def create(n: int) -> str:
                # one connection each: the requests spread over the web workers
                with httpx.Client(base_url=base, timeout=20, headers=bot.headers) as own:
                    answer = call(own, "POST", "/api/v1/sessions", "/api/v1/sessions",
                                  json={"account_id": "acc", "shop_id": f"shop-{n}",
                                        "session_type": "AUTO_BARGAIN"})
                    assert answer.status_code == 201, answer.text
                    sid = str(answer.json()["session_id"])
                    assert call(own, "GET", SESSION_ROUTE,
                                f"/api/v1/sessions/{sid}").status_code == 200
                    return sid

            ids = list(pool.map(create, range(CREATES)))
            bot_client = bot.get(f"/api/v1/sessions/{ids[0]}").json()
            sent[("GET", SESSION_ROUTE, "200")] += 1
            for n in range(5):
                call(bot, "GET", SESSION_ROUTE, f"/api/v1/sessions/missing-{n}")
            # secrets where they do not belong: a token in the query, an API key in a
            # Referer, an unknown token
            call(bot, "GET", "/api/v1/sessions", f"/api/v1/sessions?token={tokens['bot']}",
                 headers={"Referer": f"https://example.test/?api_key={tokens['admin']}"})
            wrong = "ast_" + secrets.token_urlsafe(32)
            configured["WRONG_TOKEN"] = wrong
            call(httpx.Client(base_url=base, timeout=10), "GET", "/api/v1/sessions",
                 "/api/v1/sessions", headers={"Authorization": f"Bearer {wrong}"})

            # a counterpart asks for a person: detection runs in the worker and transfers
            detect = call(bot, "POST", "/api/v1/sessions/<session_id>/messages",
                          f"/api/v1/sessions/{ids[1]}/messages", json={"messages": [
                              {"message_id": "m-human", "sender_role": "counterpart",
                               "content": "我要转人工"}]})
            assert detect.status_code in (200, 201), detect.text
            # no rule hits: the LLM is asked and is unreachable (its URL has a password)
            llm = call(bot, "POST", "/api/v1/sessions/<session_id>/messages",
                       f"/api/v1/sessions/{ids[2]}/messages", json={"messages": [
                           {"message_id": "m-price", "sender_role": "counterpart",
                            "content": "how much for two of them"}]})
            assert llm.status_code in (200, 201), llm.text

            rows = [{"message_id": f"imp-{i}", "account_id": "acc-imp", "shop_id": "imp",
                     "sender_role": "counterpart" if i % 2 else "robot",
                     "content": f"line {i}", "sent_at": f"2024-03-01T10:0{i}:00Z"}
                    for i in range(4)]
            # one row a chunk refuses (its time), one the split refuses (no shop: no slot)
            data = as_csv(rows) + (b"bad,acc-imp,imp,robot,x,not-a-time\n"
                                   b"no-shop,acc-imp,,robot,x,2024-03-01T10:09:00Z\n")
            upload = call(admin, "POST", "/api/v1/imports", "/api/v1/imports",
                          files={"file": ("history.csv", io.BytesIO(data), "text/csv")})
            assert upload.status_code == 202, upload.text
            job_id = upload.json()["job_id"]

            def job_done() -> Any:
                with runtime.database.read() as db:
                    from app.imports.models import ImportJob

                    job = db.execute(select(ImportJob).where(ImportJob.job_id == job_id)
                                     ).scalar_one()
                    if job.status in ("succeeded", "partially_succeeded", "failed"):
                        return {"inserted": job.inserted, "invalid": job.invalid}
                return None

            imported = wait_for(job_done, 120, "the import to finish", files)
            wait_for(lambda: b"LLM gave no verdict" in files["worker.err"].read_bytes(), 120,
                     "the LLM failure to be logged", files)
            wait_for(lambda: b'"task_name": "detection.detect"' in files["worker.err"]
                     .read_bytes() and b"hits" in files["worker.err"].read_bytes(), 120,
                     "detection to hit", files)
            wait_for(lambda: b"sweeps.sessions" in files["worker.err"].read_bytes(), 90,
                     "a sweep to run", files)

            def deliveries_settled() -> Any:
                with runtime.database.read() as db:
                    counts = dict(db.execute(
                        select(WebhookDelivery.status, func.count())
                        .group_by(WebhookDelivery.status)).all())
                if counts.get(DeliveryStatus.PENDING) or not counts:
                    return None
                return counts

            counts = wait_for(deliveries_settled, 120, "webhook deliveries", files)
            time.sleep(1.5)  # a sweep or delivery run in flight ends its counting
            scrape = httpx.get(f"{base}/metrics", timeout=20)
            assert scrape.status_code == 200, scrape.text
            delivered = len(receiver.bodies())
        return Run(metrics=samples(scrape.text), sent=sent, logs={},
                   secrets={**configured, "BOT_TOKEN": tokens["bot"],
                            "ADMIN_TOKEN": tokens["admin"]},
                   bot_client_id=str(bot_client.get("client_id") or bot_id or ""),
                   detect_trace=detect.headers["X-Trace-Id"],
                   llm_trace=llm.headers["X-Trace-Id"], imported=imported,
                   delivered=delivered, db_delivered=int(counts.get("delivered", 0)),
                   notes={"files": files})
    finally:
        for proc in reversed(procs):
            stop(proc)
        runtime.close()


@pytest.fixture(scope="module")
def logs(run: Run) -> dict[str, list[str]]:
    """Every process's output, read after the processes stopped."""
    return {name: path.read_text(errors="replace").splitlines()
            for name, path in run.notes["files"].items()}


def counted(run: Run, method: str, route: str, status: str) -> float:
    return run.metrics.get(("autosession_http_requests_total",
                            (("method", method), ("route", route), ("status", status))), 0.0)


def test_request_counters_equal_what_was_sent_summed_over_the_web_workers(run: Run,
                                                                           logs: Any):
    assert run.sent[("POST", "/api/v1/sessions", "201")] == CREATES
    for (method, route, status), number in run.sent.items():
        assert counted(run, method, route, status) == number, (method, route, status)
    served_by = {json.loads(line)["pid"] for line in logs["web.out"]
                 if '"POST"' in line and '"/api/v1/sessions"' in line}
    assert len(served_by) >= 2, "the creates were not spread over several web workers"
    assert run.metrics[("autosession_processes", (("role", "web"),))] == WEB_WORKERS
    histogram = ("autosession_http_request_duration_seconds_count",
                 (("method", "POST"), ("route", "/api/v1/sessions")))
    assert run.metrics[histogram] == CREATES


def test_worker_counters_come_from_the_celery_processes(run: Run):
    assert run.metrics[("autosession_processes", (("role", "worker"),))] == POOL
    assert run.imported == {"inserted": 4, "invalid": 2}
    assert run.metrics[("autosession_import_rows_total", (("outcome", "inserted"),))] == 4
    # the row the split refused is counted too: the outcomes add up to the upload's rows
    assert run.metrics[("autosession_import_rows_total", (("outcome", "invalid"),))] == 2
    assert run.metrics[("autosession_import_chunk_duration_seconds_count", ())] >= 1
    assert run.delivered == run.db_delivered > CREATES
    assert run.metrics[("autosession_webhook_deliveries_total",
                        (("outcome", "delivered"),))] == run.delivered
    assert run.metrics[("autosession_webhook_delivery_lag_seconds_count", ())] == run.delivered
    assert run.metrics[("autosession_sweep_duration_seconds_count",
                        (("sweep", "sessions"),))] >= 1
    # creates on free slots in the web workers, the detector's transfer in a worker
    assert run.metrics[("autosession_slot_lock_wait_seconds_count", ())] >= CREATES + 1
    assert run.metrics[("autosession_sessions", (("status", "TRANSFERRED"),))] == 1
    assert run.metrics[("autosession_transfers_waiting", ())] == 1


def test_every_log_line_of_web_worker_and_beat_is_one_json_object(
        logs: dict[str, list[str]]):
    # gunicorn: its own lines on stderr, access lines on stdout; Celery logs on stderr
    for name in ("web.out", "web.err", "worker.err", "beat.err"):
        assert logs[name], f"{name} is empty"
        for line in logs[name]:
            record = json.loads(line)
            assert {"time", "level", "logger", "message"} <= set(record), (name, line)
            assert record["time"].endswith("Z")
    # Celery prints (not logs) its shutdown notice; the worker's banner is left out
    assert [line for line in logs["worker.out"] if line.strip()] == [
        "worker: Warm shutdown (MainProcess)"]


def test_a_request_trace_id_follows_it_into_its_celery_task(run: Run,
                                                            logs: dict[str, list[str]]):
    records = [json.loads(line) for line in logs["worker.err"]]
    detected = [r for r in records if r.get("trace_id") == run.detect_trace
                and r.get("task_name") == "detection.detect"]
    assert any("hits" in r["message"] for r in detected), run.detect_trace
    assert {r.get("client_id") for r in detected} == {run.bot_client_id}
    asked = [r for r in records if r.get("trace_id") == run.llm_trace
             and r.get("task_name") == "detection.analyse_llm"]
    assert any("LLM gave no verdict" in r["message"] for r in asked)
    access = [json.loads(line) for line in logs["web.out"]]
    assert [r["status"] for r in access if r.get("trace_id") == run.detect_trace] in (
        [200], [201])
    # beat's runs start traces of their own
    sweeps = [r for r in records if r.get("task_name") == "sweeps.sessions"]
    assert sweeps and all(r["trace_id"] not in (run.detect_trace, run.llm_trace)
                          for r in sweeps)


def test_no_token_password_or_key_reaches_any_log(run: Run, logs: dict[str, list[str]]):
    everything = "\n".join(line for lines in logs.values() for line in lines)
    leaked = {name for name, value in run.secrets.items() if value in everything}
    assert not leaked
    assert "[redacted]" in everything  # the query token, the Referer key, the LLM URL
