"""Transfer detection tasks (SPEC §5): rules on new counterpart messages, then the
optional LLM analysis as its own task with its own time limit.

With real workers the dispatcher (`tasks.dispatch`) sends `detect_transfers_task`. On the
embedded default (tasks in-process) detection must not run inside the client's
request either: `in_process_detection` hands the sessions to one background thread
(and the LLM analyses to another, so a slow model never delays the rules).
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from app.config import get_settings
from app.detection.service import analyse_with_llm, detect_session
from app.errors import ServiceUnavailable
from app.runtime import Runtime, get_runtime
from tasks.celery_app import celery

log = logging.getLogger(__name__)

MAX_WAITING = 10_000  # sessions waiting for the in-process thread; beyond, the next message
EXIT_GRACE = 10.0  # seconds a process exiting waits for detection already handed over


@celery.task(name="detection.detect", acks_late=True, time_limit=120, soft_time_limit=100,
             autoretry_for=(ServiceUnavailable,), retry_backoff=True, max_retries=5)
def detect_transfers_task(session_ids: list[str]) -> list[dict[str, Any]]:
    """Judge the new messages of each session; a hit transfers it to the desk."""
    runtime = get_runtime()
    results = []
    for session_id in dict.fromkeys(session_ids):
        outcome = detect_session(runtime, session_id,
                                 request_llm=lambda sid: analyse_llm_task.delay(sid))
        results.append({
            "session_id": session_id, "examined": outcome.examined,
            "rule": outcome.verdict.rule_id if outcome.verdict else None,
            "transfer_id": outcome.transfer.transfer_id if outcome.transfer else None,
            "llm_requested": outcome.llm_requested,
        })
    return results


@celery.task(name="detection.analyse_llm", acks_late=True,
             time_limit=int(get_settings().llm_timeout) + 60,
             soft_time_limit=int(get_settings().llm_timeout) + 45,
             autoretry_for=(ServiceUnavailable,), retry_backoff=True, max_retries=3)
def analyse_llm_task(session_id: str) -> dict[str, Any]:
    """Ask the configured LLM; a timeout or a bad answer leaves the rules' verdict."""
    outcome = analyse_with_llm(get_runtime(), session_id)
    return {"session_id": session_id, "skipped": outcome.skipped,
            "transfer_id": outcome.transfer.transfer_id if outcome.transfer else None}


class SessionQueue:
    """One background thread working through sessions, oldest first: the embedded
    default's stand-in for a worker.

    Bursts coalesce: a session already waiting is not queued again, because its run
    reads every message since the detection mark. A session whose run has started is
    queued again (the run may have read before the new message). At most
    `max_waiting` sessions wait; beyond that a session is judged with its next
    message (logged). The thread starts on demand and ends when the queue is empty.
    """

    def __init__(self, name: str, work: Callable[[Runtime, str], object], *,
                 max_waiting: int = MAX_WAITING) -> None:
        self.name = name
        self._work = work
        self._max_waiting = max_waiting
        self._waiting: dict[tuple[int, str], Runtime] = {}  # insertion-ordered
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, runtime: Runtime, session_ids: Iterable[str]) -> None:
        with self._changed:
            for session_id in session_ids:
                key = (id(runtime), session_id)  # the runtime is referenced while it waits
                if key in self._waiting:
                    continue
                if len(self._waiting) >= self._max_waiting:
                    log.warning("%s: %d sessions waiting; %s is judged with its next message",
                                self.name, len(self._waiting), session_id)
                    continue
                self._waiting[key] = runtime
            if self._waiting and self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._waiting:
                    self._thread = None
                    self._changed.notify_all()
                    return
                (_, session_id), runtime = next(iter(self._waiting.items()))
                del self._waiting[(id(runtime), session_id)]
            try:
                self._work(runtime, session_id)
            except Exception:  # the mark did not move: the session's next message retries
                log.exception("%s: %s failed", self.name, session_id)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits and the thread has ended; False on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._waiting and self._thread is None, timeout)


def _detect_in_process(runtime: Runtime, session_id: str) -> None:
    detect_session(runtime, session_id,
                   request_llm=lambda sid: llm_analyses.submit(runtime, [sid]))


def _analyse_in_process(runtime: Runtime, session_id: str) -> None:
    analyse_with_llm(runtime, session_id)


in_process_detection = SessionQueue("transfer-detection", _detect_in_process)
llm_analyses = SessionQueue("llm-analysis", _analyse_in_process)


def drain_in_process(timeout: float = 30.0) -> bool:
    """Wait for the in-process detection (and the LLM analyses it asked for) to finish:
    at exit, and for callers that must see the verdict. False on timeout."""
    return in_process_detection.drain(timeout) and llm_analyses.drain(timeout)


atexit.register(drain_in_process, EXIT_GRACE)
