"""API clients (bot, desk, admin) with hashed bearer tokens, and idempotency records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdStr, JsonDoc, UTCDateTime


class ApiClient(Base):
    __tablename__ = "api_clients"

    client_id: Mapped[str] = mapped_column(IdStr(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    token_prefix: Mapped[str] = mapped_column(String(16))
    webhook_url: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    webhook_secret: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class IdempotencyRecord(Base):
    """The stored answer to a create request, keyed by (client, Idempotency-Key)."""

    __tablename__ = "idempotency_records"
    __table_args__ = (Index("ix_idempotency_created", "created_at"),)

    client_id: Mapped[str] = mapped_column(IdStr(40), primary_key=True)
    key: Mapped[str] = mapped_column(IdStr(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[Any] = mapped_column(JsonDoc)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
