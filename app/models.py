"""Every mapped table, imported in one place for Alembic and for `Base.metadata`."""

from app.agents.models import Agent
from app.audit.models import Operation
from app.clients.models import ApiClient, IdempotencyRecord
from app.db import Base
from app.events.models import Event
from app.messages.models import Message
from app.sessions.models import Session, Slot
from app.transfers.models import Transfer

__all__ = [
    "Agent",
    "ApiClient",
    "Base",
    "Event",
    "IdempotencyRecord",
    "Message",
    "Operation",
    "Session",
    "Slot",
    "Transfer",
]
