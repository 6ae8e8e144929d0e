"""What operations staff can see and do about sessions and slots (SPEC §7).

Plain Python over a database session and the `SessionService`: no Flask here, so the
admin API, the console pages and tests all call the same functions. Reads are single
queries on indexed columns; writes go through `SessionService.run_on_session` /
`run_on_slot`, so a force-close or a slot release takes the slot lock, advances the
fence, promotes the next waiting session and writes its audit row and outbox event
in one transaction — exactly like every other change to a slot.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DbSession

from admin.queries import SessionSearch
from admin.serializers import message_json, operation_json, session_json, transfer_json
from app.audit.models import Operation
from app.audit.operations import AuditOperation
from app.errors import Conflict, NotFound
from app.events.types import EventType
from app.messages.models import Message
from app.sessions import rules
from app.sessions.enums import PauseCause, SessionStatus
from app.sessions.models import Session, Slot
from app.sessions.queries import decode_cursor, encode_cursor
from app.sessions.service import SessionService
from app.sessions.slot_tx import SlotTx, precedence_of
from app.transfers.models import Transfer

MAX_MESSAGES = 500


def search_sessions(
    db: DbSession, search: SessionSearch
) -> tuple[list[dict[str, Any]], str | None]:
    """Newest first, keyset-paginated on the internal id (stable while rows arrive)."""
    stmt = select(Session)
    for column, value in (
        (Session.account_id, search.account_id),
        (Session.shop_id, search.shop_id),
        (Session.status, search.status),
        (Session.session_type, search.session_type),
        (Session.owner_id, search.owner_id),
        (Session.origin, search.origin),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    if search.created_from is not None:
        stmt = stmt.where(Session.created_at >= search.created_from)
    if search.created_to is not None:
        stmt = stmt.where(Session.created_at < search.created_to)
    if search.after:
        stmt = stmt.where(Session.id < decode_cursor(search.after))
    rows = db.execute(stmt.order_by(Session.id.desc()).limit(search.limit + 1)).scalars().all()
    page = rows[: search.limit]
    following = encode_cursor(page[-1].id) if len(rows) > search.limit else None
    return [session_json(r) for r in page], following


def load_session(db: DbSession, session_id: str) -> Session:
    row = db.execute(select(Session).where(Session.session_id == session_id)).scalar_one_or_none()
    if row is None:
        raise NotFound(f"session {session_id} not found")
    return row


def session_detail(db: DbSession, session_id: str) -> dict[str, Any]:
    """One session with its conversation, transfers and audit trail, and the three merged
    into one timeline (oldest first) — what an operator reads to understand a case."""
    session = load_session(db, session_id)
    messages = db.execute(
        select(Message).where(Message.session_pk == session.id)
        .order_by(Message.sent_at.desc(), Message.id.desc()).limit(MAX_MESSAGES + 1)
    ).scalars().all()
    truncated = len(messages) > MAX_MESSAGES
    messages = list(reversed(messages[:MAX_MESSAGES]))
    transfers = db.execute(
        select(Transfer).where(Transfer.session_pk == session.id).order_by(Transfer.id)
    ).scalars().all()
    audit = db.execute(
        select(Operation).where(Operation.session_pk == session.id).order_by(Operation.id)
    ).scalars().all()

    timeline: list[dict[str, Any]] = []
    for op in audit:
        timeline.append({"at": op.created_at, "kind": "audit", "operation": op.operation,
                         "from_status": op.from_status, "to_status": op.to_status,
                         "actor": op.actor, "reason": op.reason, "details": op.details})
    for m in messages:
        timeline.append({"at": m.sent_at, "kind": "message", "sender_role": str(m.sender_role),
                         "sender_id": m.sender_id, "content": m.content})
    for t in transfers:
        for label, at in (("offered", t.created_at), ("accepted", t.accepted_at),
                          (str(t.status).lower(), t.ended_at)):
            if at is not None:
                timeline.append({"at": at, "kind": "transfer", "transfer_id": t.transfer_id,
                                 "event": label, "urgency": t.urgency, "reason": t.reason,
                                 "agent_id": t.agent_id or t.offered_agent_id})
    # Stable: audit rows keep their chain order when they share a timestamp.
    timeline.sort(key=lambda item: item["at"])
    for item in timeline:
        item["at"] = item["at"].isoformat()
    return {
        "session": session_json(session),
        "messages": [message_json(m) for m in messages],
        "messages_truncated": truncated,
        "transfers": [transfer_json(t) for t in transfers],
        "audit": [operation_json(op) for op in audit],
        "timeline": timeline,
    }


# ---- the slot ------------------------------------------------------------------------------
def slot_view(db: DbSession, account_id: str, shop_id: str) -> dict[str, Any]:
    """The occupant and the waiting line in precedence order (the order promotion uses);
    sessions paused by their owner wait for their owner, not for the slot, and are listed
    apart."""
    rows = db.execute(
        select(Session).where(
            Session.account_id == account_id,
            Session.shop_id == shop_id,
            Session.status.in_([SessionStatus.ACTIVE, SessionStatus.TRANSFERRED,
                                SessionStatus.PENDING, SessionStatus.PAUSED]),
        )
    ).scalars().all()
    slot = db.get(Slot, (account_id, shop_id))
    if slot is None and not rows:
        raise NotFound(f"slot ({account_id}, {shop_id}) has never been used")
    occupant = next((r for r in rows if r.holds_slot), None)
    waiting = sorted(
        (r for r in rows if r.status in (SessionStatus.PENDING, SessionStatus.PAUSED)
         and r.pause_cause != PauseCause.OWNER),
        key=precedence_of,
    )
    owner_paused = [r for r in rows if r.status == SessionStatus.PAUSED
                    and r.pause_cause == PauseCause.OWNER]

    def queued(position: int, row: Session) -> dict[str, Any]:
        rank = precedence_of(row)
        return {**session_json(row), "position": position,
                "precedence": {"human": not rank.robot, "priority": rank.priority,
                               "type_rank": rank.type_rank,
                               "requested_at": rank.requested_at.isoformat()}}

    return {
        "account_id": account_id,
        "shop_id": shop_id,
        "fence": slot.fence if slot else 0,
        "occupant": session_json(occupant) if occupant else None,
        "waiting": [queued(i + 1, r) for i, r in enumerate(waiting)],
        "paused_by_owner": [session_json(r) for r in owner_paused],
    }


def force_close(
    service: SessionService, session_id: str, *, actor: str, reason: str, operator: str
) -> dict[str, Any]:
    """End a session now (CANCELLED), whatever its owner thinks, and promote the next
    waiting session if it held the slot. The audit row names the operator."""

    def work(tx: SlotTx, session: Session) -> dict[str, Any]:
        rules.check_transition(session.status, SessionStatus.CANCELLED)
        held = bool(session.holds_slot)
        tx.cancel_open_transfers(session, reason=f"force-closed: {reason}")
        tx.leave_slot(session, SessionStatus.CANCELLED, operation=AuditOperation.FORCE_CLOSE,
                      event=EventType.SESSION_CANCELLED, reason=reason,
                      details={"operator": operator, "forced": True})
        promoted = tx.occupant() if held else None
        return {"session": session_json(session),
                "promoted": session_json(promoted) if promoted else None}

    return service.run_on_session(session_id, actor, work)


def release_slot(
    service: SessionService, account_id: str, shop_id: str, *, actor: str, reason: str,
    operator: str,
) -> dict[str, Any]:
    """Free a slot: the occupant ends CANCELLED (its open transfer cancelled) and the
    highest-precedence waiting session is activated. A slot that is already free but has
    sessions waiting (which the rules never leave behind) gets its next session promoted."""

    def work(tx: SlotTx) -> dict[str, Any]:
        occupant = tx.occupant()
        released = None
        if occupant is not None:
            tx.cancel_open_transfers(occupant, reason=f"slot released: {reason}")
            tx.leave_slot(occupant, SessionStatus.CANCELLED, operation=AuditOperation.RELEASE_SLOT,
                          event=EventType.SESSION_CANCELLED, reason=reason,
                          details={"operator": operator, "forced": True})
            released = session_json(occupant)
            promoted = tx.occupant()
        else:
            promoted = tx.promote_next_waiting()
        if released is None and promoted is None:
            raise Conflict(f"slot ({account_id}, {shop_id}) is free and nobody waits for it")
        return {"account_id": account_id, "shop_id": shop_id, "released": released,
                "promoted": session_json(promoted) if promoted else None}

    return service.run_on_slot(account_id, shop_id, actor, work)
