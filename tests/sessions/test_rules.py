"""The pure rules of SPEC §3: transitions, default priorities, precedence, conflicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from app.errors import InvalidTransition
from app.sessions import rules
from app.sessions.enums import Priority, SessionStatus, SessionType, TaskType

S = SessionStatus
T0 = datetime(2026, 1, 1, tzinfo=UTC)

ALLOWED = {
    (S.PENDING, S.ACTIVE),
    (S.ACTIVE, S.COMPLETED),
    (S.ACTIVE, S.TRANSFERRED),
    (S.ACTIVE, S.PAUSED),
    (S.PAUSED, S.ACTIVE),
    (S.TRANSFERRED, S.COMPLETED),
}
for status in (S.PENDING, S.ACTIVE, S.PAUSED, S.TRANSFERRED):
    ALLOWED |= {(status, S.CANCELLED), (status, S.TIMEOUT)}


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_every_transition_is_allowed_or_refused_exactly_as_the_seed_says(current, target):
    if (current, target) in ALLOWED:
        rules.check_transition(current, target)
    else:
        with pytest.raises(InvalidTransition) as caught:
            rules.check_transition(current, target)
        assert str(current) in caught.value.detail
        assert caught.value.extra["allowed"] == sorted(
            str(s) for s in rules.ALLOWED_TRANSITIONS[current]
        )


def test_terminal_statuses_allow_nothing():
    for status in (S.COMPLETED, S.CANCELLED, S.TIMEOUT):
        assert status.is_terminal
        assert rules.ALLOWED_TRANSITIONS[status] == frozenset()


@pytest.mark.parametrize(
    ("session_type", "task_type", "expected"),
    [
        (SessionType.MANUAL_URGENT, None, Priority.EMERGENCY),
        (SessionType.MANUAL_CUSTOMER_SERVICE, None, Priority.HIGH),
        (SessionType.MANUAL_COMPLAINT, None, Priority.HIGH),
        (SessionType.AUTO_BARGAIN, None, Priority.MEDIUM),
        (SessionType.AUTO_FOLLOW_UP, None, Priority.LOW),
        (SessionType.AUTO_FOLLOW_UP, TaskType.COMPLAINT, Priority.HIGH),
        (SessionType.AUTO_BARGAIN, TaskType.ORDER_INQUIRY, Priority.LOW),
        (SessionType.AUTO_BARGAIN, TaskType.NEGOTIATION, Priority.MEDIUM),
        (SessionType.AUTO_FOLLOW_UP, TaskType.CONSULTATION, Priority.MEDIUM),
        (SessionType.MANUAL_CUSTOMER_SERVICE, TaskType.FOLLOW_UP, Priority.HIGH),
    ],
)
def test_default_priority_comes_from_task_type_else_session_type(session_type, task_type, expected):
    assert rules.default_priority(session_type, task_type) == expected


def prec(kind: SessionType, priority: int, at: int = 0, seq: int = 1, status=None):
    return rules.precedence(
        session_type=kind,
        priority=priority,
        requested_at=T0 + timedelta(seconds=at),
        seq=seq,
        status=status,
    )


def test_a_robot_never_outranks_a_human_whatever_priority_it_claims():
    robot = prec(SessionType.AUTO_BARGAIN, 1)
    human = prec(SessionType.MANUAL_CUSTOMER_SERVICE, 4)
    assert human.outranks(robot)
    assert not robot.outranks(human)


def test_precedence_order_priority_then_type_rank_then_earlier_request():
    complaint = prec(SessionType.MANUAL_COMPLAINT, 2, at=0)
    service = prec(SessionType.MANUAL_CUSTOMER_SERVICE, 2, at=5)
    assert service.outranks(complaint)  # same priority: CUSTOMER_SERVICE ranks first
    early = prec(SessionType.AUTO_BARGAIN, 3, at=0, seq=2)
    late = prec(SessionType.AUTO_BARGAIN, 3, at=1, seq=1)
    assert early.outranks(late)
    assert prec(SessionType.AUTO_FOLLOW_UP, 2).outranks(prec(SessionType.AUTO_BARGAIN, 3))


def test_transferred_robot_session_holds_the_slot_with_human_precedence():
    transferred = prec(SessionType.AUTO_FOLLOW_UP, 4, status=S.TRANSFERRED)
    assert not transferred.robot
    service = prec(SessionType.MANUAL_CUSTOMER_SERVICE, 2, at=10)
    decision = rules.decide_conflict(
        requester_type=SessionType.MANUAL_CUSTOMER_SERVICE, requester=service, occupant=transferred
    )
    assert decision is rules.ConflictDecision.WAIT
    urgent = prec(SessionType.MANUAL_URGENT, 1, at=10)
    assert (
        rules.decide_conflict(
            requester_type=SessionType.MANUAL_URGENT, requester=urgent, occupant=transferred
        )
        is rules.ConflictDecision.PREEMPT
    )


def test_only_urgent_preempts_a_human_occupant():
    occupant = prec(SessionType.MANUAL_COMPLAINT, 2)
    higher_human = prec(SessionType.MANUAL_CUSTOMER_SERVICE, 1, at=1)
    assert (
        rules.decide_conflict(
            requester_type=SessionType.MANUAL_CUSTOMER_SERVICE,
            requester=higher_human,
            occupant=occupant,
        )
        is rules.ConflictDecision.WAIT
    )
    urgent = prec(SessionType.MANUAL_URGENT, 1, at=1)
    assert (
        rules.decide_conflict(
            requester_type=SessionType.MANUAL_URGENT, requester=urgent, occupant=occupant
        )
        is rules.ConflictDecision.PREEMPT
    )
