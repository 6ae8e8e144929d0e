"""The audit trail's operations (SPEC §7): what an audit row says was done to a session.

Members are `StrEnum`s: stored and hashed as their text, so the rows and the hash
chain are the same as when they were written as bare strings."""

from __future__ import annotations

from enum import StrEnum


class AuditOperation(StrEnum):
    CREATE = "create"
    ACTIVATE = "activate"
    RESUME = "resume"
    RESUME_WAIT = "resume-wait"
    PAUSE = "pause"
    PREEMPT = "preempt"
    INTERRUPT = "interrupt"
    COMPLETE = "complete"
    CANCEL = "cancel"
    TIMEOUT = "timeout"
    TRANSFER = "transfer"
    TRANSFER_ACCEPT = "transfer-accept"
    TRANSFER_REASSIGN = "transfer-reassign"
    TRANSFER_EXPIRE = "transfer-expire"
    TRANSFER_ESCALATE = "transfer-escalate"
    HAND_BACK = "hand-back"
    MERGE = "merge"
    SPLIT = "split"
    FORCE_CLOSE = "force-close"
    RELEASE_SLOT = "release-slot"
    REDELIVER = "redeliver"
    IMPORT = "import"
    IMPORT_MESSAGES = "import-messages"
    IMPORT_CONFLICT = "import-conflict"
