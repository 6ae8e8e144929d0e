"""Stored chat messages. `message_id` is unique: de-duplication is the database's job."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, IdStr, UTCDateTime
from app.sessions.enums import SenderRole
from app.sessions.models import ID_LEN


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_slot_time", "account_id", "shop_id", "sent_at"),
        Index("ix_messages_session_time", "session_pk", "sent_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(IdStr(128), unique=True)
    session_pk: Mapped[int] = mapped_column(
        BigId, ForeignKey("sessions.id")
    )
    account_id: Mapped[str] = mapped_column(IdStr(ID_LEN))
    shop_id: Mapped[str] = mapped_column(IdStr(ID_LEN))
    sender_role: Mapped[SenderRole] = mapped_column(String(16))
    sender_id: Mapped[str | None] = mapped_column(IdStr(ID_LEN), nullable=True)
    content: Mapped[str] = mapped_column(Text)
    message_type: Mapped[str] = mapped_column(String(32), default="text")
    sent_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    import_job_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    # who posted a live message: the API client (or `python-api`, `system:…`) and, for the
    # desk, the agent; imported rows have neither (their job says where they came from)
    posted_by: Mapped[str | None] = mapped_column(IdStr(64), nullable=True)
    agent_id: Mapped[str | None] = mapped_column(IdStr(64), nullable=True)
