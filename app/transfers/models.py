"""Transfer records: a robot session handed to the human desk (SPEC §3.6)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, Text
from sqlalchemy.orm import Mapped, mapped_column, validates

from app.db import Base, BigId, EnumText, IdStr, JsonDoc, UTCDateTime, enum_member
from app.ids import new_id
from app.sessions.models import ID_LEN
from app.transfers.enums import TransferStatus, TransferTrigger


class Transfer(Base):
    __tablename__ = "session_transfers"
    __table_args__ = (
        Index("ix_transfers_status_expiry", "status", "expires_at"),
        Index("ix_transfers_queue", "status", "urgency", "created_at"),
        Index("ix_transfers_session", "session_pk", "status"),
        Index("ix_transfers_agent", "offered_agent_id", "status"),
        Index("ix_transfers_first_response_due", "first_response_due_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    transfer_id: Mapped[str] = mapped_column(IdStr(40), unique=True)
    session_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("sessions.id")
    )
    session_id: Mapped[str] = mapped_column(IdStr(40))
    status: Mapped[TransferStatus] = mapped_column(EnumText(TransferStatus, 16))
    urgency: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    trigger: Mapped[TransferTrigger] = mapped_column(EnumText(TransferTrigger, 16))
    requested_agent_id: Mapped[str | None] = mapped_column(IdStr(ID_LEN), nullable=True)
    offered_agent_id: Mapped[str | None] = mapped_column(IdStr(ID_LEN), nullable=True)
    agent_id: Mapped[str | None] = mapped_column(IdStr(ID_LEN), nullable=True)
    history: Mapped[Any | None] = mapped_column(JsonDoc, nullable=True)
    task_state: Mapped[Any | None] = mapped_column(JsonDoc, nullable=True)
    customer_info: Mapped[Any | None] = mapped_column(JsonDoc, nullable=True)
    suggestion: Mapped[str | None] = mapped_column(Text, nullable=True)
    escalations: Mapped[int] = mapped_column(Integer, default=0)
    previous_transfer_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    offered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    accepted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # the desk's hand-back packet (summary, outcome, next_action, context), SPEC §12
    hand_back: Mapped[Any | None] = mapped_column(JsonDoc, nullable=True)
    # first response (SPEC §12): the first human message after the accept; the sweep
    # looks at a transfer once `first_response_due_at` passes (then clears it) and flags
    # it overdue if nobody answered
    first_response_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    first_response_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    first_response_overdue_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, nullable=True)

    @validates("status", "trigger")
    def _as_member(self, key: str, value: Any) -> Any:
        return enum_member(self.__table__, key, value)


def transfer_values(
    *,
    session_pk: int,
    session_id: str,
    urgency: int,
    reason: str,
    trigger: str,
    at: datetime,
    expires_at: datetime | None,
    status: str = TransferStatus.PENDING,
    requested_agent_id: str | None = None,
    offered_agent_id: str | None = None,
    agent_id: str | None = None,
    history: Any | None = None,
    task_state: Any | None = None,
    customer_info: Any | None = None,
    suggestion: str | None = None,
    escalations: int = 0,
    previous_transfer_id: str | None = None,
    accepted_at: datetime | None = None,
    ended_at: datetime | None = None,
) -> dict[str, Any]:
    """The columns of a new transfer record, created and offered `at`, with a new
    public id: every transfer (an offer, an escalation, a hand-off found in imported
    history) is built here, as `Transfer(**values)` or as a row for a bulk insert."""
    return {
        "transfer_id": new_id("trf"), "session_pk": session_pk, "session_id": session_id,
        "status": status, "urgency": urgency, "reason": reason, "trigger": trigger,
        "requested_agent_id": requested_agent_id, "offered_agent_id": offered_agent_id,
        "agent_id": agent_id, "history": history, "task_state": task_state,
        "customer_info": customer_info, "suggestion": suggestion, "escalations": escalations,
        "previous_transfer_id": previous_transfer_id, "created_at": at, "offered_at": at,
        "expires_at": expires_at, "accepted_at": accepted_at, "ended_at": ended_at,
    }
