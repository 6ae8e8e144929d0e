"""The cursor feed of outbox events (SPEC §6), scoped to what a client may see.

The cursor is the event id. Ids are assigned at INSERT, but transactions commit in
any order: on MySQL, event 10 may still be uncommitted when event 11 is visible. A
reader that served 11 and moved its cursor past 10 would never see 10. So the feed
only hands out a prefix that cannot change any more:

- every event up to the first *hole* in the global id sequence after the cursor
  (a missing id may be an open transaction that will still commit), and
- past a hole, only events older than the settle window (`settle_seconds`, default
  5 s: twice the longest a write transaction is expected to stay open). By then the
  hole is a rolled-back insert (InnoDB never reuses its id) or an event that has
  committed and is served in order.

The answer always stops at the first event it may not serve yet, so the cursor
never jumps over anything: nothing is missed and nothing repeats. On SQLite writers
are serialised and ids are never left behind, so there are no holes.

Retention deletes an id prefix and records its end (`retention_marks`): a cursor
below it answers `410 /problems/cursor-expired` with that end as `oldest_cursor`, and
the purged ids are never taken for a hole (which would hold every page back to
settled events for good).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import ColumnElement, and_, exists, false, func, or_, select, true
from sqlalchemy.orm import Session as DbSession
from sqlalchemy.orm import aliased

from app.errors import CursorExpired
from app.events.models import Event
from app.events.outbox import Audience
from app.retention.models import EVENTS_MARK, RetentionMark
from app.sessions.models import Session
from app.transfers.models import Transfer

SETTLE_SECONDS = 5.0
MAX_PAGE = 500


class EventQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    after: int = Field(default=0, ge=0, le=2**63 - 1,
                       description="the `next` of the previous page")
    limit: int = Field(default=100, ge=1, le=MAX_PAGE)


class EventView(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    event_id: int
    type: str
    session_id: str | None
    account_id: str | None
    shop_id: str | None
    audience: str
    occurred_at: datetime
    data: dict[str, Any]


class EventPage(BaseModel):
    """`next` is the cursor to pass as `after` next time (the same one when nothing new)."""

    items: list[EventView]
    next: int


def visible_events(client_id: str, role: str) -> ColumnElement[bool]:
    """Which events a client may read.

    - admin: all;
    - bot: the events about its own sessions addressed to their owner (desk copies of
      transfer events are the desk's);
    - desk: everything addressed to the desk, its own sessions' events, and the session
      events of robot sessions that were handed to the desk.
    """
    if role == "admin":
        return true()
    if role == "bot":
        return and_(Event.client_id == client_id, Event.audience == Audience.OWNER)
    if role == "desk":
        # sessions.session_id and session_transfers.session_pk are both indexed
        transferred = exists(
            select(Transfer.id)
            .join(Session, Session.id == Transfer.session_pk)
            .where(Session.session_id == Event.session_id)
        )
        return or_(
            Event.audience == Audience.DESK,
            and_(Event.client_id == client_id, Event.audience != Audience.ADMIN),
            and_(Event.audience == Audience.OWNER, Event.type.like("session.%"), transferred),
        )
    return false()


def read_feed(
    db: DbSession,
    *,
    client_id: str,
    role: str,
    after: int,
    limit: int,
    now: datetime,
    settle_seconds: float = SETTLE_SECONDS,
) -> EventPage:
    """The next events after `after` that `client_id` may see, never skipping one.

    Raises CursorExpired for a cursor below the retention purge's mark (`after` 0, no
    cursor yet, starts at the oldest event kept)."""
    visible = visible_events(client_id, role)
    candidates = _events(db, visible, after, None, limit)
    # Read after the events: a purge that committed in between is seen here.
    purged = purged_through(db)
    if 0 < after < purged:
        raise CursorExpired(
            f"events up to {purged} were purged (EVENTS_RETENTION); resume from "
            "oldest_cursor, past the events that are no longer kept", oldest_cursor=purged)
    if not candidates:
        return EventPage(items=[], next=after)
    last = candidates[-1].id
    # Purged ids are not holes: nothing below the mark can still commit.
    hole = first_hole(db, max(after, purged), last)
    # Each statement sees the newest commits (READ COMMITTED on MySQL): an event that
    # committed after the first read, below `last`, may have filled a hole the count then
    # did not see. Every id up to `upto` was present when the holes were counted, so that
    # range is final now: read it again and serve what it holds, missing nothing.
    upto = last if hole is None else hole - 1
    served = _events(db, visible, after, upto, limit) if upto > after else []
    if hole is not None and len(served) < limit:
        # past the hole, only events older than the settle window, in order
        settled = now - timedelta(seconds=settle_seconds)
        for event in candidates:
            if event.id <= hole:
                continue
            if event.occurred_at > settled:
                break
            served.append(event)
    items = [
        EventView(
            event_id=e.id, type=e.type, session_id=e.session_id, account_id=e.account_id,
            shop_id=e.shop_id, audience=e.audience, occurred_at=e.occurred_at, data=e.data or {},
        )
        for e in served
    ]
    return EventPage(items=items, next=served[-1].id if served else after)


def _events(db: DbSession, visible: ColumnElement[bool], after: int, upto: int | None,
            limit: int) -> list[Event]:
    """The visible events with ids in (after, upto], oldest first, at most `limit`."""
    stmt = select(Event).where(Event.id > after, visible)
    if upto is not None:
        stmt = stmt.where(Event.id <= upto)
    return list(db.execute(stmt.order_by(Event.id).limit(limit)).scalars().all())


def purged_through(db: DbSession) -> int:
    """Every event id up to this one was purged by retention (0: none yet)."""
    return db.execute(
        select(RetentionMark.purged_through).where(RetentionMark.name == EVENTS_MARK)
    ).scalar_one_or_none() or 0


def first_hole(db: DbSession, after: int, upto: int) -> int | None:
    """The lowest id in (after, upto] that is missing from the table, or None."""
    present = db.execute(
        select(func.count()).select_from(Event).where(Event.id > after, Event.id <= upto)
    ).scalar_one()
    if present == upto - after:
        return None
    previous = aliased(Event)
    first_after_hole = db.execute(
        select(Event.id)
        .where(
            Event.id > after + 1,
            Event.id <= upto,
            ~exists(select(previous.id).where(previous.id == Event.id - 1)),
        )
        .order_by(Event.id)
        .limit(1)
    ).scalar_one_or_none()
    if first_after_hole is None:
        return after + 1  # pragma: no cover - the count said something is missing
    return first_after_hole - 1
