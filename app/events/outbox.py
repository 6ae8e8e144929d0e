"""Write outbox events in the caller's transaction (SPEC §6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session as DbSession

from app.events.models import Event
from app.events.types import EventType
from app.sessions.enums import is_human_type
from app.sessions.models import Session


class Audience:
    OWNER = "owner"  # the client that owns the session (a bot, or the desk for its sessions)
    DESK = "desk"  # the human desk: transfers and human sessions
    ADMIN = "admin"  # operators only


def session_snapshot(session: Session) -> dict[str, Any]:
    return {
        "session_id": session.session_id,
        "account_id": session.account_id,
        "shop_id": session.shop_id,
        "session_type": str(session.session_type),
        "status": str(session.status),
        "priority": session.priority,
        "owner_id": session.owner_id,
        "origin": str(session.origin),
    }


def event_values(
    *,
    type: EventType,
    at: datetime,
    session: Session | None = None,
    data: dict[str, Any] | None = None,
    audience: str | None = None,
) -> dict[str, Any]:
    """The column values of one outbox event: the session's snapshot (as of now) plus
    `data`, addressed to `audience` (by default the desk for human sessions and
    transfers, else the session's owner)."""
    payload: dict[str, Any] = session_snapshot(session) if session is not None else {}
    payload.update(data or {})
    if audience is None:
        human = session is not None and is_human_type(session.session_type)
        audience = Audience.DESK if human or type.startswith("transfer.") else Audience.OWNER
    return {
        "type": type,
        "session_id": session.session_id if session is not None else None,
        "account_id": session.account_id if session is not None else None,
        "shop_id": session.shop_id if session is not None else None,
        "client_id": session.client_id if session is not None else None,
        "audience": audience,
        "occurred_at": at,
        "data": payload,
    }


def record_event(
    db: DbSession,
    *,
    type: EventType,
    at: datetime,
    session: Session | None = None,
    data: dict[str, Any] | None = None,
    audience: str | None = None,
) -> Event:
    """Add an event to the outbox; it commits (or not) with the change it announces."""
    event = Event(**event_values(type=type, at=at, session=session, data=data,
                                 audience=audience))
    db.add(event)
    return event
