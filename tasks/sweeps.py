"""Beat sweeps (SPEC §3.7) as Celery tasks, and their schedule.

The schedule lives here, next to the tasks, with intervals from the settings
(SWEEP_INTERVAL, TRANSFER_SWEEP_INTERVAL). Each scheduled run expires after one
interval: if workers were down, a backlog of identical sweeps is pointless. Two
beat processes by mistake, or many workers, are safe: every sweep takes a run
lock and every change is re-checked under its slot lock.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from app.config import get_settings
from app.runtime import get_runtime
from app.sweeps.service import (
    SweepReport,
    sweep_first_responses,
    sweep_sessions,
    sweep_transfers,
)
from tasks.celery_app import celery, schedule_every

log = logging.getLogger(__name__)

SWEEP_TIME_LIMIT = 300


def _summary(report: SweepReport) -> dict[str, Any]:
    return {"ran": report.ran, "timed_out": len(report.timed_out), "busy": report.busy,
            "refreshed": report.refreshed, "expired_transfers": len(report.expired_transfers),
            "reoffered": len(report.reoffered),
            "first_response_overdue": len(report.first_response_overdue),
            "errors": report.errors,
            "seconds": round(report.seconds, 3)}


@celery.task(name="sweeps.sessions", acks_late=True, time_limit=SWEEP_TIME_LIMIT + 30,
             soft_time_limit=SWEEP_TIME_LIMIT + 15)
def sweep_sessions_task() -> dict[str, Any]:
    """Time out sessions past their deadline (idle robots, stale PENDING, long human)."""
    return _summary(sweep_sessions(get_runtime(), time_budget=SWEEP_TIME_LIMIT))


@celery.task(name="sweeps.transfers", acks_late=True, time_limit=SWEEP_TIME_LIMIT + 30,
             soft_time_limit=SWEEP_TIME_LIMIT + 15)
def sweep_transfers_task() -> dict[str, Any]:
    """Expire, escalate and re-offer transfers nobody accepted within TRANSFER_TIMEOUT;
    flag accepted ones nobody answered within FIRST_RESPONSE_TIMEOUT (SPEC §12)."""
    runtime = get_runtime()
    report = sweep_transfers(runtime)
    report.first_response_overdue = sweep_first_responses(runtime).first_response_overdue
    return _summary(report)


schedule_every("sweep-sessions", "sweeps.sessions", get_settings().sweep_interval)
schedule_every("sweep-transfers", "sweeps.transfers", get_settings().transfer_sweep_interval)


def start_in_process_beat(stop: threading.Event) -> threading.Thread:
    """The embedded default has no beat process: run the periodic work in a thread
    (sweeps, the delivery and detection safety nets, the idempotency and retention purges)
    until `stop` is set; first, once, resume the imports a stopped server left unfinished."""
    from tasks.clients import purge_idempotency_task
    from tasks.delivery import deliver_webhooks_task
    from tasks.detection import MISSED_SWEEP_INTERVAL, sweep_missed_detection
    from tasks.retention import purge_retention_task

    settings = get_settings()
    jobs = [(settings.sweep_interval, sweep_sessions_task),
            (settings.transfer_sweep_interval, sweep_transfers_task),
            (settings.delivery_interval, deliver_webhooks_task),
            (settings.maintenance_interval, purge_idempotency_task),
            (settings.maintenance_interval, purge_retention_task),
            (MISSED_SWEEP_INTERVAL, sweep_missed_detection)]

    def loop() -> None:
        import time

        from tasks.imports import resume_in_process

        try:  # once: the imports a stopped server left unfinished (no worker to resume them)
            resume_in_process()
        except Exception:
            log.exception("in-process beat: unfinished imports could not be resumed")
        due = dict.fromkeys(range(len(jobs)), 0.0)
        while not stop.is_set():
            now = time.monotonic()
            for i, (interval, task) in enumerate(jobs):
                if now >= due[i]:
                    due[i] = now + interval
                    try:
                        task()
                    except Exception:
                        log.exception("in-process beat: %s failed", task.name)
            stop.wait(min(interval for interval, _ in jobs) / 2)

    thread = threading.Thread(target=loop, name="in-process-beat", daemon=True)
    thread.start()
    return thread
