"""Human agents of the desk: presence, skills and capacity for transfer routing."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, IdStr, JsonDoc, UTCDateTime
from app.sessions.models import ID_LEN


class Agent(Base):
    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(IdStr(ID_LEN), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    presence: Mapped[str] = mapped_column(String(16), default="offline", index=True)
    skills: Mapped[list[str]] = mapped_column(JsonDoc, default=list)
    max_concurrent: Mapped[int | None] = mapped_column(Integer, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
