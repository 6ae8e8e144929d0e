"""Webhook delivery task (SPEC §6): started after commits that wrote events, by a
scheduled retry when a delivery waits for its backoff, and by beat as a safety net."""

from __future__ import annotations

from typing import Any

from app.config import get_settings
from app.delivery.service import deliver_webhooks, kick_started
from app.runtime import get_runtime
from tasks.celery_app import celery, runs_in_process, schedule_every

TIME_BUDGET = 60.0


@celery.task(name="delivery.deliver", acks_late=True, time_limit=int(TIME_BUDGET) + 90,
             soft_time_limit=int(TIME_BUDGET) + 60)
def deliver_webhooks_task(client_id: str | None = None) -> dict[str, Any]:
    runtime = get_runtime()
    kick_started(runtime)  # before reading the outbox: later commits queue a new run
    report = deliver_webhooks(runtime, client_id=client_id, time_budget=TIME_BUDGET)
    if report.next_due_in is not None and not runs_in_process():
        _schedule_retry(runtime, report.next_due_in)
    return {"clients": report.clients, "fanned_out": report.fanned_out,
            "delivered": report.delivered, "failed_attempts": report.failed_attempts,
            "given_up": report.given_up, "next_due_in": report.next_due_in}


def _schedule_retry(runtime: Any, seconds: float) -> None:
    """One scheduled retry run at a time (a marker key with the same lifetime)."""
    countdown = max(0.5, seconds)
    key = f"{runtime.settings.redis_key_prefix}:delivery:retry-scheduled"
    # (without Redis a marker lasts until taken: there every run schedules its own)
    if runtime.redis is not None and not runtime.markers.claim(key, ttl=countdown):
        return
    deliver_webhooks_task.apply_async(countdown=countdown)


schedule_every("deliver-webhooks", "delivery.deliver", get_settings().delivery_interval)
