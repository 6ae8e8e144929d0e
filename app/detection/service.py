"""Transfer detection on counterpart messages of ACTIVE robot sessions (SPEC §5).

Rules first, always: a hit transfers the session at once through
`SessionService.transfer` (trigger keyword / robot_failure, actor
`system:detector`) with the full context of §3.6. With no hit and an LLM
configured, the caller is asked to schedule the LLM analysis (a Celery task in
production); its verdict can transfer the session too (trigger llm). Each message
is judged once: a per-session mark remembers the last message examined.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.db import affected_rows, utcnow
from app.detection import llm
from app.detection.models import DetectionMark
from app.detection.rules import ChatLine, RuleVerdict, judge_conversation
from app.errors import Conflict, NotFound
from app.messages.models import Message
from app.runtime import Runtime
from app.sessions.enums import ROBOT_TYPES, Priority, SenderRole, SessionStatus
from app.sessions.models import Session
from app.transfers.enums import TransferTrigger
from app.transfers.schemas import TransferRequest, TransferView

log = logging.getLogger(__name__)

ACTOR = "system:detector"
RECENT = 20  # messages of context for repetition and for the LLM
NEW_LIMIT = 200  # new messages judged per run (an import can add many at once)
MISSED_BATCH = 1000  # sessions the safety net sends again per run
# how recently active a session must be for the safety net to look at it (it runs every
# minute: a lost run is made up for within a minute or two)
MISSED_WINDOW = timedelta(minutes=10)


@dataclass
class DetectionOutcome:
    session_id: str
    examined: int = 0
    verdict: RuleVerdict | None = None
    transfer: TransferView | None = None
    llm_requested: bool = False
    skipped: str | None = None  # why nothing was judged


def _is_watched(session: Session) -> bool:
    return session.status == SessionStatus.ACTIVE and session.session_type.is_robot


def _lines(rows: Sequence[Message]) -> list[ChatLine]:
    return [ChatLine(pk=m.id, message_id=m.message_id, sender_role=str(m.sender_role),
                     content=m.content, sender_id=m.sender_id) for m in rows]


def _recent(db: Any, session_pk: int) -> list[ChatLine]:
    rows = db.execute(
        select(Message).where(Message.session_pk == session_pk)
        .order_by(Message.id.desc()).limit(RECENT)
    ).scalars().all()
    return _lines(list(reversed(rows)))


def _advance_mark(runtime: Runtime, session_pk: int, last_pk: int, seen: int | None) -> None:
    """Remember `last_pk` as examined and, given `seen`, that the session's first `seen`
    counterpart messages were judged (neither ever moving backwards)."""
    mark = DetectionMark
    values: dict[str, Any] = {
        "last_message_pk": case((mark.last_message_pk < last_pk, last_pk),
                                else_=mark.last_message_pk),
        "updated_at": utcnow()}
    if seen is not None:
        values["counterpart_seen"] = case((mark.counterpart_seen < seen, seen),
                                          else_=mark.counterpart_seen)
    with runtime.database.unit_of_work() as uow:
        changed = affected_rows(uow.session.execute(
            update(mark).where(mark.session_pk == session_pk,
                               or_(mark.last_message_pk < last_pk,
                                   mark.counterpart_seen < (seen or 0)))
            .values(values)
        ))
        if not changed and uow.session.get(DetectionMark, session_pk) is None:
            uow.session.add(DetectionMark(session_pk=session_pk, last_message_pk=last_pk,
                                          counterpart_seen=seen or 0, updated_at=utcnow()))
        # IntegrityError: another run created the mark at the same time; it is as far.
        with contextlib.suppress(IntegrityError):
            uow.commit()


def transfer_request(
    session: Session, *, reason: str, urgency: int, trigger: TransferTrigger,
    suggestion: str | None, details: dict[str, Any], recent: Sequence[ChatLine],
) -> TransferRequest:
    """The §3.6 context: reason, trigger, urgency, the robot's task state, counterpart
    info and a suggestion (the service adds the conversation history itself)."""
    counterpart_ids = sorted({line.sender_id for line in recent
                              if line.sender_role == SenderRole.COUNTERPART and line.sender_id})
    return TransferRequest(
        reason=reason[:2000],
        urgency=Priority(urgency),
        trigger=trigger,
        task_state={"task_type": str(session.task_type), "owner_id": session.owner_id,
                    "context": session.context, "detection": details},
        customer_info={"account_id": session.account_id, "shop_id": session.shop_id,
                       "counterpart_ids": counterpart_ids},
        suggestion=(suggestion or None) and suggestion[:4000],
    )


def _transfer(runtime: Runtime, session: Session, request: TransferRequest) -> TransferView | None:
    try:
        return runtime.sessions.transfer(session.session_id, request, actor=ACTOR)
    except (Conflict, NotFound) as exc:  # paused, completed or transferred meanwhile
        log.info("detector: %s not transferred: %s", session.session_id, exc)
        return None


def detect_session(
    runtime: Runtime,
    session_id: str,
    *,
    request_llm: Callable[[str], object] | None = None,
) -> DetectionOutcome:
    """Judge the session's messages that arrived since the last run."""
    outcome = DetectionOutcome(session_id)
    with runtime.database.read() as db:
        session = db.execute(
            select(Session).where(Session.session_id == session_id)
        ).scalar_one_or_none()
        if session is None or not _is_watched(session):
            outcome.skipped = "not an ACTIVE robot session"
            return outcome
        # read before the messages (a message and the count that includes it commit
        # together): every counterpart message this count includes is read below
        counted = session.counterpart_message_count
        mark = db.get(DetectionMark, session.id)
        after = mark.last_message_pk if mark else 0
        new = _lines(db.execute(
            select(Message).where(Message.session_pk == session.id, Message.id > after)
            .order_by(Message.id).limit(NEW_LIMIT)
        ).scalars().all())
        recent = _recent(db, session.id)
    outcome.examined = len(new)
    # all of them judged by this run, unless it took only the first NEW_LIMIT
    seen = counted if len(new) < NEW_LIMIT else None
    if not new:
        if seen is not None and seen > (mark.counterpart_seen if mark else 0):
            _advance_mark(runtime, session.id, after, seen)
        return outcome
    verdict = judge_conversation(new, recent)
    outcome.verdict = verdict
    if verdict is not None:
        log.info("detector: %s hits %s (%r)", session_id, verdict.rule_id, verdict.matched)
        outcome.transfer = _transfer(runtime, session, transfer_request(
            session, reason=verdict.reason, urgency=verdict.urgency, trigger=verdict.trigger,
            suggestion=verdict.suggestion, details=verdict.as_details(), recent=recent,
        ))
    elif request_llm is not None and llm_configured(runtime) and any(
        line.sender_role == SenderRole.COUNTERPART for line in new
    ):
        request_llm(session_id)
        outcome.llm_requested = True
    _advance_mark(runtime, session.id, max(line.pk for line in new), seen)
    return outcome


def missed_sessions(runtime: Runtime, limit: int = MISSED_BATCH,
                    window: timedelta = MISSED_WINDOW) -> list[str]:
    """ACTIVE robot sessions active within `window` with a counterpart message no
    detection run has judged yet (the session's counterpart count past its mark's):
    their run was lost — a broker restarted without its data, a process killed with its
    queue — or is on its way (a second run then finds nothing new). Oldest first, at
    most `limit`. An ACTIVE robot session's deadline is its last activity plus
    DEFAULT_SESSION_TIMEOUT, so "active within `window`" is a range of the status and
    deadline index: the look costs the recently active sessions, not all the live ones."""
    s, mark = Session, DetectionMark
    since = utcnow() + timedelta(seconds=runtime.settings.default_session_timeout) - window
    with runtime.database.read() as db:
        return list(db.execute(
            select(s.session_id).outerjoin(mark, mark.session_pk == s.id)
            .where(s.status == SessionStatus.ACTIVE, s.deadline_at >= since,
                   s.session_type.in_(sorted(ROBOT_TYPES)),
                   s.counterpart_message_count > func.coalesce(mark.counterpart_seen, 0))
            .order_by(s.id).limit(limit)
        ).scalars())


def llm_configured(runtime: Runtime) -> bool:
    return bool(runtime.settings.llm_base_url and runtime.settings.llm_model)


def analyse_with_llm(runtime: Runtime, session_id: str) -> DetectionOutcome:
    """Ask the LLM about the session's recent conversation; transfer if it says so.

    Any failure is logged and leaves the rules' verdict (no transfer) standing."""
    outcome = DetectionOutcome(session_id)
    settings = runtime.settings
    if not llm_configured(runtime):
        outcome.skipped = "LLM not configured"
        return outcome
    with runtime.database.read() as db:
        session = db.execute(
            select(Session).where(Session.session_id == session_id)
        ).scalar_one_or_none()
        if session is None or not _is_watched(session):
            outcome.skipped = "not an ACTIVE robot session"
            return outcome
        recent = _recent(db, session.id)
    outcome.examined = len(recent)
    try:
        verdict = llm.analyse(
            recent, base_url=settings.llm_base_url or "", model=settings.llm_model or "",
            api_key=settings.llm_api_key, timeout=settings.llm_timeout,
        )
    except llm.LlmUnavailable as exc:
        log.warning("detector: LLM gave no verdict for %s, rules' verdict stands: %s",
                    session_id, exc)
        outcome.skipped = f"LLM unavailable: {exc}"
        return outcome
    if not verdict.need_human:
        return outcome
    outcome.verdict = RuleVerdict(
        rule_id="llm", intent="llm", trigger=TransferTrigger.LLM, urgency=verdict.urgency,
        reason=verdict.reason or "LLM: a human should take over",
        suggestion=verdict.suggestion or "", matched="", message_id=None,
    )
    outcome.transfer = _transfer(runtime, session, transfer_request(
        session, reason=outcome.verdict.reason, urgency=verdict.urgency,
        trigger=TransferTrigger.LLM, suggestion=verdict.suggestion,
        details={"analyser": "llm", "model": settings.llm_model,
                 "verdict": verdict.model_dump()}, recent=recent,
    ))
    return outcome
