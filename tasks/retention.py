"""Retention purge (SPEC §6, §13) as a beat task: old events, webhook deliveries and
their attempts, expired console log-ins and staged data of ended import jobs, every
`MAINTENANCE_INTERVAL`, in bounded batches (app.retention.service)."""

from __future__ import annotations

from typing import Any

from app.config import get_settings
from app.coordination.run_locks import run_lock
from app.retention.service import purge_expired
from app.runtime import get_runtime
from tasks.celery_app import celery, schedule_every

TIME_BUDGET = 300.0


@celery.task(name="retention.purge", acks_late=True, time_limit=int(TIME_BUDGET) + 120,
             soft_time_limit=int(TIME_BUDGET) + 90)
def purge_retention_task() -> dict[str, Any]:
    """Purge what is past retention (safe to run twice; one run at a time)."""
    runtime = get_runtime()
    settings = runtime.settings
    name = f"{settings.redis_key_prefix}:retention:run"
    with run_lock(runtime.redis, name, ttl=TIME_BUDGET + 120) as mine:
        if not mine:
            return {"ran": False}
        report = purge_expired(runtime.database, events_retention=settings.events_retention,
                               deliveries_retention=settings.deliveries_retention,
                               time_budget=TIME_BUDGET)
    return {"ran": True, **report.as_dict()}


schedule_every("purge-retention", "retention.purge", get_settings().maintenance_interval)
