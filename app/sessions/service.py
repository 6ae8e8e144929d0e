"""The session service: every transition of SPEC §3, each one slot transaction.

Create, pause, resume, complete, cancel and expire each run one slot transaction
(`app.sessions.slot_tx`: lock, fence, change, commit, retried if stale); heartbeats
and live messages run under the session's own row lock (`app.sessions.activity`,
`app.messages.service`); transfers are `app.transfers.service`'s, reached from here
too. The service imports neither Flask nor Celery; HTTP views, CLI commands, Celery
tasks and `AutoSessionManager` are adapters over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from app.audit.operations import AuditOperation
from app.config import Settings
from app.coordination.markers import BusySlots
from app.coordination.slot_locks import SlotLocks
from app.db import Database
from app.errors import InvalidTransition, NotFound
from app.events.outbox import Audience
from app.events.types import EventType
from app.ids import new_id
from app.messages.service import Fits, LiveMessage, MessageOutcome, MessageService
from app.sessions import rules
from app.sessions.activity import Control, ControlledIf, SessionActivity
from app.sessions.enums import Origin, PauseCause, SessionStatus
from app.sessions.models import Session
from app.sessions.runner import SlotTransactions
from app.sessions.schemas import CreateOutcome, SessionRequest, SessionView
from app.sessions.slot_tx import Guard, ServiceHooks, SlotTx
from app.transfers.enums import TransferStatus
from app.transfers.schemas import (
    HandBackOutcome,
    HandBackRequest,
    TransferRequest,
    TransferView,
)
from app.transfers.service import TransferService

S = SessionStatus


class SessionService(SlotTransactions):
    """Every session operation of SPEC §3, safe with many processes at once."""

    def __init__(
        self,
        *,
        database: Database,
        locks: SlotLocks,
        settings: Settings,
        hooks: ServiceHooks | None = None,
    ) -> None:
        self.database = database
        self.locks = locks
        self.settings = settings
        self.hooks = hooks or ServiceHooks()
        self.busy_slots = BusySlots()
        self.activity = SessionActivity(database=database, settings=settings)
        self.messages = MessageService(
            database=database, settings=settings,
            counterpart_messages=lambda ids: self.hooks.counterpart_messages(ids),
        )
        self.transfers = TransferService(slots=self)

    # ---- reads -----------------------------------------------------------------------
    def get(self, session_id: str) -> SessionView:
        with self.database.read() as db:
            row = db.execute(
                select(Session).where(Session.session_id == session_id)
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"session {session_id} not found")
            return SessionView.model_validate(row)

    def get_transfer(self, transfer_id: str) -> TransferView:
        return self.transfers.get(transfer_id)

    # ---- create ----------------------------------------------------------------------
    def create(
        self,
        request: SessionRequest,
        *,
        actor: str,
        client_id: str | None = None,
        origin: Origin = Origin.LIVE,
        in_transaction: Callable[[DbSession, CreateOutcome], None] | None = None,
    ) -> CreateOutcome:
        """Ask for the slot: ACTIVE at once, preempting a lower robot, or PENDING in line.

        `in_transaction(db, outcome)` runs inside the same transaction just before the
        commit (the HTTP layer stores the Idempotency-Key answer there, so the session
        and its stored answer commit together or not at all)."""
        session_type = request.session_type
        task_type = request.task_type or rules.DEFAULT_TASK_BY_TYPE[session_type]
        priority = request.priority or rules.default_priority(session_type, request.task_type)
        public_id = new_id("ses")

        def work(tx: SlotTx) -> CreateOutcome:
            free = tx.occupant_precedence() is None
            session = Session.new(
                session_id=public_id,
                account_id=request.account_id,
                shop_id=request.shop_id,
                session_type=session_type,
                task_type=task_type,
                priority=int(priority),
                status=S.PENDING,
                owner_id=request.owner_id,
                client_id=client_id,
                assigned_agent_id=request.owner_id if session_type.is_human else None,
                origin=origin,
                created_at=tx.now,
                requested_at=tx.now,
                last_activity_at=tx.now,
                reason=request.reason,
                context=request.context,
                message_count=0,
                robot_message_count=0,
                human_message_count=0,
                counterpart_message_count=0,
                unanswered=False,
            )
            tx.audit(session, AuditOperation.CREATE, from_status=None, reason=request.reason,
                     details={"on_conflict": request.on_conflict, "priority": int(priority)})
            if free:
                # The common case, in one INSERT: activated before it is inserted, the
                # row is written ACTIVE at once (`SlotTx.activate`).
                tx.activate(session)
                tx.insert_session(session)  # with its audit head
                displaced: list[Session] = []
            else:
                session.deadline_at = self.deadline_for(session, tx.now)
                tx.insert_session(session)  # with its audit head
                displaced = tx.claim_or_wait(session, on_conflict=request.on_conflict)
            if session.status == S.PENDING:
                self.busy_slots.mark((request.account_id, request.shop_id))
                tx.event(EventType.SESSION_QUEUED, session, {
                    "occupant_session_id": tx.occupant_id(),
                    "position": tx.position_of_newest(session),
                })
            outcome = CreateOutcome(
                session=SessionView.model_validate(session),
                preempted=[SessionView.model_validate(d) for d in displaced],
            )
            if in_transaction is not None:
                in_transaction(tx.db, outcome)
            return outcome

        slot = (request.account_id, request.shop_id)
        return self.run_on_slot(*slot, actor, work, joins_line=(
            request.on_conflict == "queue" and slot in self.busy_slots))

    # ---- transitions -----------------------------------------------------------------
    def pause(
        self, session_id: str, *, actor: str, reason: str | None = None,
        guard: Guard | None = None,
    ) -> SessionView:
        """The owner pauses: the slot goes to the next waiting session; this one stays
        paused until its owner resumes it."""

        def work(tx: SlotTx, session: Session) -> SessionView:
            rules.check_transition(session.status, S.PAUSED)
            session.pause_cause = PauseCause.OWNER
            tx.leave_slot(session, S.PAUSED, operation=AuditOperation.PAUSE,
                          event=EventType.SESSION_PAUSED,
                          reason=reason or "paused by owner")
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def resume(
        self, session_id: str, *, actor: str, reason: str | None = None,
        guard: Guard | None = None,
    ) -> SessionView:
        """A resume is a new request with the session's precedence: take the free slot,
        preempt a lower robot, or wait in line (PAUSED, now waiting for promotion)."""

        def work(tx: SlotTx, session: Session) -> SessionView:
            if session.status != S.PAUSED:
                rules.check_transition(session.status, S.ACTIVE)
                raise InvalidTransition(
                    current=session.status, target=S.ACTIVE,
                    allowed=sorted(rules.ALLOWED_TRANSITIONS[session.status]),
                    detail=f"only a PAUSED session can be resumed; {session_id} is "
                    f"{session.status}" + (" and is activated when the slot frees"
                                           if session.status == S.PENDING else ""),
                )
            before_cause = session.pause_cause
            session.pause_cause = PauseCause.PREEMPTED  # in line from now on
            if before_cause == PauseCause.OWNER:
                session.requested_at = tx.now  # back in line as a new request
            tx.claim_or_wait(session)
            if session.status == S.PAUSED:
                session.last_activity_at = tx.now
                session.deadline_at = self.deadline_for(session, tx.now)
                occupant = tx.occupant()
                tx.audit(session, AuditOperation.RESUME_WAIT, from_status=S.PAUSED, reason=reason,
                         details={"occupant_session_id": occupant.session_id if occupant else None})
                tx.event(EventType.SESSION_QUEUED, session, {
                    "occupant_session_id": occupant.session_id if occupant else None,
                })
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def complete(
        self, session_id: str, *, actor: str, reason: str | None = None, result: Any = None,
        guard: Guard | None = None,
    ) -> SessionView:
        def work(tx: SlotTx, session: Session) -> SessionView:
            rules.check_transition(session.status, S.COMPLETED)
            if result is not None:
                session.result = result
            for transfer in tx.open_transfers(session):
                accepted = transfer.status == TransferStatus.ACCEPTED
                transfer.status = TransferStatus.COMPLETED if accepted else TransferStatus.CANCELLED
                transfer.ended_at = tx.now
                transfer.first_response_due_at = None
                tx.event(EventType.TRANSFER_COMPLETED if accepted
                         else EventType.TRANSFER_CANCELLED, session,
                         {"transfer_id": transfer.transfer_id}, audience=Audience.DESK)
            tx.leave_slot(session, S.COMPLETED, operation=AuditOperation.COMPLETE,
                          event=EventType.SESSION_COMPLETED,
                          reason=reason or "completed")
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def cancel(
        self, session_id: str, *, actor: str, reason: str | None = None,
        guard: Guard | None = None,
    ) -> SessionView:
        def work(tx: SlotTx, session: Session) -> SessionView:
            rules.check_transition(session.status, S.CANCELLED)
            tx.cancel_open_transfers(session, reason=reason or "session cancelled")
            tx.leave_slot(session, S.CANCELLED, operation=AuditOperation.CANCEL,
                          event=EventType.SESSION_CANCELLED,
                          reason=reason or "cancelled")
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work, guard)

    def expire(
        self, session_id: str, *, actor: str = "system:sweep", now: datetime | None = None
    ) -> SessionView | None:
        """Time a session out if it is still past its deadline (re-checked under the lock)."""

        def work(tx: SlotTx, session: Session) -> SessionView | None:
            at = now or tx.now
            if session.status.is_terminal or session.deadline_at is None:
                return None
            if session.deadline_at > at:
                return None  # a heartbeat or message arrived since the sweep looked
            tx.cancel_open_transfers(session, reason="session timed out")
            tx.leave_slot(session, S.TIMEOUT, operation=AuditOperation.TIMEOUT,
                          event=EventType.SESSION_TIMEOUT,
                          reason="timeout",
                          details={"deadline_at": session.deadline_at.isoformat(),
                                   "status_before": str(session.status)})
            return SessionView.model_validate(session)

        return self.run_on_session(session_id, actor, work)

    def heartbeat(
        self, session_id: str, *, actor: str, control: Control | None = None,
        controlled_if: ControlledIf | None = None,
    ) -> SessionView:
        """Keep a session alive; answers its current status (terminal ones included).
        Under the session's row lock, not a slot transaction (`app.sessions.activity`)."""
        return self.activity.heartbeat(session_id, control=control,
                                       controlled_if=controlled_if)

    # ---- transfers (`app.transfers.service`) -----------------------------------------
    def transfer(
        self, session_id: str, request: TransferRequest, *, actor: str,
        guard: Guard | None = None,
    ) -> TransferView:
        """SPEC §3.6 in one atomic step (`TransferService.transfer`)."""
        return self.transfers.transfer(session_id, request, actor=actor, guard=guard)

    def open_transfer(
        self, tx: SlotTx, session: Session, request: TransferRequest
    ) -> TransferView:
        """Transfer `session` inside a slot transaction (`TransferService.open_transfer`)."""
        return self.transfers.open_transfer(tx, session, request)

    def accept_transfer(self, transfer_id: str, *, agent_id: str, actor: str) -> TransferView:
        """The first agent to accept wins (`TransferService.accept`)."""
        return self.transfers.accept(transfer_id, agent_id=agent_id, actor=actor)

    def reassign_transfer(
        self, transfer_id: str, *, agent_id: str, actor: str, reason: str | None = None,
    ) -> TransferView:
        """Hand an open transfer to another agent (`TransferService.reassign`)."""
        return self.transfers.reassign(transfer_id, agent_id=agent_id, actor=actor,
                                       reason=reason)

    def hand_back(
        self, session_id: str, request: HandBackRequest, *, actor: str,
        guard: Guard | None = None,
        in_transaction: Callable[[DbSession, HandBackOutcome], None] | None = None,
    ) -> HandBackOutcome:
        """SPEC §12: the desk hands a TRANSFERRED session back (`TransferService.hand_back`)."""
        return self.transfers.hand_back(session_id, request, actor=actor, guard=guard,
                                        in_transaction=in_transaction)

    # ---- messages ------------------------------------------------------------------
    def record_messages(
        self, session_id: str, messages: Sequence[LiveMessage], *, actor: str,
        control: Control | None = None, agent_id: str | None = None,
        as_operator: bool = True, controlled_if: ControlledIf | None = None,
        fits: Fits = (None, None),
    ) -> MessageOutcome:
        """Store live messages on an ACTIVE or TRANSFERRED session, de-duplicated by id,
        recorded as posted by `actor` (and `agent_id` for the desk). On an accepted
        transfer human messages come from its assignee only, or from an operator
        (`as_operator`) naming no agent (SPEC §12). `controlled_if` and `fits`: `control`
        as SQL (`MessageService.record_messages`)."""
        return self.messages.record_messages(session_id, messages, control=control,
                                             posted_by=actor, agent_id=agent_id,
                                             as_operator=as_operator,
                                             controlled_if=controlled_if, fits=fits)


__all__ = ["ServiceHooks", "SessionService"]
