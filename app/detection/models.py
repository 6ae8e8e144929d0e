"""How far transfer detection has read each session's messages."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Integer
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, BigId, UTCDateTime


class DetectionMark(Base):
    """The last message (by primary key) that detection examined for a session, so a
    message is judged once and an old request for a person does not fire again later."""

    __tablename__ = "detection_marks"

    session_pk: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=False)
    last_message_pk: Mapped[int] = mapped_column(BigInteger, default=0)
    # The session's counterpart_message_count when a run had judged all of them: below
    # the session's count, a counterpart message is waiting for a run that may have been
    # lost (`missed_sessions`, the beat's safety net).
    counterpart_seen: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
