"""The Celery application, configured from the same settings as the web app.

With `REDIS_URL` set, Redis is broker and result backend and real workers run the
tasks (`celery -A tasks.celery_app worker`, `… beat`). Without it (the embedded
default) tasks execute in-process, eagerly, so one command runs the whole system.

Task defaults follow production practice: acknowledge late and reject on worker
loss (a killed worker's task is redelivered), bounded time, one task prefetched.
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings, get_settings

# Every module with tasks (and the beat entries next to them); workers and beat import them.
TASK_MODULES = [
    "tasks.imports",
    "tasks.sweeps",
    "tasks.delivery",
    "tasks.detection",
    "tasks.clients",
    "tasks.retention",
]

celery = Celery("auto_session")


def configure(app: Celery, settings: Settings) -> Celery:
    """Apply `settings` to a Celery app (the worker, beat and the web app share this)."""
    app.conf.update(
        broker_url=settings.redis_url or "memory://",
        result_backend=settings.redis_url or "cache+memory://",
        task_always_eager=settings.embedded,
        task_eager_propagates=True,
        task_store_eager_result=False,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_time_limit=600,
        task_soft_time_limit=540,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        timezone="UTC",
        enable_utc=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": 3600},
        result_backend_transport_options={"global_keyprefix": f"{settings.redis_key_prefix}:"},
        task_default_queue="auto-session",
    )
    return app


def runs_in_process() -> bool:
    """The one answer to "eager or real workers?": without Redis (the embedded default)
    tasks run in this process (`task_always_eager`, set above from the settings). The
    dispatcher (`tasks.dispatch`) and the tasks' own retries ask here."""
    return bool(celery.conf.task_always_eager)


def schedule_every(entry: str, task: str, interval: float) -> None:
    """Add a beat entry running `task` every `interval` seconds. A run not started
    within one interval expires: after workers were down, a backlog of identical
    periodic runs is pointless (the next one does the same work)."""
    celery.conf.beat_schedule = {
        **(celery.conf.beat_schedule or {}),
        entry: {"task": task, "schedule": interval, "options": {"expires": interval}},
    }


configure(celery, get_settings())
celery.conf.include = TASK_MODULES

import tasks.observability  # noqa: E402,F401  (metrics, logs and trace ids of the processes)
