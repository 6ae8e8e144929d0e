"""The domain rules of SPEC §3, as pure functions: no database, no I/O.

State machine (the seed's, exactly), default priorities, precedence and the
conflict decision between a request and a slot's occupant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from app.errors import InvalidTransition
from app.sessions.enums import Priority, SessionStatus, SessionType, TaskType

S = SessionStatus
ALLOWED_TRANSITIONS: dict[SessionStatus, frozenset[SessionStatus]] = {
    S.PENDING: frozenset({S.ACTIVE, S.CANCELLED, S.TIMEOUT}),
    S.ACTIVE: frozenset({S.COMPLETED, S.TRANSFERRED, S.PAUSED, S.CANCELLED, S.TIMEOUT}),
    S.PAUSED: frozenset({S.ACTIVE, S.CANCELLED, S.TIMEOUT}),
    S.TRANSFERRED: frozenset({S.COMPLETED, S.CANCELLED, S.TIMEOUT}),
    S.COMPLETED: frozenset(),
    S.CANCELLED: frozenset(),
    S.TIMEOUT: frozenset(),
}


def check_transition(current: SessionStatus, target: SessionStatus) -> None:
    """Raise InvalidTransition naming the current status and the allowed targets."""
    allowed = ALLOWED_TRANSITIONS[current]
    if target not in allowed:
        raise InvalidTransition(current=current, target=target, allowed=sorted(allowed))


DEFAULT_PRIORITY_BY_TYPE: dict[SessionType, Priority] = {
    SessionType.MANUAL_URGENT: Priority.EMERGENCY,
    SessionType.MANUAL_CUSTOMER_SERVICE: Priority.HIGH,
    SessionType.MANUAL_COMPLAINT: Priority.HIGH,
    SessionType.AUTO_BARGAIN: Priority.MEDIUM,
    SessionType.AUTO_FOLLOW_UP: Priority.LOW,
}

DEFAULT_PRIORITY_BY_TASK: dict[TaskType, Priority] = {
    TaskType.COMPLAINT: Priority.HIGH,
    TaskType.NEGOTIATION: Priority.MEDIUM,
    TaskType.CONSULTATION: Priority.MEDIUM,
    TaskType.ORDER_INQUIRY: Priority.LOW,
    TaskType.FOLLOW_UP: Priority.LOW,
}

# Rank among equal priorities: URGENT, CUSTOMER_SERVICE, COMPLAINT, BARGAIN, FOLLOW_UP.
TYPE_RANK: dict[SessionType, int] = {
    SessionType.MANUAL_URGENT: 0,
    SessionType.MANUAL_CUSTOMER_SERVICE: 1,
    SessionType.MANUAL_COMPLAINT: 2,
    SessionType.AUTO_BARGAIN: 3,
    SessionType.AUTO_FOLLOW_UP: 4,
}

DEFAULT_ROBOT_TYPE_BY_TASK: dict[TaskType, SessionType] = {
    TaskType.NEGOTIATION: SessionType.AUTO_BARGAIN,
    TaskType.CONSULTATION: SessionType.AUTO_BARGAIN,
    TaskType.ORDER_INQUIRY: SessionType.AUTO_FOLLOW_UP,
    TaskType.FOLLOW_UP: SessionType.AUTO_FOLLOW_UP,
    TaskType.COMPLAINT: SessionType.AUTO_FOLLOW_UP,
}

DEFAULT_HUMAN_TYPE_BY_TASK: dict[TaskType, SessionType] = {
    TaskType.COMPLAINT: SessionType.MANUAL_COMPLAINT,
}

DEFAULT_TASK_BY_TYPE: dict[SessionType, TaskType] = {
    SessionType.AUTO_BARGAIN: TaskType.NEGOTIATION,
    SessionType.AUTO_FOLLOW_UP: TaskType.FOLLOW_UP,
    SessionType.MANUAL_CUSTOMER_SERVICE: TaskType.CONSULTATION,
    SessionType.MANUAL_COMPLAINT: TaskType.COMPLAINT,
    SessionType.MANUAL_URGENT: TaskType.COMPLAINT,
}


def default_priority(session_type: SessionType, task_type: TaskType | None) -> Priority:
    """A caller's task type names the default when given; otherwise the session type does.

    A human session never defaults below its type's priority, so that a complaint
    handled by a person stays HIGH even when tagged `order_inquiry`.
    """
    by_type = DEFAULT_PRIORITY_BY_TYPE[session_type]
    if task_type is None:
        return by_type
    by_task = DEFAULT_PRIORITY_BY_TASK[task_type]
    return min(by_task, by_type) if session_type.is_human else by_task


@dataclass(frozen=True, order=True)
class Precedence:
    """Sort key: smaller comes first. Human before robot, then priority number,
    then type rank, then the earlier request, then the older row."""

    robot: bool
    priority: int
    type_rank: int
    requested_at: datetime
    seq: int

    def outranks(self, other: Precedence) -> bool:
        return self < other


def precedence(
    *,
    session_type: SessionType,
    priority: int,
    requested_at: datetime,
    seq: int,
    status: SessionStatus | None = None,
) -> Precedence:
    """A session's precedence. A TRANSFERRED session holds the slot with human precedence."""
    if status is SessionStatus.TRANSFERRED and session_type.is_robot:
        return Precedence(
            robot=False,
            priority=min(priority, Priority.HIGH),
            type_rank=TYPE_RANK[SessionType.MANUAL_CUSTOMER_SERVICE],
            requested_at=requested_at,
            seq=seq,
        )
    return Precedence(
        robot=session_type.is_robot,
        priority=priority,
        type_rank=TYPE_RANK[session_type],
        requested_at=requested_at,
        seq=seq,
    )


class ConflictDecision(StrEnum):
    PREEMPT = "preempt"
    WAIT = "wait"


def decide_conflict(
    *,
    requester_type: SessionType,
    requester: Precedence,
    occupant: Precedence,
) -> ConflictDecision:
    """SPEC §3.5: preempt when strictly higher and (occupant is a robot or requester is urgent)."""
    if requester.outranks(occupant) and (
        occupant.robot or requester_type is SessionType.MANUAL_URGENT
    ):
        return ConflictDecision.PREEMPT
    return ConflictDecision.WAIT
