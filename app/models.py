"""Every mapped table, imported in one place for Alembic and for `Base.metadata`."""

from admin.models import ConsoleLogin
from app.agents.models import Agent
from app.audit.models import Operation
from app.clients.models import ApiClient, IdempotencyRecord
from app.db import Base
from app.delivery.models import WebhookAttempt, WebhookCursor, WebhookDelivery
from app.detection.models import DetectionMark
from app.events.models import Event
from app.imports.models import (
    ImportChunk,
    ImportChunkPart,
    ImportJob,
    ImportSlotMark,
    ImportSplitPart,
    ImportUploadPart,
)
from app.messages.models import Message
from app.retention.models import RetentionMark
from app.sessions.models import Session, Slot
from app.transfers.models import Transfer

__all__ = [
    "Agent",
    "ApiClient",
    "Base",
    "ConsoleLogin",
    "DetectionMark",
    "Event",
    "IdempotencyRecord",
    "ImportChunk",
    "ImportChunkPart",
    "ImportJob",
    "ImportSlotMark",
    "ImportSplitPart",
    "ImportUploadPart",
    "Message",
    "Operation",
    "RetentionMark",
    "Session",
    "Slot",
    "Transfer",
    "WebhookAttempt",
    "WebhookCursor",
    "WebhookDelivery",
]
