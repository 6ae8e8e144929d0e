"""Live messages (SPEC §7): stored on an ACTIVE or TRANSFERRED session, each batch one
short transaction under the session's own row lock (`app.sessions.activity` says why
that orders them with every change of the session).

Live messages are their own append-only record: each row keeps who posted it
(`posted_by`, and the desk's `agent_id`) and when it was received; a batch writes no
audit row of its own. De-duplication by `message_id` is the unique key's job; a
concurrent duplicate that slips past the look-up makes the insert fail and the whole
unit is retried, finding it stored.

One agent speaks (SPEC §12): on a TRANSFERRED session whose transfer is accepted, human
messages are accepted only from the assignee. The assignee changes (accept, reassign)
inside slot transactions that lock this same session row first, so a message is
checked against the assignee as of the moment it is stored. The first human message
after the accept stamps the transfer's `first_response_at` in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, null, select, update

from app.config import Settings
from app.db import Database, run_after_commit, utcnow
from app.errors import Conflict, NotAssignee, NotInControl, ValidationFailed
from app.fastsql import Prepared, Record
from app.messages.models import Message
from app.sessions.activity import (
    TOUCH_SESSION,
    Control,
    deadline_after,
    on_locked_row,
    session_view,
)
from app.sessions.enums import SenderRole, SessionStatus
from app.sessions.schemas import SessionView
from app.transfers.enums import TransferStatus
from app.transfers.models import Transfer

log = logging.getLogger(__name__)

MESSAGES = cast(Table, Message.__table__)
S = SessionStatus

_STORED_IDS = select(MESSAGES.c.message_id).where(
    MESSAGES.c.message_id.in_(bindparam("ids", expanding=True)))
_INSERT_MESSAGES = insert(MESSAGES)
_INSERT_NEW_MESSAGE = Prepared(insert(MESSAGES).prefix_with("IGNORE", dialect="mysql")
                               .prefix_with("OR IGNORE", dialect="sqlite"),
                               values_from_params=True)
TRANSFERS = cast(Table, Transfer.__table__)
# The accepted transfer of a TRANSFERRED session (read under the session's row lock:
# its assignee cannot change until this transaction ends).
_ACCEPTED_TRANSFER = Prepared(
    select(TRANSFERS.c.id, TRANSFERS.c.transfer_id, TRANSFERS.c.agent_id,
           TRANSFERS.c.first_response_at)
    .where(TRANSFERS.c.session_pk == bindparam("pk"),
           TRANSFERS.c.status == TransferStatus.ACCEPTED)
    .limit(1))
_FIRST_RESPONSE = Prepared(
    update(TRANSFERS)
    .where(TRANSFERS.c.id == bindparam("transfer_pk"), TRANSFERS.c.first_response_at.is_(None))
    .values(first_response_at=bindparam("now"), first_response_due_at=null()))


@dataclass
class LiveMessage:
    """A validated message to store on a session."""

    message_id: str
    sender_role: SenderRole
    content: str
    sent_at: datetime
    sender_id: str | None = None
    message_type: str = "text"


@dataclass
class MessageOutcome:
    accepted: int
    duplicates: int
    session: SessionView
    accepted_ids: list[str] = field(default_factory=list)


class MessageService:
    """Live messages, each batch one short transaction on the session's row."""

    def __init__(
        self, *, database: Database, settings: Settings,
        counterpart_messages: Callable[[list[str]], None] = lambda ids: None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.counterpart_messages = counterpart_messages

    def record_messages(
        self, session_id: str, messages: Sequence[LiveMessage], *,
        control: Control | None = None, posted_by: str | None = None,
        agent_id: str | None = None, as_operator: bool = True,
    ) -> MessageOutcome:
        """Store live messages on an ACTIVE or TRANSFERRED session, de-duplicated by id.

        `agent_id` is the desk agent posting; `as_operator` lets a poster that names no
        agent (an admin, the Python API) speak on an accepted transfer."""
        unique: dict[str, LiveMessage] = {}
        for message in messages:
            unique.setdefault(message.message_id, message)
        speaks = any(m.sender_role == SenderRole.HUMAN for m in unique.values())

        def work(conn: Connection, row: Record) -> MessageOutcome:
            if control is not None and not control(conn, row):
                raise NotInControl(
                    f"cannot post messages to session {session_id}: it is {row.status} and "
                    "controlled by another party", current_status=str(row.status))
            if not row.status.occupies_slot:
                raise Conflict(
                    f"session {session_id} is {row.status}; messages are accepted only "
                    "while it is ACTIVE or TRANSFERRED", current_status=str(row.status))
            assigned = None
            if speaks and row.status == S.TRANSFERRED:
                assigned = _ACCEPTED_TRANSFER.one_or_none(conn, {"pk": row.id})
                if assigned is not None:
                    check_speaker(session_id, assigned.agent_id, agent_id,
                                  as_operator=as_operator)
            now = utcnow()  # after the lock: before any change that waits for it

            def values(m: LiveMessage) -> dict[str, Any]:
                return {
                    "message_id": m.message_id, "session_pk": row.id,
                    "account_id": row.account_id, "shop_id": row.shop_id,
                    "sender_role": str(m.sender_role), "sender_id": m.sender_id,
                    "content": m.content, "message_type": m.message_type,
                    "sent_at": m.sent_at, "received_at": now, "posted_by": posted_by,
                    "agent_id": agent_id,
                }

            if len(unique) == 1:
                # One message (the common case): the unique key decides in the insert
                # itself; its count says whether it was new (validated values: nothing
                # else for IGNORE to hide).
                (only,) = unique.values()
                inserted = _INSERT_NEW_MESSAGE.execute(conn, values(only))
                fresh = [only] if inserted == 1 else []
            else:
                stored = set(conn.execute(_STORED_IDS, {"ids": list(unique)}).scalars()) \
                    if unique else set()
                fresh = [m for mid, m in unique.items() if mid not in stored]
                if fresh:
                    conn.execute(_INSERT_MESSAGES, [values(m) for m in fresh])
            changes: dict[str, Any] = {}
            if fresh:
                changes = _counters(row, fresh, now)
                changes["deadline_at"] = deadline_after(
                    self.settings, {**row._asdict(), **changes}, now)
                TOUCH_SESSION.execute(conn, {"pk": row.id, **changes})
            if (assigned is not None and assigned.first_response_at is None
                    and any(m.sender_role == SenderRole.HUMAN for m in fresh)):
                _FIRST_RESPONSE.execute(conn, {"transfer_pk": assigned.id, "now": now})
            return MessageOutcome(
                accepted=len(fresh), duplicates=len(messages) - len(fresh),
                session=session_view(row, changes), accepted_ids=[m.message_id for m in fresh])

        outcome = on_locked_row(self.database, session_id, work)
        if outcome.accepted and any(
                m.sender_role == SenderRole.COUNTERPART for m in unique.values()):
            # committed (a Core transaction, no unit of work); a failed kick: the next
            # message is judged again
            run_after_commit(lambda: self.counterpart_messages([session_id]))
        return outcome


def check_speaker(session_id: str, assignee: str | None, agent_id: str | None, *,
                  as_operator: bool) -> None:
    """One agent speaks: the assignee of the accepted transfer, or an operator naming
    no agent. A desk poster naming no agent is refused (422), another agent 409."""
    if agent_id is None:
        if as_operator:
            return
        raise ValidationFailed(
            f"session {session_id} is assigned to an agent: name the agent posting "
            "(`agent_id` in the body or the X-Agent-Id header)",
            errors=[{"field": "agent_id",
                     "message": "required on a session whose transfer was accepted"}])
    if agent_id != assignee:
        raise NotAssignee(
            f"session {session_id} is assigned to agent {assignee}; messages from "
            f"{agent_id} are refused", agent_id=assignee)


def _counters(row: Record, fresh: Sequence[LiveMessage], now: datetime) -> dict[str, Any]:
    """The session's counters and times after `fresh` (its row is locked: exact)."""
    by_role = {role: 0 for role in SenderRole}
    for m in fresh:
        by_role[m.sender_role] += 1
    first = min(m.sent_at for m in fresh)
    last = max(m.sent_at for m in fresh)
    return {
        "message_count": row.message_count + len(fresh),
        "robot_message_count": row.robot_message_count + by_role[SenderRole.ROBOT],
        "human_message_count": row.human_message_count + by_role[SenderRole.HUMAN],
        "counterpart_message_count":
            row.counterpart_message_count + by_role[SenderRole.COUNTERPART],
        "first_message_at": first if row.first_message_at is None
        else min(first, row.first_message_at),
        "last_message_at": last if row.last_message_at is None
        else max(last, row.last_message_at),
        "last_activity_at": now,
    }

