"""Wire the service's after-commit hooks to the tasks (called by the runtime).

- events written → start webhook delivery, only if some client has a webhook and no
  delivery task is already queued (a queued one will read these events too);
- counterpart messages on sessions → transfer detection on those sessions.

With real workers these send Celery tasks. On the embedded default (tasks run
in-process) both run in background threads, so a request never waits for a
receiver's HTTP answer nor for the detection rules (SPEC §5).
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time

from app.delivery.service import any_webhook, claim_kick, deliver_webhooks, kick_started
from app.runtime import Runtime

log = logging.getLogger(__name__)

WEBHOOK_PRESENCE_TTL = 2.0  # seconds


def install_hooks(runtime: Runtime) -> None:
    from tasks.celery_app import celery
    from tasks.delivery import TIME_BUDGET, deliver_webhooks_task
    from tasks.detection import detect_transfers_task, in_process_detection

    def deliver_in_thread() -> None:
        try:
            kick_started(runtime)  # before reading the outbox, as the task does
            deliver_webhooks(runtime, time_budget=TIME_BUDGET)
        except Exception:
            log.exception("in-process webhook delivery failed")

    webhooks_seen = {"at": -1e9, "any": False}

    def some_client_has_a_webhook() -> bool:
        # Asked after every committed change: remember the answer for a moment. A webhook
        # registered meanwhile is served by the next kick or the beat's safety-net run.
        now = time.monotonic()
        if now - webhooks_seen["at"] > WEBHOOK_PRESENCE_TTL:
            with runtime.database.read() as db:
                webhooks_seen["any"] = any_webhook(db)
            webhooks_seen["at"] = now
        return bool(webhooks_seen["any"])

    def events_written() -> None:
        if not some_client_has_a_webhook():
            return
        if not claim_kick(runtime):  # a queued run will read these events too
            return
        try:
            if celery.conf.task_always_eager:
                threading.Thread(target=contextvars.copy_context().run,  # the trace id
                                 args=(deliver_in_thread,), name="webhook-delivery",
                                 daemon=True).start()
            else:
                deliver_webhooks_task.delay()
        except Exception:  # nothing started (no thread, broker down): the next commit tries
            kick_started(runtime)
            raise

    def counterpart_messages(session_ids: list[str]) -> None:
        unique = list(dict.fromkeys(session_ids))
        if not unique:
            return
        if celery.conf.task_always_eager:
            in_process_detection.submit(runtime, unique)
        else:
            detect_transfers_task.delay(unique)

    runtime.hooks.events_written = events_written
    runtime.hooks.counterpart_messages = counterpart_messages
