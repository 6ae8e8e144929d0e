"""A transfer nobody accepted in time: expire it, escalate it, offer it again (SPEC §3.6).

A customer waiting for a human is never silently dropped: the old record becomes
EXPIRED (event `transfer.expired`) and, in the same slot transaction, a new PENDING
record linked by `previous_transfer_id` is routed again one urgency level higher
(event `transfer.offered`). The session stays TRANSFERRED and keeps its slot.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from app.audit.operations import AuditOperation
from app.errors import NotFound
from app.events.outbox import Audience
from app.events.types import EventType
from app.sessions.enums import SessionStatus
from app.sessions.models import Session
from app.sessions.service import SessionService
from app.sessions.slot_tx import SlotTx
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer, transfer_values
from app.transfers.routing import choose_agent
from app.transfers.schemas import TransferView

SWEEP_ACTOR = "system:sweep"


def escalated(urgency: int) -> int:
    """One level more urgent (1 is the most urgent and stays 1)."""
    return max(1, urgency - 1)


def expire_transfer(
    service: SessionService,
    transfer_id: str,
    *,
    actor: str = SWEEP_ACTOR,
    now: datetime | None = None,
) -> TransferView | None:
    """Expire `transfer_id` if it is still PENDING past its expiry (re-checked under the
    slot lock); returns the new offer, or None when there was nothing to do."""
    session_id = service.get_transfer(transfer_id).session_id

    def work(tx: SlotTx, session: Session) -> TransferView | None:
        at = now or tx.now
        old = tx.db.execute(
            select(Transfer).where(Transfer.transfer_id == transfer_id)
        ).scalar_one_or_none()
        if old is None:
            raise NotFound(f"transfer {transfer_id} not found")
        if old.status != TransferStatus.PENDING or old.expires_at is None or old.expires_at > at:
            return None  # accepted, cancelled or already re-offered since the sweep looked
        old.status = TransferStatus.EXPIRED
        old.ended_at = tx.now
        tx.event(EventType.TRANSFER_EXPIRED, session, {
            "transfer_id": old.transfer_id, "urgency": old.urgency,
            "offered_agent_id": old.offered_agent_id,
        }, audience=Audience.DESK)
        if session.status != SessionStatus.TRANSFERRED:
            tx.audit(session, AuditOperation.TRANSFER_EXPIRE, from_status=session.status,
                     details={"transfer_id": old.transfer_id, "reoffered": False})
            return None
        return _offer_again(service, tx, session, old)

    return service.run_on_session(session_id, actor, work)


def _offer_again(
    service: SessionService, tx: SlotTx, session: Session, old: Transfer
) -> TransferView:
    urgency = escalated(old.urgency)
    offered = choose_agent(
        tx.db, requested_agent_id=None, skill=str(session.task_type),
        default_capacity=service.settings.max_concurrent_sessions,
    )
    new = Transfer(**transfer_values(
        session_pk=session.id,
        session_id=session.session_id,
        urgency=urgency,
        reason=old.reason,
        trigger=old.trigger,
        requested_agent_id=old.requested_agent_id,
        offered_agent_id=offered,
        history=old.history,
        task_state=old.task_state,
        customer_info=old.customer_info,
        suggestion=old.suggestion,
        escalations=old.escalations + 1,
        previous_transfer_id=old.transfer_id,
        at=tx.now,
        expires_at=tx.now + timedelta(seconds=service.settings.transfer_timeout),
    ))
    tx.db.add(new)
    tx.db.flush()
    tx.audit(session, AuditOperation.TRANSFER_ESCALATE, from_status=session.status, details={
        "expired_transfer_id": old.transfer_id, "transfer_id": new.transfer_id,
        "urgency_before": old.urgency, "urgency": urgency, "offered_agent_id": offered,
    })
    tx.event(EventType.TRANSFER_OFFERED, session, {
        "transfer_id": new.transfer_id, "urgency": urgency, "reason": new.reason,
        "trigger": str(new.trigger), "offered_agent_id": offered,
        "previous_transfer_id": old.transfer_id, "escalations": new.escalations,
    }, audience=Audience.DESK)
    return TransferView.model_validate(new)
