"""The outbox's event types (SPEC §6): what a webhook, the feed and the stream announce.

Members are `StrEnum`s: stored, compared and serialised as their text
(`str(EventType.SESSION_ACTIVATED) == "session.activated"`), so the rows and the
payloads are the same as when they were written as bare strings."""

from __future__ import annotations

from enum import StrEnum


class EventType(StrEnum):
    SESSION_ACTIVATED = "session.activated"
    SESSION_QUEUED = "session.queued"
    SESSION_PAUSED = "session.paused"
    SESSION_RESUMED = "session.resumed"
    SESSION_TRANSFERRED = "session.transferred"
    SESSION_COMPLETED = "session.completed"
    SESSION_CANCELLED = "session.cancelled"
    SESSION_TIMEOUT = "session.timeout"
    SESSION_HANDED_BACK = "session.handed_back"
    SESSION_MERGED = "session.merged"
    SESSION_SPLIT = "session.split"
    TRANSFER_OFFERED = "transfer.offered"
    TRANSFER_ACCEPTED = "transfer.accepted"
    TRANSFER_REASSIGNED = "transfer.reassigned"
    TRANSFER_EXPIRED = "transfer.expired"
    TRANSFER_CANCELLED = "transfer.cancelled"
    TRANSFER_COMPLETED = "transfer.completed"
    TRANSFER_FIRST_RESPONSE_OVERDUE = "transfer.first_response_overdue"
    IMPORT_FINISHED = "import.finished"
