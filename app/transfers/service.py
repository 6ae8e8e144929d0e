"""Transfers to the human desk and back (SPEC §3.6, §12), each one slot transaction.

A robot hands its session to a person (`transfer`: the session becomes TRANSFERRED
and keeps the slot, the desk is offered the transfer); the first agent to accept it
wins; an open transfer can be reassigned; the desk hands the session back
(`hand_back`), completing it and, with `needs_robot`, starting a new robot session
for the bot. The sweep's expiry and escalation live in `app.transfers.expiry`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from app.audit.operations import AuditOperation
from app.errors import AlreadyAccepted, Conflict, InvalidTransition, NotAssignee, NotFound
from app.events.outbox import Audience
from app.events.types import EventType
from app.ids import new_id
from app.messages.models import Message
from app.sessions import rules
from app.sessions.enums import Origin, SessionStatus
from app.sessions.models import Session
from app.sessions.runner import SlotTransactions
from app.sessions.schemas import SessionView
from app.sessions.slot_tx import Guard, SlotTx, precedence_of
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer, transfer_values
from app.transfers.routing import choose_agent
from app.transfers.schemas import (
    HandBackOutcome,
    HandBackRequest,
    TransferRequest,
    TransferView,
)

HISTORY_SNAPSHOT = 50
S = SessionStatus


class TransferService:
    """Every transfer operation; it changes the slot through the session service's
    slot transactions (`SlotTransactions.run_on_session`)."""

    def __init__(self, *, slots: SlotTransactions) -> None:
        self.slots = slots
        self.settings = slots.settings

    def get(self, transfer_id: str) -> TransferView:
        with self.slots.database.read() as db:
            row = db.execute(
                select(Transfer).where(Transfer.transfer_id == transfer_id)
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"transfer {transfer_id} not found")
            return TransferView.model_validate(row)

    def transfer(
        self, session_id: str, request: TransferRequest, *, actor: str,
        guard: Guard | None = None,
    ) -> TransferView:
        """SPEC §3.6 in one atomic step: record, TRANSFERRED (keeps the slot), tell the
        robot to leave, offer the desk."""

        def work(tx: SlotTx, session: Session) -> TransferView:
            rules.check_transition(session.status, S.TRANSFERRED)
            return self.open_transfer(tx, session, request)

        return self.slots.run_on_session(session_id, actor, work, guard)

    def open_transfer(
        self, tx: SlotTx, session: Session, request: TransferRequest
    ) -> TransferView:
        """Inside `tx`: record the transfer, make `session` TRANSFERRED (it keeps the
        slot), tell the robot to leave and offer the desk (also the import's live path)."""
        offered = choose_agent(
            tx.db,
            requested_agent_id=request.agent_id,
            skill=str(session.task_type),
            default_capacity=self.settings.max_concurrent_sessions,
        )
        history = self._history_snapshot(tx.db, session)
        transfer = Transfer(**transfer_values(
            session_pk=session.id,
            session_id=session.session_id,
            urgency=int(request.urgency),
            reason=request.reason,
            trigger=request.trigger,
            requested_agent_id=request.agent_id,
            offered_agent_id=offered,
            history=history,
            task_state=request.task_state,
            customer_info=request.customer_info,
            suggestion=request.suggestion,
            at=tx.now,
            expires_at=tx.now + timedelta(seconds=self.settings.transfer_timeout),
        ))
        tx.db.add(transfer)
        session.last_activity_at = tx.now
        tx.set_status(
            session, S.TRANSFERRED, operation=AuditOperation.TRANSFER,
            event=EventType.SESSION_TRANSFERRED,
            reason=request.reason,
            details={"transfer_id": transfer.transfer_id, "trigger": str(request.trigger),
                     "urgency": int(request.urgency), "offered_agent_id": offered},
            event_data={"transfer_id": transfer.transfer_id, "leave": True},
        )
        tx.event(EventType.TRANSFER_OFFERED, session, {
            "transfer_id": transfer.transfer_id, "urgency": int(request.urgency),
            "reason": request.reason, "trigger": str(request.trigger),
            "offered_agent_id": offered,
        }, audience=Audience.DESK)
        tx.db.flush()
        return TransferView.model_validate(transfer)

    @staticmethod
    def _history_snapshot(db: DbSession, session: Session) -> dict[str, Any]:
        rows = db.execute(
            select(Message)
            .where(Message.session_pk == session.id)
            .order_by(Message.sent_at.desc(), Message.id.desc())
            .limit(HISTORY_SNAPSHOT)
        ).scalars().all()
        return {
            "session_id": session.session_id,
            "message_count": session.message_count,
            "recent": [
                {"message_id": m.message_id, "sender_role": str(m.sender_role),
                 "content": m.content, "sent_at": m.sent_at.isoformat()}
                for m in reversed(rows)
            ],
        }

    def accept(self, transfer_id: str, *, agent_id: str, actor: str) -> TransferView:
        """The first agent to accept wins; the claim is a conditional UPDATE."""
        session_id = self.get(transfer_id).session_id

        def work(tx: SlotTx, session: Session) -> TransferView:
            transfer = tx.db.execute(
                select(Transfer).where(Transfer.transfer_id == transfer_id)
            ).scalar_one()
            if transfer.status != TransferStatus.PENDING:
                raise_already_taken(transfer)
            transfer.status = TransferStatus.ACCEPTED
            transfer.agent_id = agent_id
            transfer.accepted_at = tx.now
            transfer.first_response_due_at = tx.now + timedelta(
                seconds=self.settings.first_response_timeout)
            session.assigned_agent_id = agent_id
            session.last_activity_at = tx.now
            session.deadline_at = self.slots.deadline_for(session, tx.now)
            tx.audit(session, AuditOperation.TRANSFER_ACCEPT, from_status=session.status,
                     actor=actor, details={"transfer_id": transfer_id, "agent_id": agent_id})
            tx.event(EventType.TRANSFER_ACCEPTED, session,
                     {"transfer_id": transfer_id, "agent_id": agent_id}, audience=Audience.DESK)
            tx.event(EventType.TRANSFER_ACCEPTED, session,
                     {"transfer_id": transfer_id, "agent_id": agent_id},
                     audience=Audience.OWNER)
            tx.db.flush()
            return TransferView.model_validate(transfer)

        return self.slots.run_on_session(session_id, actor, work)

    def reassign(
        self, transfer_id: str, *, agent_id: str, actor: str, reason: str | None = None,
    ) -> TransferView:
        """Hand an open transfer to another agent (SPEC §12), audited, `transfer.reassigned`.

        An accepted transfer changes its assignee (`agent_id`) and the session's
        `assigned_agent_id`, so only the new agent's human messages are accepted from
        now on and the routing's capacity counts follow; a PENDING one is offered to the
        new agent (still open to the whole desk). Naming the current agent changes
        nothing. The first-response timer runs from the accept and is not restarted."""
        session_id = self.get(transfer_id).session_id

        def work(tx: SlotTx, session: Session) -> TransferView:
            transfer = tx.db.execute(
                select(Transfer).where(Transfer.transfer_id == transfer_id)
            ).scalar_one()
            accepted = transfer.status == TransferStatus.ACCEPTED
            if not accepted and transfer.status != TransferStatus.PENDING:
                raise Conflict(
                    f"transfer {transfer_id} is {transfer.status}; only PENDING or ACCEPTED "
                    "transfers can be reassigned", current_status=str(transfer.status))
            before = transfer.agent_id if accepted else transfer.offered_agent_id
            if before == agent_id:
                return TransferView.model_validate(transfer)
            if accepted:
                transfer.agent_id = agent_id
                session.assigned_agent_id = agent_id
            else:
                transfer.offered_agent_id = agent_id
                transfer.offered_at = tx.now
            details = {"transfer_id": transfer_id, "from_agent_id": before,
                       "agent_id": agent_id, "transfer_status": str(transfer.status)}
            tx.audit(session, AuditOperation.TRANSFER_REASSIGN, from_status=session.status,
                     reason=reason,
                     details=details)
            tx.event(EventType.TRANSFER_REASSIGNED, session, {**details, "reason": reason},
                     audience=Audience.DESK)
            tx.db.flush()
            return TransferView.model_validate(transfer)

        return self.slots.run_on_session(session_id, actor, work)

    # ---- hand-back to the robot --------------------------------------------------------
    def hand_back(
        self, session_id: str, request: HandBackRequest, *, actor: str,
        guard: Guard | None = None,
        in_transaction: Callable[[DbSession, HandBackOutcome], None] | None = None,
    ) -> HandBackOutcome:
        """SPEC §12 in one slot transaction: the transfer and the TRANSFERRED session
        complete; with `needs_robot` a new robot session for the bot that transferred it
        (same types and priority, `handed_back_from`, the packet as its context) takes the
        slot at once — unless a session waiting in line outranks it under §3.5, which then
        preempts it as it would any robot. Otherwise the slot goes to the next in line.
        The bot gets `session.handed_back` with the packet. `in_transaction(db, outcome)`
        runs in the same transaction at the end (the Idempotency-Key's answer)."""
        packet = request.packet()

        def work(tx: SlotTx, session: Session) -> HandBackOutcome:
            if session.status != S.TRANSFERRED:
                raise InvalidTransition(
                    current=session.status, target=S.COMPLETED,
                    allowed=sorted(rules.ALLOWED_TRANSITIONS[session.status]),
                    detail=f"only a TRANSFERRED session can be handed back; {session_id} is "
                    f"{session.status}")
            robot = session.session_type.is_robot
            if request.outcome == "needs_robot" and not robot:
                raise Conflict(
                    f"session {session_id} is a {session.session_type} session: there is no "
                    "robot to hand it back to (use outcome resolved or unresolved)",
                    current_status=str(session.status))
            transfers = tx.open_transfers(session)
            assignee = next((t.agent_id for t in transfers
                             if t.status == TransferStatus.ACCEPTED), None)
            if request.agent_id is not None and assignee not in (None, request.agent_id):
                raise NotAssignee(
                    f"session {session_id} is assigned to agent {assignee}; "
                    f"{request.agent_id} may not hand it back", agent_id=assignee)
            transfer_ids = []
            for transfer in transfers:
                accepted = transfer.status == TransferStatus.ACCEPTED
                transfer.status = (TransferStatus.COMPLETED if accepted
                                   else TransferStatus.CANCELLED)
                transfer.ended_at = tx.now
                transfer.first_response_due_at = None
                transfer.hand_back = packet
                transfer_ids.append(transfer.transfer_id)
                tx.event(EventType.TRANSFER_COMPLETED if accepted
                         else EventType.TRANSFER_CANCELLED, session,
                         {"transfer_id": transfer.transfer_id, "reason": "handed back"},
                         audience=Audience.DESK)
            resumed: Session | None = None
            if request.outcome == "needs_robot":
                resumed = Session(
                    session_id=new_id("ses"), account_id=session.account_id,
                    shop_id=session.shop_id, session_type=session.session_type,
                    task_type=session.task_type, priority=session.priority,
                    status=S.PENDING, owner_id=session.owner_id, client_id=session.client_id,
                    origin=Origin.LIVE, created_at=tx.now, requested_at=tx.now,
                    last_activity_at=tx.now, reason=f"handed back from {session_id}",
                    context=packet, handed_back_from=session_id, message_count=0,
                    robot_message_count=0, human_message_count=0,
                    counterpart_message_count=0, unanswered=False,
                )
                session.handed_back_to = resumed.session_id
            details = {"outcome": request.outcome, "transfer_ids": transfer_ids,
                       "agent_id": request.agent_id or assignee,
                       "handed_back_to": session.handed_back_to}
            tx.set_status(session, S.COMPLETED, operation=AuditOperation.HAND_BACK,
                          event=EventType.SESSION_COMPLETED, reason="handed back", details=details)
            tx.event(EventType.SESSION_HANDED_BACK, session, {
                **packet, "transfer_ids": transfer_ids, "agent_id": request.agent_id or assignee,
                "resumed_session_id": session.handed_back_to,
            }, audience=Audience.OWNER)
            if resumed is None:
                tx.promote_next_waiting()
            else:
                self._resume_after_hand_back(tx, resumed)
            outcome = HandBackOutcome(
                completed=SessionView.model_validate(session),
                resumed=SessionView.model_validate(resumed) if resumed is not None else None)
            if in_transaction is not None:
                in_transaction(tx.db, outcome)
            return outcome

        return self.slots.run_on_session(session_id, actor, work, guard)

    def _resume_after_hand_back(self, tx: SlotTx, resumed: Session) -> None:
        """The bot's new session takes the slot its old one just left; a waiting session
        that outranks it (a human in line, say) preempts it at once, as it would have
        had it asked now."""
        tx.audit(resumed, AuditOperation.CREATE, from_status=None, reason=resumed.reason,
                 details={"handed_back_from": resumed.handed_back_from,
                          "priority": resumed.priority})
        tx.activate(resumed, event_data={"reason": "handed back",
                                         "handed_back_from": resumed.handed_back_from})
        tx.insert_session(resumed)
        for pk in tx.waiting()[:1]:
            candidate = tx.db.get_one(Session, pk)
            decision = rules.decide_conflict(
                requester_type=candidate.session_type,
                requester=precedence_of(candidate), occupant=precedence_of(resumed))
            if decision is rules.ConflictDecision.PREEMPT:
                tx.preempt(resumed, by=candidate)
                tx.activate(candidate, reason="preempted " + resumed.session_id)


def raise_already_taken(transfer: Transfer) -> None:
    if transfer.status == TransferStatus.ACCEPTED:
        raise AlreadyAccepted(
            f"transfer {transfer.transfer_id} was already accepted by {transfer.agent_id}",
            agent_id=transfer.agent_id,
        )
    raise Conflict(
        f"transfer {transfer.transfer_id} is {transfer.status}; only PENDING transfers "
        "can be accepted",
        current_status=str(transfer.status),
    )

