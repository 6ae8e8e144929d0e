"""The task layer behind `app.dispatch.Dispatcher`: Celery tasks for real workers, or
threads of this process on the embedded default (tasks run eagerly there, yet a request
never waits for a receiver's HTTP answer, the detection rules nor an import: SPEC §5).

`dispatcher_for` picks one by `runs_in_process()`; the composition root (`app.bootstrap`)
gives it to the runtime.
"""

from __future__ import annotations

import contextvars
import logging
import threading

from app.delivery.service import deliver_webhooks, kick_started
from app.dispatch import Dispatcher
from app.runtime import Runtime
from tasks.celery_app import runs_in_process
from tasks.delivery import TIME_BUDGET, deliver_webhooks_task
from tasks.detection import detect_transfers_task, in_process_detection
from tasks.imports import prepare_import_task, start_in_process

log = logging.getLogger(__name__)

DELIVERY_THREAD = "webhook-delivery"  # the name of an in-process delivery run's thread


class CeleryDispatcher:
    """Real workers: each piece of work is a Celery task on the broker."""

    in_process = False

    def deliver_webhooks(self) -> None:
        deliver_webhooks_task.delay()

    def detect_transfers(self, session_ids: list[str]) -> None:
        detect_transfers_task.delay(session_ids)

    def start_import(self, job_id: str) -> None:
        prepare_import_task.delay(job_id)


class InProcessDispatcher:
    """The embedded default: background threads of this process stand in for workers."""

    in_process = True

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def deliver_webhooks(self) -> None:
        threading.Thread(target=contextvars.copy_context().run,  # the trace id
                         args=(self._deliver,), name=DELIVERY_THREAD, daemon=True).start()

    def _deliver(self) -> None:
        try:
            kick_started(self.runtime)  # before reading the outbox, as the task does
            deliver_webhooks(self.runtime, time_budget=TIME_BUDGET)
        except Exception:
            log.exception("in-process webhook delivery failed")

    def detect_transfers(self, session_ids: list[str]) -> None:
        in_process_detection.submit(self.runtime, session_ids)

    def start_import(self, job_id: str) -> None:
        start_in_process(job_id)


def dispatcher_for(runtime: Runtime) -> Dispatcher:
    """The dispatcher of this process: in-process on the embedded default, else Celery."""
    return InProcessDispatcher(runtime) if runs_in_process() else CeleryDispatcher()
