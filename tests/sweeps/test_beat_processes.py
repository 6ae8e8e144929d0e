"""A real Celery worker and beat against MariaDB + Redis: sessions time out, waiting
sessions are promoted and transfers escalate with nobody calling the sweeps by hand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from app.runtime import build_runtime, set_runtime
from app.transfers.models import Transfer
from app.transfers.schemas import TransferRequest
from tests.sessions.helpers import ask

pytestmark = pytest.mark.services

SHORT = {
    "DEFAULT_SESSION_TIMEOUT": "2",
    "PENDING_TIMEOUT": "60",
    "TRANSFER_TIMEOUT": "2",
    "SWEEP_INTERVAL": "1",
    "TRANSFER_SWEEP_INTERVAL": "1",
    "DELIVERY_INTERVAL": "5",
}
ROOT = Path(__file__).resolve().parents[2]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tasks.celery_app:celery", *args],
        cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


def wait_for(check, timeout: float, what: str, logs: list[Path]):  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in logs)
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


@pytest.fixture
def short_runtime(backend, tmp_path, runtime):
    settings = backend.settings(tmp_path, **{k.lower(): float(v) if "INTERVAL" in k else int(v)
                                             for k, v in SHORT.items()})
    rt = build_runtime(settings)
    rt._schema_checked = True
    set_runtime(rt)
    try:
        yield rt
    finally:
        set_runtime(runtime)
        rt.close()


def test_worker_and_beat_time_out_promote_and_escalate(backend, short_runtime, tmp_path):
    rt = short_runtime
    service = rt.sessions
    env = {**backend.env(), **SHORT, "PYTHONPATH": str(ROOT)}
    logs = [tmp_path / "worker.log", tmp_path / "beat.log"]
    worker = start(["worker", "--loglevel", "INFO", "--concurrency", "2", "-n", "swp-test@%h",
                    "--without-mingle", "--without-gossip"], env, logs[0])
    beat = start(["beat", "--loglevel", "INFO", "--schedule", str(tmp_path / "beat-schedule")],
                 env, logs[1])
    try:
        bargain = ask(service, "AUTO_BARGAIN", shop="shop-a").session
        follow = ask(service, "AUTO_FOLLOW_UP", shop="shop-a").session
        assert follow.status == "PENDING"
        robot = ask(service, "AUTO_BARGAIN", shop="shop-b").session
        first = service.transfer(robot.session_id, TransferRequest(reason="asks for a person",
                                                                   urgency=3), actor="bot")

        wait_for(lambda: service.get(bargain.session_id).status == "TIMEOUT", 40,
                 "the idle robot session to time out", logs)
        promoted = wait_for(lambda: service.get(follow.session_id).activated_at, 20,
                            "the waiting session to be promoted", logs)
        assert promoted is not None
        wait_for(lambda: service.get(follow.session_id).status == "TIMEOUT", 20,
                 "the promoted session to time out in turn", logs)

        def chain():
            with rt.database.read() as db:
                rows = db.execute(select(Transfer.status, Transfer.urgency)
                                  .where(Transfer.session_id == robot.session_id)
                                  .order_by(Transfer.id)).all()
            return rows if len(rows) >= 3 else None

        rows = wait_for(chain, 30, "the transfer to escalate twice", logs)
        assert [tuple(r) for r in rows[:3]] == [("EXPIRED", 3), ("EXPIRED", 2),
                                                (rows[2].status, 1)]
        assert service.get_transfer(first.transfer_id).status == "EXPIRED"
        assert service.get(robot.session_id).status == "TRANSFERRED"
    finally:
        stop(beat)
        stop(worker)
    assert worker.returncode is not None and beat.returncode is not None
