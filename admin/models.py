"""The console's log-ins, kept on the server so that logging out ends them (SPEC §13)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdStr, UTCDateTime


class ConsoleLogin(Base):
    """One console log-in of an admin client.

    The cookie holds a random secret; `login_id` is its SHA-256 (like API tokens, a copy
    of this table lets nobody in). `token_hash` is the admin token's hash at log-in: a
    rotated or revoked token ends the log-in. A log-in is valid until `expires_at`
    unless `ended_at` (log-out) is set."""

    __tablename__ = "console_logins"
    __table_args__ = (Index("ix_console_logins_expires_at", "expires_at"),)

    login_id: Mapped[str] = mapped_column(IdStr(64), primary_key=True)
    client_id: Mapped[str] = mapped_column(
        IdStr(40), ForeignKey("api_clients.client_id"), index=True
    )
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
