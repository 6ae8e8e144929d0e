"""The vocabulary of SPEC §2–3: session types, task types, priorities, statuses."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class SessionType(StrEnum):
    AUTO_BARGAIN = "AUTO_BARGAIN"
    AUTO_FOLLOW_UP = "AUTO_FOLLOW_UP"
    MANUAL_CUSTOMER_SERVICE = "MANUAL_CUSTOMER_SERVICE"
    MANUAL_COMPLAINT = "MANUAL_COMPLAINT"
    MANUAL_URGENT = "MANUAL_URGENT"

    @property
    def is_human(self) -> bool:
        return self in HUMAN_TYPES

    @property
    def is_robot(self) -> bool:
        return self not in HUMAN_TYPES


HUMAN_TYPES = frozenset(t for t in SessionType if t.name.startswith("MANUAL_"))
ROBOT_TYPES = frozenset(t for t in SessionType if t not in HUMAN_TYPES)


def is_human_type(session_type: str) -> bool:
    """Whether a session of this type (a `SessionType` or its stored text) is a human
    one: the one test, in Python (`SessionType.is_human`) as in SQL (`HUMAN_TYPES`)."""
    return session_type in HUMAN_TYPES


class TaskType(StrEnum):
    CONSULTATION = "consultation"
    COMPLAINT = "complaint"
    ORDER_INQUIRY = "order_inquiry"
    NEGOTIATION = "negotiation"
    FOLLOW_UP = "follow_up"


class Priority(IntEnum):
    EMERGENCY = 1
    HIGH = 2
    MEDIUM = 3
    LOW = 4


class SessionStatus(StrEnum):
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    TRANSFERRED = "TRANSFERRED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES

    @property
    def occupies_slot(self) -> bool:
        return self in (SessionStatus.ACTIVE, SessionStatus.TRANSFERRED)


TERMINAL_STATUSES = frozenset(
    {SessionStatus.COMPLETED, SessionStatus.CANCELLED, SessionStatus.TIMEOUT}
)
OPEN_STATUSES = frozenset(s for s in SessionStatus if s not in TERMINAL_STATUSES)


class PauseCause(StrEnum):
    """Why a PAUSED session is paused: it decides whether it comes back by itself."""

    PREEMPTED = "preempted"  # waits in line; promoted when the slot frees
    OWNER = "owner"  # paused by its owner; back only when the owner resumes


class Origin(StrEnum):
    LIVE = "live"
    IMPORT = "import"


class SenderRole(StrEnum):
    ROBOT = "robot"
    HUMAN = "human"
    COUNTERPART = "counterpart"
    SYSTEM = "system"
