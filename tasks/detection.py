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

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from app.config import get_settings
from app.detection.service import analyse_with_llm, detect_session, missed_sessions
from app.errors import ServiceUnavailable
from app.runtime import Runtime, get_runtime
from tasks.celery_app import celery, schedule_every

log = logging.getLogger(__name__)

MAX_WAITING = 10_000  # sessions waiting for the in-process thread; beyond, the next message
EXIT_GRACE = 10.0  # seconds a process exiting waits for detection already handed over
# What a detection run retries, with real workers and in-process alike: the database
# or Redis away, a pool with no connection to give, a contended slot (ServiceUnavailable
# is what the services raise for those they recognise; the rest come from the driver).
RETRYABLE: tuple[type[BaseException], ...] = (
    ServiceUnavailable, OperationalError, InterfaceError, PoolTimeout)
MISSED_SWEEP_INTERVAL = 60.0  # seconds between the safety net's looks (beat)
MISSED_PER_TASK = 100  # sessions a detection task sent by the safety net takes
RETRY_DELAY = 0.5  # seconds before an in-process run that found the database away runs again
# (doubled at each further try, as the tasks' `retry_backoff`, as many tries as they get:
# 15.5 s at most, inside the 30 s a test or `drain_in_process` gives them)


@celery.task(name="detection.detect", acks_late=True, time_limit=120, soft_time_limit=100,
             autoretry_for=RETRYABLE, retry_backoff=True, max_retries=5)
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


@celery.task(name="detection.sweep_missed", acks_late=True, time_limit=120,
             soft_time_limit=100)
def sweep_missed_detection() -> list[str]:
    """The beat's safety net: detection for the ACTIVE robot sessions with a counterpart
    message no run has judged (`missed_sessions`) — a detection task still queued when
    Redis restarted without its data, or an in-process queue killed with its process, is
    otherwise only made up for by the session's next counterpart message."""
    runtime = get_runtime()
    missed = missed_sessions(runtime)
    if missed:
        log.info("detection: %d sessions with counterpart messages no run has judged; "
                 "judging them now", len(missed))
        for start in range(0, len(missed), MISSED_PER_TASK):
            runtime.dispatcher.detect_transfers(missed[start:start + MISSED_PER_TASK])
    return missed


schedule_every("detection-missed", "detection.sweep_missed", MISSED_SWEEP_INTERVAL)


@celery.task(name="detection.analyse_llm", acks_late=True,
             time_limit=int(get_settings().llm_timeout) + 60,
             soft_time_limit=int(get_settings().llm_timeout) + 45,
             autoretry_for=RETRYABLE, retry_backoff=True, max_retries=3)
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

    A run that fails with one of `retry_on` (the database away: what the Celery tasks
    retry) is queued again after `retry_delay` seconds, doubled at each further failure,
    at most `retries` times; then, as after any other failure, the session is judged
    with its next message (logged).
    """

    def __init__(self, name: str, work: Callable[[Runtime, str], object], *,
                 max_waiting: int = MAX_WAITING,
                 retry_on: tuple[type[BaseException], ...] = (), retries: int = 0,
                 retry_delay: float = RETRY_DELAY) -> None:
        self.name = name
        self._work = work
        self._max_waiting = max_waiting
        self._retry_on = retry_on
        self._retries = retries
        self._retry_delay = retry_delay
        self._waiting: dict[tuple[int, str], Runtime] = {}  # insertion-ordered
        self._failed: dict[tuple[int, str], int] = {}  # failed runs of sessions retried
        self._retrying = 0  # retries waiting for their delay
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
            except self._retry_on as exc:
                self._retry_later(runtime, session_id, exc)
            except Exception:  # the mark did not move: the session's next message retries
                log.exception("%s: %s failed", self.name, session_id)
            else:
                if self._failed:
                    with self._changed:
                        self._failed.pop((id(runtime), session_id), None)

    def _retry_later(self, runtime: Runtime, session_id: str, exc: BaseException) -> None:
        key = (id(runtime), session_id)
        with self._changed:
            failed = self._failed.get(key, 0) + 1
            if failed > self._retries:
                self._failed.pop(key, None)
                log.error("%s: %s failed %d times (%s); it is judged with its next message",
                          self.name, session_id, failed, exc)
                return
            self._failed[key] = failed
            self._retrying += 1
        delay = self._retry_delay * 2 ** (failed - 1)
        log.warning("%s: %s failed (%s); tried again in %.1f s", self.name, session_id,
                    exc, delay)
        timer = threading.Timer(delay, self._queue_again, (runtime, session_id))
        timer.daemon = True
        timer.start()

    def _queue_again(self, runtime: Runtime, session_id: str) -> None:
        with self._changed:  # a re-entrant lock: `submit` takes it too
            self.submit(runtime, [session_id])
            self._retrying -= 1
            self._changed.notify_all()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing waits (retries included) and the thread has ended; False
        on timeout."""
        with self._changed:
            return self._changed.wait_for(
                lambda: not self._waiting and self._thread is None and not self._retrying,
                timeout)


def _detect_in_process(runtime: Runtime, session_id: str) -> None:
    detect_session(runtime, session_id,
                   request_llm=lambda sid: llm_analyses.submit(runtime, [sid]))


def _analyse_in_process(runtime: Runtime, session_id: str) -> None:
    analyse_with_llm(runtime, session_id)


# retried as their tasks are (`autoretry_for=RETRYABLE`, 5 and 3 retries)
in_process_detection = SessionQueue("transfer-detection", _detect_in_process,
                                    retry_on=RETRYABLE, retries=5)
llm_analyses = SessionQueue("llm-analysis", _analyse_in_process, retry_on=RETRYABLE,
                            retries=3)


def drain_in_process(timeout: float = 30.0) -> bool:
    """Wait for the in-process detection (and the LLM analyses it asked for) to finish:
    at exit, and for callers that must see the verdict. False on timeout."""
    return in_process_detection.drain(timeout) and llm_analyses.drain(timeout)


atexit.register(drain_in_process, EXIT_GRACE)
