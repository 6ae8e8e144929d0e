"""Heartbeats — with live messages, the calls bots make most — under the session's own
row lock instead of a slot transaction.

Neither a heartbeat nor a message (`app.messages.service`) changes who occupies the
slot, so neither needs the slot lock or the fence. What they must be ordered with (a
pause, a transfer, a preemption, a timeout) changes the session row, and every slot
transaction locks that row before it changes it (`SlotTx.load` and `SlotTx.occupant`
read it `FOR UPDATE`, and take the time of the change after the lock). So a heartbeat
or a message either gets the row lock first and commits before the change, or waits
for it and then reads the changed row and is refused (or, for a heartbeat, answers the
new status). On SQLite every write transaction is serialised from its start (`BEGIN
IMMEDIATE`), which orders them the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, bindparam, case, or_, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from app.config import Settings
from app.db import Database, constant, is_retryable_db_error, one_of, utcnow
from app.errors import NotFound, ServiceUnavailable
from app.fastsql import Prepared, Record
from app.sessions.enums import HUMAN_TYPES, SessionStatus, is_human_type
from app.sessions.models import BY_SESSION_ID_HINT, READ_SESSION, SESSIONS
from app.sessions.schemas import SessionView

log = logging.getLogger(__name__)

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
TOUCH_SESSION = Prepared(update(SESSIONS).where(SESSIONS.c.id == bindparam("pk")),
                         values_from_params=True)
"""Set the given columns of the session with primary key :pk."""


def session_view(row: Record, changes: dict[str, Any]) -> SessionView:
    """The session as clients see it: its row as read, with `changes` applied."""
    return SessionView.model_validate({**row, **changes} if changes else row)


def on_locked_row[T](database: Database, session_id: str,
                     work: Callable[[Connection, Record], T]) -> T:
    """Run `work(conn, row)` with the session's row locked, in one transaction that
    commits; retried from a fresh read on a deadlock or a duplicate key."""
    last: Exception | None = None
    for attempt in range(MAX_ATTEMPTS):
        try:
            with database.transaction() as conn:
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


class SessionActivity:
    """Heartbeats, each one short transaction on the session's row."""

    def __init__(self, *, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings

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
            # the UPDATE and the read of the answer in one round trip (MySQL)
            touched, row = statement.execute_then_one(conn, {
                **parameters, "sid": session_id, "now": now,
                "human_deadline": now + timedelta(seconds=self.settings.human_session_timeout),
                "robot_deadline": now + timedelta(
                    seconds=self.settings.default_session_timeout),
            }, READ_SESSION, {"session_id": session_id})
        if touched != 1:
            return None
        assert row is not None  # it was there a statement ago; sessions are never deleted
        return session_view(row, {})

    def heartbeat(
        self, session_id: str, *, control: Control | None = None,
        controlled_if: ControlledIf | None = None,
    ) -> SessionView:
        """Keep a live session alive; answers its current status (terminal ones included,
        and unchanged for a caller that does not control it).

        `controlled_if` is `control` as a SQL condition: given it, the common case is one
        conditional UPDATE (which takes the row lock itself) and the read of the answer,
        sent together;
        when it matches nothing (a terminal session, a caller not in control, an unknown
        id) the locked path below says why."""
        if controlled_if is not None:
            view = self._touch_if(session_id, controlled_if)
            if view is not None:
                return view

        def work(conn: Connection, row: Record) -> SessionView:
            in_control = control(conn, row) if control is not None else True
            if row.status.is_terminal or not in_control:
                return session_view(row, {})
            now = utcnow()  # after the lock: ordered with any change of the row
            changes: dict[str, Any] = {"last_activity_at": now}
            changes["deadline_at"] = self.deadline({**row._asdict(), **changes}, now)
            TOUCH_SESSION.execute(conn, {"pk": row.id, **changes})
            return session_view(row, changes)

        return on_locked_row(self.database, session_id, work)


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
        .with_hint(BY_SESSION_ID_HINT, dialect_name="mysql")
        .where(c.session_id == bindparam("sid"), one_of(c.status, _LIVE), controlled_if)
        .values(
            last_activity_at=bindparam("now"),
            deadline_at=case(
                (c.status == constant(S.PENDING), c.deadline_at),
                (or_(one_of(c.session_type, _HUMAN), c.status == constant(S.TRANSFERRED)),
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
    human = is_human_type(values["session_type"]) or status == S.TRANSFERRED
    timeout = settings.human_session_timeout if human else settings.default_session_timeout
    last: datetime = values["last_activity_at"]
    return last + timedelta(seconds=timeout)

