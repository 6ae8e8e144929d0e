"""Session rows and the slot guard."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    select,
)
from sqlalchemy.orm import Mapped, mapped_column, validates

from app.db import Base, BigId, EnumText, IdStr, JsonDoc, UTCDateTime, enum_member
from app.fastsql import Prepared
from app.sessions.enums import (
    Origin,
    PauseCause,
    SessionStatus,
    SessionType,
    TaskType,
)
from app.sessions.schemas import SessionView

ID_LEN = 64
_ENUM_KEYS = ("session_type", "task_type", "status", "pause_cause", "origin")


class Session(Base):
    """One conversation of our side with a counterpart on a slot (account_id, shop_id).

    `holds_slot` is 1 while the session is ACTIVE or TRANSFERRED and NULL otherwise;
    the unique key (account_id, shop_id, holds_slot) lets the database itself refuse a
    second occupant, whatever a lock holder believes.
    """

    __tablename__ = "sessions"
    __table_args__ = (
        UniqueConstraint("account_id", "shop_id", "holds_slot", name="uq_sessions_slot_occupant"),
        Index("ix_sessions_slot_status", "account_id", "shop_id", "status"),
        Index("ix_sessions_status_deadline", "status", "deadline_at"),
        Index("ix_sessions_owner", "owner_id", "status"),
        Index("ix_sessions_client", "client_id", "id"),
        Index("ix_sessions_agent", "assigned_agent_id", "status"),
        Index("ix_sessions_created", "created_at"),
        Index("ix_sessions_slot_thread", "account_id", "shop_id", "thread_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(IdStr(40), unique=True)
    account_id: Mapped[str] = mapped_column(IdStr(ID_LEN))
    shop_id: Mapped[str] = mapped_column(IdStr(ID_LEN))
    session_type: Mapped[SessionType] = mapped_column(EnumText(SessionType, 32))
    task_type: Mapped[TaskType] = mapped_column(EnumText(TaskType, 32))
    priority: Mapped[int] = mapped_column(Integer)
    status: Mapped[SessionStatus] = mapped_column(EnumText(SessionStatus, 16))
    holds_slot: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    pause_cause: Mapped[PauseCause | None] = mapped_column(EnumText(PauseCause, 16),
                                                           nullable=True)
    owner_id: Mapped[str | None] = mapped_column(IdStr(ID_LEN), nullable=True)
    client_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    assigned_agent_id: Mapped[str | None] = mapped_column(IdStr(ID_LEN), nullable=True)
    origin: Mapped[Origin] = mapped_column(EnumText(Origin, 8), default=Origin.LIVE)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_activity_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    message_count: Mapped[int] = mapped_column(Integer, default=0)
    robot_message_count: Mapped[int] = mapped_column(Integer, default=0)
    human_message_count: Mapped[int] = mapped_column(Integer, default=0)
    counterpart_message_count: Mapped[int] = mapped_column(Integer, default=0)
    first_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    end_reason: Mapped[str | None] = mapped_column(String(255), nullable=True)
    result: Mapped[Any | None] = mapped_column(JsonDoc, nullable=True)
    # operator corrections (SPEC §11): the session this one was merged into / cut from
    merged_into: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    split_from: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    preempted_by: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    interrupted_session_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    # hand-back to the robot (SPEC §12): the robot session that took the conversation
    # back links the completed one, and that one links it
    handed_back_from: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    handed_back_to: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    unanswered: Mapped[bool] = mapped_column(Boolean, default=False)
    context: Mapped[dict[str, Any] | None] = mapped_column(JsonDoc, nullable=True)
    # Imported sessions: why the session starts where it does (thread, reply, gap,
    # review; SPEC §4 step 4) and the source's conversation key, if it had one.
    started_by: Mapped[str | None] = mapped_column(String(8), nullable=True)
    thread_id: Mapped[str | None] = mapped_column(IdStr(128), nullable=True)
    # The hash of the last audit row, anchored outside the chain (SPEC §7): written in
    # the same transaction as every audit row, so verification sees a deleted last row.
    audit_head: Mapped[str | None] = mapped_column(String(64), nullable=True)

    @property
    def slot(self) -> tuple[str, str]:
        return (self.account_id, self.shop_id)

    @validates(*_ENUM_KEYS)
    def _as_member(self, key: str, value: Any) -> Any:
        return enum_member(self.__table__, key, value)

    @classmethod
    def new(cls, **values: Any) -> Session:
        """A new (transient) session holding `values`, as `Session(**values)` builds it
        (the enum validators applied, no other attribute set), without firing the
        attribute events of ~25 instrumented assignments (~70 µs of a create's CPU,
        measured): the values are the object's initial state. Later assignments are
        tracked as usual."""
        table = cls.__table__
        for key in _ENUM_KEYS:
            if key in values:
                values[key] = enum_member(table, key, values[key])
        for key in values:
            if key not in _COLUMN_KEYS:  # as the declarative constructor refuses it
                raise TypeError(f"{key!r} is an invalid keyword argument for {cls.__name__}")
        session: Session = cls.__mapper__.class_manager.new_instance()
        session.__dict__.update(values)
        return session


class Slot(Base):
    """The slot guard: one row per (account_id, shop_id) that has ever been used.

    `fence` is the fencing token: every change to a slot's occupancy is committed
    with `UPDATE … SET fence = fence + 1 WHERE fence = <value read>`, so a holder
    whose lock expired while it was paused can never commit over a newer holder.
    """

    __tablename__ = "slots"

    account_id: Mapped[str] = mapped_column(IdStr(ID_LEN), primary_key=True)
    shop_id: Mapped[str] = mapped_column(IdStr(ID_LEN), primary_key=True)
    fence: Mapped[int] = mapped_column(BigInteger, default=0)
    occupant_session_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


# The tables, typed for Core statements (the fence, the bulk sweep).
SESSIONS = cast(Table, Session.__table__)
_COLUMN_KEYS = frozenset(attr.key for attr in Session.__mapper__.column_attrs)
SLOTS = cast(Table, Slot.__table__)

# The hot paths' conditional UPDATEs (a heartbeat, a live message) find the session by
# its public id and test its status, type and client in the same WHERE. On a small table
# MySQL's optimizer may scan `ix_sessions_status_deadline` for the status instead: it
# then locks other sessions' index entries and, as the deadline moves under concurrent
# writers, can miss the row or deadlock with them. The unique key is always the plan.
BY_SESSION_ID_HINT = "FORCE INDEX (uq_sessions_session_id)"

# One session's whole row by its public id (Core: the hot reads build no ORM object).
SESSION_BY_ID = select(SESSIONS).where(SESSIONS.c.session_id == bindparam("session_id"))
# The hot paths' read (GET, the heartbeat's answer; see `app.fastsql`): what the view
# shows and the primary key (the desk's visibility look-up), not the columns only the
# services read (requested_at, holds_slot, the message times, the audit head).
VIEW_COLUMNS = [SESSIONS.c.id, *(SESSIONS.c[name] for name in SessionView.model_fields)]
READ_SESSION = Prepared(
    select(*VIEW_COLUMNS).where(SESSIONS.c.session_id == bindparam("session_id")))
