"""SPEC §3.5: every conflict case with the resulting statuses, audit rows and events."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from app.errors import InvalidTransition, NotFound, SlotOccupied
from app.sessions.models import Session, Slot
from app.transfers.schemas import TransferRequest
from tests.sessions.helpers import ask, audit_rows, events_for, status_of


def test_first_request_on_a_free_slot_is_active(runtime, service):
    out = ask(service, "AUTO_BARGAIN", task_type="negotiation")
    assert out.session.status == "ACTIVE"
    assert out.session.priority == 3
    assert out.session.activated_at is not None
    assert [r.operation for r in audit_rows(runtime, out.session.session_id)] == [
        "create",
        "activate",
    ]
    assert events_for(runtime, out.session.session_id) == ["session.activated"]


def test_case1_human_preempts_active_robot_which_pauses_and_waits(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    out = ask(service, "MANUAL_CUSTOMER_SERVICE", owner_id="agent-7")
    human = out.session
    assert human.status == "ACTIVE"
    assert human.interrupted_session_id == robot.session_id
    assert [p.session_id for p in out.preempted] == [robot.session_id]
    paused = service.get(robot.session_id)
    assert paused.status == "PAUSED"
    assert paused.pause_cause == "preempted"
    assert paused.preempted_by == human.session_id
    ops = audit_rows(runtime, robot.session_id)
    assert (ops[-1].operation, ops[-1].from_status, ops[-1].to_status) == (
        "preempt",
        "ACTIVE",
        "PAUSED",
    )
    assert ops[-1].details["preempted_by"] == human.session_id
    assert events_for(runtime, robot.session_id)[-1] == "session.paused"


def test_case1_robot_comes_back_when_the_human_completes(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    service.complete(human.session_id, actor="desk")
    assert status_of(service, robot.session_id) == "ACTIVE"
    assert events_for(runtime, robot.session_id)[-1] == "session.resumed"


def test_case2_robot_asking_during_human_session_waits_pending(runtime, service):
    human = ask(service, "MANUAL_COMPLAINT").session
    robot = ask(service, "AUTO_FOLLOW_UP").session
    assert robot.status == "PENDING"
    assert status_of(service, human.session_id) == "ACTIVE"
    assert events_for(runtime, robot.session_id) == ["session.queued"]
    service.complete(human.session_id, actor="desk")
    assert status_of(service, robot.session_id) == "ACTIVE"
    assert events_for(runtime, robot.session_id)[-1] == "session.activated"


def test_case2_reject_creates_nothing_and_describes_the_occupant(runtime, service):
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    with pytest.raises(SlotOccupied) as caught:
        ask(service, "AUTO_BARGAIN", on_conflict="reject")
    assert caught.value.status == 409
    assert caught.value.extra["occupant"]["session_id"] == human.session_id
    with runtime.database.read() as db:
        assert db.execute(select(Session)).scalars().all().__len__() == 1


def test_case3_robot_vs_robot_higher_precedence_runs_lower_waits(runtime, service):
    follow = ask(service, "AUTO_FOLLOW_UP").session
    bargain = ask(service, "AUTO_BARGAIN").session
    assert bargain.status == "ACTIVE"
    assert status_of(service, follow.session_id) == "PAUSED"
    later_follow = ask(service, "AUTO_FOLLOW_UP", account="acc-1").session
    assert later_follow.status == "PENDING"
    service.complete(bargain.session_id, actor="bot")
    # FIFO among equals: the earlier follow-up (paused) comes back first
    assert status_of(service, follow.session_id) == "ACTIVE"
    assert status_of(service, later_follow.session_id) == "PENDING"


def test_case3_equal_robot_does_not_preempt(runtime, service):
    first = ask(service, "AUTO_BARGAIN").session
    second = ask(service, "AUTO_BARGAIN").session
    assert (status_of(service, first.session_id), second.status) == ("ACTIVE", "PENDING")


def test_case4_urgent_takeover_pauses_an_active_human(runtime, service):
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    urgent = ask(service, "MANUAL_URGENT", reason="customer threatens 12315").session
    assert urgent.status == "ACTIVE"
    assert urgent.interrupted_session_id == human.session_id
    assert status_of(service, human.session_id) == "PAUSED"
    ops = audit_rows(runtime, human.session_id)
    assert ops[-1].reason == "preempted"


def test_case4_urgent_takeover_cancels_transferred_session(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    transfer = service.transfer(
        robot.session_id, TransferRequest(reason="wants a person"), actor="bot"
    )
    urgent = ask(service, "MANUAL_URGENT").session
    assert urgent.status == "ACTIVE"
    cancelled = service.get(robot.session_id)
    assert cancelled.status == "CANCELLED"
    assert cancelled.end_reason == "interrupted"
    assert service.get_transfer(transfer.transfer_id).status == "CANCELLED"
    assert "transfer.cancelled" in events_for(runtime, robot.session_id)
    assert audit_rows(runtime, robot.session_id)[-1].operation == "interrupt"


def test_non_urgent_human_waits_behind_a_transferred_session(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    service.transfer(robot.session_id, TransferRequest(reason="refund"), actor="bot")
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    assert human.status == "PENDING"
    assert status_of(service, robot.session_id) == "TRANSFERRED"


def test_owner_pause_frees_the_slot_and_does_not_come_back_by_itself(runtime, service):
    first = ask(service, "AUTO_BARGAIN").session
    waiting = ask(service, "AUTO_FOLLOW_UP").session
    paused = service.pause(first.session_id, actor="bot")
    assert paused.status == "PAUSED" and paused.pause_cause == "owner"
    assert status_of(service, waiting.session_id) == "ACTIVE"
    service.complete(waiting.session_id, actor="bot")
    assert status_of(service, first.session_id) == "PAUSED"  # owner has not resumed
    assert service.resume(first.session_id, actor="bot").status == "ACTIVE"


def test_resume_is_a_new_request_preempting_a_lower_robot(runtime, service):
    bargain = ask(service, "AUTO_BARGAIN").session
    service.pause(bargain.session_id, actor="bot")
    follow = ask(service, "AUTO_FOLLOW_UP").session
    assert follow.status == "ACTIVE"
    resumed = service.resume(bargain.session_id, actor="bot")
    assert resumed.status == "ACTIVE"
    assert status_of(service, follow.session_id) == "PAUSED"


def test_resume_behind_a_human_waits_in_line_then_is_promoted(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    service.pause(robot.session_id, actor="bot")
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    waiting = service.resume(robot.session_id, actor="bot")
    assert waiting.status == "PAUSED" and waiting.pause_cause == "preempted"
    assert events_for(runtime, robot.session_id)[-1] == "session.queued"
    service.complete(human.session_id, actor="desk")
    assert status_of(service, robot.session_id) == "ACTIVE"


def test_promotion_picks_highest_precedence_then_fifo(runtime, service):
    urgent = ask(service, "MANUAL_URGENT").session
    follow = ask(service, "AUTO_FOLLOW_UP").session
    complaint = ask(service, "MANUAL_COMPLAINT").session
    service_human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    bargain = ask(service, "AUTO_BARGAIN").session
    assert {follow.status, complaint.status, service_human.status, bargain.status} == {"PENDING"}
    order = []
    current = urgent.session_id
    for _ in range(4):
        service.complete(current, actor="t")
        with runtime.database.read() as db:
            current = db.execute(
                select(Session.session_id).where(Session.holds_slot.is_(True))
            ).scalar_one()
        order.append(current)
    assert order == [
        service_human.session_id,
        complaint.session_id,
        bargain.session_id,
        follow.session_id,
    ]


def test_cancel_and_complete_refuse_invalid_transitions_with_clear_errors(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    service.complete(robot.session_id, actor="bot")
    with pytest.raises(InvalidTransition) as caught:
        service.cancel(robot.session_id, actor="bot")
    assert "COMPLETED" in caught.value.detail and "terminal" in caught.value.detail
    pending_owner = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    pending = ask(service, "AUTO_BARGAIN").session
    with pytest.raises(InvalidTransition):
        service.pause(pending.session_id, actor="bot")
    with pytest.raises(InvalidTransition):
        service.resume(pending.session_id, actor="bot")
    assert service.cancel(pending.session_id, actor="bot").status == "CANCELLED"
    assert status_of(service, pending_owner.session_id) == "ACTIVE"


def test_unknown_session_is_not_found(service, runtime):
    with pytest.raises(NotFound):
        service.complete("ses_missing", actor="x")


def test_slot_guard_tracks_the_occupant_and_fence_advances(runtime, service):
    robot = ask(service, "AUTO_BARGAIN").session
    human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
    with runtime.database.read() as db:
        slot = db.execute(select(Slot)).scalar_one()
    assert slot.occupant_session_id == human.session_id
    assert slot.fence == 2
    service.complete(human.session_id, actor="desk")
    with runtime.database.read() as db:
        slot = db.execute(select(Slot)).scalar_one()
    assert slot.occupant_session_id == robot.session_id
    assert slot.fence == 3


def test_slots_are_independent(runtime, service):
    a = ask(service, "AUTO_BARGAIN", shop="s-a").session
    b = ask(service, "AUTO_BARGAIN", shop="s-b").session
    c = ask(service, "AUTO_BARGAIN", account="acc-2", shop="s-a").session
    assert {a.status, b.status, c.status} == {"ACTIVE"}


def test_integer_shop_id_is_stored_as_text(runtime, service):
    out = ask(service, "AUTO_BARGAIN", shop=12345)
    assert out.session.shop_id == "12345"
