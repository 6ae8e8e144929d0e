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
from datetime import datetime, timedelta
from typing import Any, cast

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
from sqlalchemy.exc import DBAPIError

from app.config import Settings
from app.db import Database, constant, is_retryable_db_error, one_of, run_after_commit, utcnow
from app.errors import Conflict, NotAssignee, NotInControl, ValidationFailed
from app.fastsql import (
    Prepared,
    Record,
    end_transaction,
    in_one_query,
    takes_several_statements,
)
from app.messages.models import Message
from app.sessions.activity import (
    TOUCH_SESSION,
    Control,
    ControlledIf,
    deadline_after,
    on_locked_row,
    session_view,
)
from app.sessions.enums import HUMAN_TYPES, SenderRole, SessionStatus
from app.sessions.models import BY_SESSION_ID_HINT, READ_SESSION, SESSIONS
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
        controlled_if: ControlledIf | None = None, fits: Fits = (None, None),
    ) -> MessageOutcome:
        """Store live messages on an ACTIVE or TRANSFERRED session, de-duplicated by id.

        `agent_id` is the desk agent posting; `as_operator` lets a poster that names no
        agent (an admin, the Python API) speak on an accepted transfer.

        `controlled_if` is `control` as a SQL condition, and `fits` the account and shop
        the batch names (None: any): given them, one new robot or counterpart message
        (what bots post) is stored in two round trips (`_record_one`); anything else, or
        a message that path does not store, takes the row-locked path below."""
        unique: dict[str, LiveMessage] = {}
        for message in messages:
            unique.setdefault(message.message_id, message)
        speaks = any(m.sender_role == SenderRole.HUMAN for m in unique.values())
        if controlled_if is not None and len(messages) == 1 and not speaks:
            fast = self._record_one(session_id, messages[0], controlled_if, fits,
                                    posted_by=posted_by, agent_id=agent_id)
            if fast is not None:
                return fast

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

    def _record_one(self, session_id: str, message: LiveMessage, controlled_if: ControlledIf,
                    fits: Fits, *, posted_by: str | None,
                    agent_id: str | None) -> MessageOutcome | None:
        """One robot or counterpart message in two round trips instead of four, on MySQL
        (a connection of the AUTOCOMMIT pool, which takes several statements a query):

        1. `START TRANSACTION`; the session's counters and times moved by a conditional
           UPDATE (it takes the row lock, as `SELECT … FOR UPDATE` does, and matches only
           a live session the caller controls: `controlled_if`, `fits`); the message
           inserted from the session's row (`INSERT IGNORE … SELECT`: nothing when its id
           is stored); the row read for the answer;
        2. `COMMIT` when both wrote one row; else `ROLLBACK`, and None: the row-locked
           path decides (a duplicate, a session not live or not the caller's, each with
           its own answer).

        Ordered with every change of the session as the row-locked path is: the UPDATE
        waits for the row lock, and a change that waits for ours sees the message
        stored; `received_at` is taken before the lock, so before any such change."""
        if self.database.dialect != "mysql":
            return None
        statements = _one_message_statements(controlled_if[0], message.sender_role, fits)
        now = utcnow()
        params: dict[str, Any] = {
            **controlled_if[1], "sid": session_id, "now": now,
            "fit_account": fits[0], "fit_shop": fits[1],
            "human_deadline": now + timedelta(seconds=self.settings.human_session_timeout),
            "robot_deadline": now + timedelta(seconds=self.settings.default_session_timeout),
            "message_id": message.message_id, "sender_role": str(message.sender_role),
            "sender_id": message.sender_id, "content": message.content,
            "message_type": message.message_type, "sent_at": message.sent_at,
            "posted_by": posted_by, "agent_id": agent_id,
        }
        with self.database.connect() as conn:
            if not takes_several_statements(conn):
                return None
            try:
                (_, _), (touched, _), (inserted, _), (_, rows) = in_one_query(conn, [
                    "START TRANSACTION", (statements[0], params), (statements[1], params),
                    (READ_SESSION, {"session_id": session_id})])
                stored = touched == 1 and inserted == 1
                end_transaction(conn, commit=stored)
            except BaseException as exc:
                _end_or_drop(conn)
                if isinstance(exc, DBAPIError) and is_retryable_db_error(exc):
                    # a deadlock, a lock wait, a lost connection (even at COMMIT: then
                    # the message may be stored, and is found as a duplicate): the
                    # row-locked path decides afresh, or answers the 503
                    return None
                raise
        if not stored:
            return None
        if message.sender_role == SenderRole.COUNTERPART:
            run_after_commit(lambda: self.counterpart_messages([session_id]))
        return MessageOutcome(accepted=1, duplicates=0, session=session_view(rows[0], {}),
                              accepted_ids=[message.message_id])


Fits = tuple[str | None, str | None]
"""The account and shop a batch of messages names (None: it names none)."""

# one pair of statements per (control condition, sender role, what the batch names)
_ONE_MESSAGE: dict[tuple[int, str, bool, bool], tuple[Prepared, Prepared]] = {}
_LIVE = [str(S.ACTIVE), str(S.TRANSFERRED)]
_HUMAN_TYPES = sorted(str(t) for t in HUMAN_TYPES)
_COUNT_OF = {SenderRole.ROBOT: "robot_message_count", SenderRole.HUMAN: "human_message_count",
             SenderRole.COUNTERPART: "counterpart_message_count"}


def _one_message_statements(controlled_if: ColumnElement[bool], role: SenderRole,
                            fits: Fits) -> tuple[Prepared, Prepared]:
    key = (id(controlled_if), str(role), fits[0] is not None, fits[1] is not None)
    found = _ONE_MESSAGE.get(key)
    if found is None:  # conditions are module constants: their ids are stable
        found = _ONE_MESSAGE.setdefault(key, _build_one_message(controlled_if, role, fits))
    return found


def _build_one_message(controlled_if: ColumnElement[bool], role: SenderRole,
                       fits: Fits) -> tuple[Prepared, Prepared]:
    """The UPDATE of `_record_one` (`_counters` and `deadline_after` in SQL, for a live
    session) and its INSERT … SELECT."""
    c, m = SESSIONS.c, MESSAGES.c
    at = c.last_message_at.type
    sent_at = bindparam("sent_at", type_=at)
    where = [c.session_id == bindparam("sid"), one_of(c.status, _LIVE), controlled_if]
    if fits[0] is not None:
        where.append(c.account_id == bindparam("fit_account"))
    if fits[1] is not None:
        where.append(c.shop_id == bindparam("fit_shop"))
    count = getattr(c, _COUNT_OF[role])
    touch = update(SESSIONS).with_hint(BY_SESSION_ID_HINT, dialect_name="mysql").where(
        *where).values({
        c.message_count: c.message_count + 1,
        count: count + 1,
        c.first_message_at: case((or_(c.first_message_at.is_(None),
                                      c.first_message_at > sent_at), sent_at),
                                 else_=c.first_message_at),
        c.last_message_at: case((or_(c.last_message_at.is_(None),
                                     c.last_message_at < sent_at), sent_at),
                                else_=c.last_message_at),
        c.last_activity_at: bindparam("now", type_=at),
        c.deadline_at: case(
            (or_(one_of(c.session_type, _HUMAN_TYPES), c.status == constant(S.TRANSFERRED)),
             bindparam("human_deadline", type_=at)),
            else_=bindparam("robot_deadline", type_=at)),
    })
    columns = {
        "message_id": bindparam("message_id", type_=m.message_id.type),
        "session_pk": c.id, "account_id": c.account_id, "shop_id": c.shop_id,
        "sender_role": bindparam("sender_role", type_=m.sender_role.type),
        "sender_id": bindparam("sender_id", type_=m.sender_id.type),
        "content": bindparam("content", type_=m.content.type),
        "message_type": bindparam("message_type", type_=m.message_type.type),
        "sent_at": sent_at, "received_at": bindparam("now", type_=at),
        "posted_by": bindparam("posted_by", type_=m.posted_by.type),
        "agent_id": bindparam("agent_id", type_=m.agent_id.type),
    }
    store = insert(MESSAGES).prefix_with("IGNORE", dialect="mysql").from_select(
        list(columns), select(*columns.values()).where(c.session_id == bindparam("sid")))
    return Prepared(touch), Prepared(store)


def _end_or_drop(conn: Connection) -> None:
    """After a failure inside `_record_one`'s transaction: roll it back, or, if even that
    fails, drop the connection (it must not go back to the AUTOCOMMIT pool inside a
    transaction)."""
    if conn.invalidated:
        return
    try:
        end_transaction(conn, commit=False)
    except Exception as exc:  # noqa: BLE001 - any failure: the connection is not reused
        if not conn.invalidated:
            conn.invalidate(exc)


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

