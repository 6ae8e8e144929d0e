"""The live path (SPEC §4 step 5, §3.5): a slot whose plan touches anything live — a
segment still going on, an open session, staff on an ACTIVE robot session — applied
inside `SessionService.run_on_slot` (a SlotTx), so the slot lock, the fence and the
conflict rules apply exactly as for a request."""

from __future__ import annotations

from typing import Any

from app.audit.operations import AuditOperation
from app.events.types import EventType
from app.fastsql import core_insert
from app.ids import new_id
from app.imports.counts import ImportCounts
from app.imports.planning import Attach, FreeChat, NewSession, Step
from app.imports.rows import Msg
from app.imports.writing import Writer, add_to_session, message_values
from app.messages.models import Message
from app.sessions import rules
from app.sessions.enums import Origin, Priority, SenderRole, SessionStatus
from app.sessions.models import Session
from app.transfers.enums import TransferTrigger
from app.transfers.schemas import TransferRequest

S = SessionStatus


def apply_live_slot(tx: Any, steps: list[Step], *, job_id: str | None,
                    counts: ImportCounts, batch: int | None = None) -> None:
    """Apply a slot's plan inside `SessionService.run_on_slot` (a SlotTx)."""
    writer = Writer(tx.db, now=tx.now, actor=tx.actor, job_id=job_id, batch=batch)
    for step in steps:
        if isinstance(step, NewSession):
            if step.closed:
                writer.closed_session(step)
            else:
                _live_session(tx, writer, step, counts)
        elif isinstance(step, Attach):
            if step.target.is_open:
                _attach_open(tx, writer, step.target.pk, step.messages, counts)
            else:
                writer.attach_closed(step.target, step.messages)
        else:
            if step.before:
                _attach_open(tx, writer, step.robot.pk, step.before, counts)
            _free_chat(tx, writer, step, counts)
    writer.flush()
    counts.add(writer.counts)


def _store_on(tx: Any, writer: Writer, session: Session, msgs: list[Msg]) -> None:
    core_insert(tx.db, Message, [message_values(m, session.id, tx.now, writer.job_id)
                                 for m in msgs], batch=writer.batch)
    add_to_session(session, msgs)
    writer.counts.inserted += len(msgs)


def _attach_open(tx: Any, writer: Writer, pk: int, msgs: list[Msg],
                 counts: ImportCounts) -> None:
    session = tx.db.get(Session, pk)
    _store_on(tx, writer, session, msgs)
    last = max(m.sent_at for m in msgs)
    if last > session.last_activity_at:
        session.last_activity_at = last
        session.deadline_at = tx.service.deadline_for(session, tx.now)
    tx.audit(session, AuditOperation.IMPORT_MESSAGES, from_status=session.status,
             reason="history import",
             details={"job_id": writer.job_id, "messages": len(msgs)})
    counts.sessions_updated += 1
    if (session.status == S.ACTIVE and session.session_type.is_robot
            and any(m.sender_role == SenderRole.COUNTERPART for m in msgs)
            and session.session_id not in tx.counterpart_sessions):
        tx.counterpart_sessions.append(session.session_id)


def _new_live_row(tx: Any, plan: NewSession, job_id: str | None) -> Session:
    session = Session(
        session_id=new_id("ses"), account_id=tx.account_id, shop_id=tx.shop_id,
        session_type=plan.session_type, task_type=plan.task_type,
        priority=int(rules.default_priority(plan.session_type, plan.task_type)),
        status=S.PENDING, owner_id=plan.owner_id,
        assigned_agent_id=plan.owner_id if plan.session_type.is_human else None,
        origin=Origin.IMPORT, created_at=plan.start, requested_at=tx.now,
        last_activity_at=plan.end, reason="history import", message_count=0,
        robot_message_count=0, human_message_count=0, counterpart_message_count=0,
        unanswered=plan.unanswered,
        started_by=str(plan.started_by) if plan.started_by else None, thread_id=plan.thread_id,
    )
    session.deadline_at = tx.service.deadline_for(session, tx.now)
    tx.db.add(session)
    tx.db.flush()
    tx.audit(session, AuditOperation.CREATE, from_status=None, reason="history import",
             details={"job_id": job_id, "origin": "import",
                      "first_message_at": plan.start.isoformat()})
    return session


def _live_session(tx: Any, writer: Writer, plan: NewSession, counts: ImportCounts) -> None:
    """A segment still going on joins the slot rules like any request (§3.5)."""
    session = _new_live_row(tx, plan, writer.job_id)
    occupant = tx.occupant()
    tx.claim_or_wait(session)
    if occupant is not None:
        counts.conflicts += 1
    _store_on(tx, writer, session, plan.messages)
    if session.status == S.ACTIVE:
        session.last_activity_at = max(plan.end, session.activated_at or plan.end)
    session.deadline_at = tx.service.deadline_for(session, tx.now)
    if session.status == S.PENDING:
        tx.event(EventType.SESSION_QUEUED, session, {"origin": "import",
                                              "occupant_session_id": occupant.session_id
                                              if occupant else None})
    if plan.handoff_at is not None and session.status == S.ACTIVE:
        tx.service.open_transfer(tx, session, TransferRequest(
            reason="hand-off found in imported history", urgency=Priority.HIGH,
            trigger=TransferTrigger.HISTORY,
            agent_id=plan.messages[plan.handoff_at].sender_id,
        ))
    counts.sessions_created += 1
    if (session.status == S.ACTIVE and session.session_type.is_robot
            and any(m.sender_role == SenderRole.COUNTERPART for m in plan.messages)):
        tx.counterpart_sessions.append(session.session_id)


def _free_chat(tx: Any, writer: Writer, step: FreeChat, counts: ImportCounts) -> None:
    """Case 1 for staff found talking during an ACTIVE robot session: the robot is
    paused (and told, through the outbox), a human session is recorded; if the staff
    conversation is already over, that human session completes and the robot resumes."""
    plan = step.human
    human = _new_live_row(tx, plan, writer.job_id)
    tx.claim_or_wait(human)  # human outranks robot: the robot is preempted (PAUSED)
    counts.conflicts += 1
    _store_on(tx, writer, human, plan.messages)
    human.last_activity_at = plan.end
    human.deadline_at = tx.service.deadline_for(human, tx.now)
    robot = tx.db.get(Session, step.robot.pk)
    tx.audit(robot, AuditOperation.IMPORT_CONFLICT, from_status=robot.status,
             reason="staff messages found in history while the robot session was active",
             details={"human_session_id": human.session_id, "job_id": writer.job_id})
    counts.sessions_created += 1
    counts.sessions_updated += 1
    if plan.closed and human.status.occupies_slot:
        tx.leave_slot(human, S.COMPLETED, operation=AuditOperation.COMPLETE,
                      event=EventType.SESSION_COMPLETED,
                      reason="history import: staff conversation already over")
