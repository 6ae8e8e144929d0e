"""Webhook delivery state: one row per (client, event), its attempts, and a fan-out cursor.

The outbox (`events`) is the source of truth; these tables only remember what was
sent where. A delivery row is created once per client and event (unique key), so a
fan-out that runs twice, or on two workers, never sends an event twice.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, IdStr, UTCDateTime


class DeliveryStatus:
    PENDING = "pending"  # not yet delivered; `next_attempt_at` says when to try
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up after WEBHOOK_MAX_ATTEMPTS; visible to admins


class WebhookDelivery(Base):
    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("client_id", "event_pk", name="uq_webhook_deliveries_client_event"),
        Index("ix_webhook_deliveries_queue", "client_id", "status", "event_pk"),
        Index("ix_webhook_deliveries_status", "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(IdStr(40), unique=True)
    client_id: Mapped[str] = mapped_column(IdStr(40))
    # No foreign key: a delivery (DELIVERIES_RETENTION) outlives its event (EVENTS_RETENTION).
    event_pk: Mapped[int] = mapped_column(BigId)
    session_id: Mapped[str | None] = mapped_column(IdStr(40), nullable=True)
    event_type: Mapped[str] = mapped_column(String(48))
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # An operator's last redelivery of it once given up (admin API, audited).
    redelivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    redelivered_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class WebhookAttempt(Base):
    """One POST of a delivery: when, what came back, how long it took."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_pk", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    delivery_pk: Mapped[int] = mapped_column(BigId, ForeignKey("webhook_deliveries.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(1024))
    attempted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)


class WebhookCursor(Base):
    """How far a client's fan-out has scanned the outbox for good (see delivery.service)."""

    __tablename__ = "webhook_cursors"

    client_id: Mapped[str] = mapped_column(IdStr(40), primary_key=True)
    last_event_pk: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
