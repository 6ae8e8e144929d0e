"""The outbox (SPEC §6): every state change writes an event in its own transaction."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Index, String, Table
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, IdStr, JsonDoc, UTCDateTime


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_client", "client_id", "id"),
        Index("ix_events_session", "session_id", "id"),
        Index("ix_events_type", "type", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(48))
    session_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    account_id: Mapped[str | None] = mapped_column(IdStr(64), nullable=True)
    shop_id: Mapped[str | None] = mapped_column(IdStr(64), nullable=True)
    client_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    audience: Mapped[str] = mapped_column(String(16), default="owner")
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any]] = mapped_column(JsonDoc, default=dict)


# The table, typed for Core bulk statements (slot transactions, sweeps).
EVENTS = cast(Table, Event.__table__)
