"""Transfer detection tasks (SPEC §5): rules on new counterpart messages, then the
optional LLM analysis as its own task with its own time limit."""

from __future__ import annotations

from typing import Any

from app.config import get_settings
from app.detection.service import analyse_with_llm, detect_session
from app.errors import ServiceUnavailable
from app.runtime import get_runtime
from tasks.celery_app import celery


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
