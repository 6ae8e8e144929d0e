"""The append-only audit trail (SPEC §7), hash-chained per session."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Index, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, IdStr, JsonDoc, UTCDateTime


class Operation(Base):
    __tablename__ = "session_operations"
    __table_args__ = (
        Index("ix_operations_session", "session_pk", "id"),
        Index("ix_operations_created", "created_at"),
        Index("ix_operations_actor", "actor", "created_at"),
        Index("ix_operations_operation", "operation", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    session_pk: Mapped[int] = mapped_column(BigId)
    session_id: Mapped[str] = mapped_column(IdStr(40))
    operation: Mapped[str] = mapped_column(String(32))
    from_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    to_status: Mapped[str | None] = mapped_column(String(16), nullable=True)
    actor: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    details: Mapped[Any | None] = mapped_column(JsonDoc, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    row_hash: Mapped[str] = mapped_column(String(64))


# The table, typed for Core bulk statements (slot transactions, sweeps, imports).
OPERATIONS = cast(Table, Operation.__table__)
