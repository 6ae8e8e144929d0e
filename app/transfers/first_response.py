"""First response (SPEC §12): an accepted transfer whose customer got no human message
within FIRST_RESPONSE_TIMEOUT is flagged once, with `transfer.first_response_overdue`.

The accept sets `first_response_due_at`; the first human message clears it (and stamps
`first_response_at`, `app.messages.service`), and so does the end of the transfer. The
sweep reads the due ones along their index and claims each with one conditional UPDATE
(still ACCEPTED, still unanswered, still due), writing the event in the same
transaction: a message and the sweep racing on one transfer are ordered by its row
lock, so the event is sent at most once, and never for a transfer answered in time.
No slot lock: nothing here changes who holds a slot, and no audit row is written
(the flag is an observation, not an operation on the session).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import select, update

from app.db import Database, affected_rows
from app.events.outbox import Audience, record_event
from app.events.types import EventType
from app.sessions.models import Session
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer

OVERDUE_EVENT = EventType.TRANSFER_FIRST_RESPONSE_OVERDUE


def flag_overdue_first_responses(
    database: Database, *, now: datetime, timeout: int, limit: int,
    events_written: Callable[[], None] = lambda: None,
) -> list[str]:
    """Flag up to `limit` accepted transfers still unanswered at their due time; answers
    their ids. Transfers that are due but answered or ended are only cleared.
    `events_written` runs after the commit when some were flagged."""
    with database.unit_of_work() as uow:
        db = uow.session
        due = db.execute(
            select(Transfer.id, Transfer.status, Transfer.first_response_at)
            .where(Transfer.first_response_due_at <= now)
            .order_by(Transfer.first_response_due_at, Transfer.id)
            .limit(limit)
        ).all()
        if not due:
            return []
        flagged: list[str] = []
        for row in due:
            if row.status != TransferStatus.ACCEPTED or row.first_response_at is not None:
                continue
            claimed = affected_rows(db.execute(
                update(Transfer)
                .where(Transfer.id == row.id, Transfer.first_response_due_at <= now,
                       Transfer.status == TransferStatus.ACCEPTED,
                       Transfer.first_response_at.is_(None))
                .values(first_response_overdue_at=now, first_response_due_at=None)
                .execution_options(synchronize_session=False)))
            if not claimed:
                continue  # answered or ended since the read
            transfer, session = db.execute(
                select(Transfer, Session).join(Session, Session.id == Transfer.session_pk)
                .where(Transfer.id == row.id)).one()
            flagged.append(transfer.transfer_id)
            record_event(db, type=OVERDUE_EVENT, at=now, session=session, data={
                "transfer_id": transfer.transfer_id, "agent_id": transfer.agent_id,
                "accepted_at": transfer.accepted_at.isoformat()
                if transfer.accepted_at else None,
                "timeout_s": timeout,
            }, audience=Audience.DESK)
        # the rest of the batch was answered or ended before its due time: not due any more
        db.execute(
            update(Transfer)
            .where(Transfer.id.in_([row.id for row in due]),
                   Transfer.first_response_due_at <= now)
            .values(first_response_due_at=None)
            .execution_options(synchronize_session=False))
        if flagged:
            uow.after_commit(events_written)
        uow.commit()
    return flagged
