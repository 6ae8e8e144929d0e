"""Heartbeats and live messages — the calls bots make most — under the session's own
row lock instead of a slot transaction.

Neither changes who occupies the slot, so neither needs the slot lock or the fence.
What they must be ordered with (a pause, a transfer, a preemption, a timeout) changes
the session row, and every slot transaction locks that row before it changes it
(`SlotTx.load` and `SlotTx.occupant` read it `FOR UPDATE`, and take the time of the
change after the lock). So a heartbeat or a message either gets the row lock first and
commits before the change, or waits for it and then reads the changed row and is
refused (or, for a heartbeat, answers the new status). On SQLite every write
transaction is serialised from its start (`BEGIN IMMEDIATE`), which orders them the
same way. De-duplication by `message_id` is the unique key's job; a concurrent
duplicate that slips past the look-up makes the insert fail and the whole unit is
retried, finding it stored.

Live messages are their own append-only record (SPEC §7): each row keeps who posted
it (`posted_by`, and the desk's `agent_id`) and when it was received; a batch writes no
audit row of its own.

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
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Table,
    bindparam,
    case,
    insert,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError

from app.config import Settings
from app.db import Database, is_retryable_db_error, one_of, run_after_commit, utcnow
from app.errors import (
    Conflict,
    NotAssignee,
    NotFound,
    NotInControl,
    ServiceUnavailable,
    ValidationFailed,
)
from app.fastsql import Prepared, Record
from app.messages.models import Message
from app.sessions.enums import (
    HUMAN_TYPES,
    SenderRole,
    SessionStatus,
    SessionType,
    TransferStatus,
)
from app.sessions.models import READ_SESSION, SESSIONS
from app.sessions.schemas import SessionView
from app.transfers.models import Transfer

log = logging.getLogger(__name__)

T = TypeVar("T")
MESSAGES = cast(Table, Message.__table__)
MAX_ATTEMPTS = 3
S = SessionStatus

Control = Callable[[Connection, Any], bool]
"""Whether the caller controls the (locked) session row; raises NotFound when the caller
may not even see it. The HTTP layer builds one per request (`app.api.access`)."""
ControlledIf = tuple[ColumnElement[bool], dict[str, Any]]
"""`Control` as a SQL condition on the session's row, with its parameters."""

_LOCK_SESSION = Prepared(
    select(SESSIONS).where(SESSIONS.c.session_id == bindparam("session_id")).with_for_update()
)
_STORED_IDS = select(MESSAGES.c.message_id).where(
    MESSAGES.c.message_id.in_(bindparam("ids", expanding=True)))
_INSERT_MESSAGES = insert(MESSAGES)
_INSERT_NEW_MESSAGE = Prepared(insert(MESSAGES).prefix_with("IGNORE", dialect="mysql")
                               .prefix_with("OR IGNORE", dialect="sqlite"),
                               values_from_params=True)
_TOUCH = Prepared(update(SESSIONS).where(SESSIONS.c.id == bindparam("pk")),
                  values_from_params=True)
TRANSFERS = cast(Table, Transfer.__table__)
# The accepted transfer of a TRANSFERRED session (read under the session's row lock:
# its assignee cannot change until this transaction ends).
_ACCEPTED_TRANSFER = Prepared(
    select(TRANSFERS.c.id, TRANSFERS.c.transfer_id, TRANSFERS.c.agent_id,
           TRANSFERS.c.first_response_at)
    .where(TRANSFERS.c.session_pk == bindparam("pk"),
           TRANSFERS.c.status == str(TransferStatus.ACCEPTED))
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


def _view(row: Record, changes: dict[str, Any]) -> SessionView:
    return SessionView.model_validate({**row, **changes} if changes else row)


class SessionActivity:
    """Heartbeats and live messages, each one short transaction on the session's row."""

    def __init__(
        self, *, database: Database, settings: Settings,
        counterpart_messages: Callable[[list[str]], None] = lambda ids: None,
    ) -> None:
        self.database = database
        self.settings = settings
        self.counterpart_messages = counterpart_messages

    def deadline(self, session: Any, now: datetime) -> datetime | None:
        return deadline_after(self.settings, session, now)

    def _touch_if(self, session_id: str, controlled_if: ControlledIf) -> SessionView | None:
        condition, parameters = controlled_if
        statement = _TOUCH_STATEMENTS.get(id(condition))
        if statement is None:  # conditions are module constants: their ids are stable
            statement = _TOUCH_STATEMENTS.setdefault(
                id(condition), Prepared(_touch_statement(condition)))
        now = utcnow()
        with self.database.connect() as conn:
            touched = statement.execute(conn, {
                **parameters, "sid": session_id, "now": now,
                "human_deadline": now + timedelta(seconds=self.settings.human_session_timeout),
                "robot_deadline": now + timedelta(
                    seconds=self.settings.default_session_timeout),
            })
            if touched != 1:
                return None
            row = READ_SESSION.one_or_none(conn, {"session_id": session_id})
        assert row is not None  # it was there a statement ago; sessions are never deleted
        return _view(row, {})

    def _on_locked_row(self, session_id: str, work: Callable[[Connection, Record], T]) -> T:
        """Run `work(conn, row)` with the session's row locked, in one transaction that
        commits; retried from a fresh read on a deadlock or a duplicate key."""
        last: Exception | None = None
        for attempt in range(MAX_ATTEMPTS):
            try:
                with self.database.transaction() as conn:
                    row = _LOCK_SESSION.one_or_none(conn, {"session_id": session_id})
                    if row is None:
                        raise NotFound(f"session {session_id} not found")
                    result = work(conn, row)
                return result
            except (IntegrityError, OperationalError) as exc:
                if isinstance(exc, OperationalError) and not is_retryable_db_error(exc):
                    raise
                last = exc
                log.info("session %s attempt %d retried: %s", session_id, attempt + 1,
                         exc.__class__.__name__)
        raise ServiceUnavailable(
            f"session {session_id} stayed contended after {MAX_ATTEMPTS} attempts; retry"
        ) from last

    def heartbeat(
        self, session_id: str, *, control: Control | None = None,
        controlled_if: ControlledIf | None = None,
    ) -> SessionView:
        """Keep a live session alive; answers its current status (terminal ones included,
        and unchanged for a caller that does not control it).

        `controlled_if` is `control` as a SQL condition: given it, the common case is one
        conditional UPDATE (which takes the row lock itself) and the read of the answer;
        when it matches nothing (a terminal session, a caller not in control, an unknown
        id) the locked path below says why."""
        if controlled_if is not None:
            view = self._touch_if(session_id, controlled_if)
            if view is not None:
                return view

        def work(conn: Connection, row: Record) -> SessionView:
            in_control = control(conn, row) if control is not None else True
            if S(row.status).is_terminal or not in_control:
                return _view(row, {})
            now = utcnow()  # after the lock: ordered with any change of the row
            changes: dict[str, Any] = {"last_activity_at": now}
            changes["deadline_at"] = self.deadline({**row._asdict(), **changes}, now)
            _TOUCH.execute(conn, {"pk": row.id, **changes})
            return _view(row, changes)

        return self._on_locked_row(session_id, work)

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
            if not S(row.status).occupies_slot:
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
                changes["deadline_at"] = self.deadline({**row._asdict(), **changes}, now)
                _TOUCH.execute(conn, {"pk": row.id, **changes})
            if (assigned is not None and assigned.first_response_at is None
                    and any(m.sender_role == SenderRole.HUMAN for m in fresh)):
                _FIRST_RESPONSE.execute(conn, {"transfer_pk": assigned.id, "now": now})
            return MessageOutcome(
                accepted=len(fresh), duplicates=len(messages) - len(fresh),
                session=_view(row, changes), accepted_ids=[m.message_id for m in fresh])

        outcome = self._on_locked_row(session_id, work)
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


_LIVE = [str(s) for s in (S.PENDING, S.ACTIVE, S.PAUSED, S.TRANSFERRED)]
_HUMAN = sorted(str(t) for t in HUMAN_TYPES)


# one compiled heartbeat per control condition (a handful: one per role)
_TOUCH_STATEMENTS: dict[int, Prepared] = {}


def _touch_statement(controlled_if: ColumnElement[bool]) -> Any:
    """The heartbeat as one statement: `deadline_after` in SQL (a PENDING session keeps
    its deadline; a human or TRANSFERRED one gets the human timeout)."""
    c = SESSIONS.c
    return (
        update(SESSIONS)
        .where(c.session_id == bindparam("sid"), one_of(c.status, _LIVE), controlled_if)
        .values(
            last_activity_at=bindparam("now"),
            deadline_at=case(
                (c.status == S.PENDING, c.deadline_at),
                (or_(one_of(c.session_type, _HUMAN), c.status == S.TRANSFERRED),
                 bindparam("human_deadline", type_=c.deadline_at.type)),
                else_=bindparam("robot_deadline", type_=c.deadline_at.type),
            ),
        )
    )


def deadline_after(settings: Settings, session: Any, now: datetime) -> datetime | None:
    """When the sweep times a session out (SPEC §3.7), given its status, type and times
    (a `Session`, or a mapping of its columns); None once terminal."""
    values = session if isinstance(session, dict) else {
        name: getattr(session, name)
        for name in ("status", "session_type", "requested_at", "last_activity_at")}
    status = SessionStatus(values["status"])
    if status.is_terminal:
        return None
    if status == S.PENDING:
        requested: datetime = values["requested_at"]
        return requested + timedelta(seconds=settings.pending_timeout)
    human = SessionType(values["session_type"]).is_human or status == S.TRANSFERRED
    timeout = settings.human_session_timeout if human else settings.default_session_timeout
    last: datetime = values["last_activity_at"]
    return last + timedelta(seconds=timeout)


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
