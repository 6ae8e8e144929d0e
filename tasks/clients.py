"""Periodic housekeeping of API-client data: stored Idempotency-Key answers.

A create's answer is kept `IDEMPOTENCY_TTL` seconds so that a bot retrying after a
network cut gets the same session back; beyond that a key is forgotten (a reuse is
a new request). Beat purges the old answers every `MAINTENANCE_INTERVAL`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from app.clients.idempotency import IdempotencyStore
from app.config import get_settings
from app.runtime import get_runtime
from tasks.celery_app import celery, schedule_every


@celery.task(name="clients.purge_idempotency", acks_late=True, time_limit=600,
             soft_time_limit=540)
def purge_idempotency_task() -> dict[str, Any]:
    """Delete Idempotency-Key answers older than IDEMPOTENCY_TTL (safe to run twice)."""
    runtime = get_runtime()
    purged = IdempotencyStore(runtime.database).purge(
        older_than=timedelta(seconds=runtime.settings.idempotency_ttl))
    return {"purged": purged}


schedule_every("purge-idempotency", "clients.purge_idempotency",
               get_settings().maintenance_interval)
