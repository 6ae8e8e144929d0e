"""How far a retention purge has deleted a table's id prefix (SPEC §6, §13)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, UTCDateTime


class RetentionMark(Base):
    """`purged_through`: every row of table `name` with an id up to it is deleted.

    The events feed reads it to tell a cursor past retention (410) from a hole left
    by a transaction still open (`app.events.feed`)."""

    __tablename__ = "retention_marks"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    purged_through: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


EVENTS_MARK = "events"
