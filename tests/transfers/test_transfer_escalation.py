"""SPEC §3.6: a transfer not accepted in TRANSFER_TIMEOUT expires, escalates, is offered again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from freezegun import freeze_time
from sqlalchemy import select

from app.events.models import Event
from app.sweeps.service import sweep_transfers
from app.transfers.models import Transfer
from app.transfers.schemas import TransferRequest
from tests.sessions.helpers import ask, audit_rows, status_of

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def transfers_of(runtime, session_id):
    with runtime.database.read() as db:
        return list(db.execute(
            select(Transfer).where(Transfer.session_id == session_id).order_by(Transfer.id)
        ).scalars())


def test_unaccepted_transfer_expires_escalates_and_is_offered_again(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        first = service.transfer(robot.session_id, TransferRequest(
            reason="wants a person", urgency=3, trigger="keyword", suggestion="call back",
            task_state={"step": "offer"}, customer_info={"nick": "li"}), actor="bot")
        clock.move_to(T0 + timedelta(seconds=299))
        assert sweep_transfers(runtime).expired_transfers == []
        clock.move_to(T0 + timedelta(seconds=301))
        report = sweep_transfers(runtime)
    assert report.expired_transfers == [first.transfer_id]
    old, new = transfers_of(runtime, robot.session_id)
    assert old.status == "EXPIRED" and old.ended_at == T0 + timedelta(seconds=301)
    assert new.status == "PENDING" and new.previous_transfer_id == old.transfer_id
    assert new.urgency == 2 and new.escalations == 1
    assert (new.reason, new.trigger, new.suggestion) == ("wants a person", "keyword", "call back")
    assert new.task_state == {"step": "offer"} and new.customer_info == {"nick": "li"}
    assert new.history == old.history
    assert new.expires_at == T0 + timedelta(seconds=601)
    assert status_of(service, robot.session_id) == "TRANSFERRED"
    with runtime.database.read() as db:
        tail = db.execute(
            select(Event.type, Event.data, Event.audience).where(
                Event.session_id == robot.session_id).order_by(Event.id)
        ).all()[-2:]
    assert [t.type for t in tail] == ["transfer.expired", "transfer.offered"]
    assert tail[1].data["previous_transfer_id"] == old.transfer_id
    assert tail[1].data["urgency"] == 2 and tail[1].audience == "desk"
    assert audit_rows(runtime, robot.session_id)[-1].operation == "transfer-escalate"


def test_escalation_stops_at_the_most_urgent_level_and_keeps_offering(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        service.transfer(robot.session_id, TransferRequest(reason="r", urgency=2), actor="bot")
        for round_ in range(1, 4):
            clock.move_to(T0 + timedelta(seconds=301 * round_))
            assert len(sweep_transfers(runtime).reoffered) == 1
    urgencies = [(t.status, t.urgency) for t in transfers_of(runtime, robot.session_id)]
    assert urgencies == [("EXPIRED", 2), ("EXPIRED", 1), ("EXPIRED", 1), ("PENDING", 1)]


def test_accepted_transfer_does_not_expire(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        t = service.transfer(robot.session_id, TransferRequest(reason="r"), actor="bot")
        clock.move_to(T0 + timedelta(seconds=100))
        service.accept_transfer(t.transfer_id, agent_id="agent-1", actor="desk")
        clock.move_to(T0 + timedelta(seconds=400))
        assert sweep_transfers(runtime).expired_transfers == []
    assert service.get_transfer(t.transfer_id).status == "ACCEPTED"


def test_reoffered_transfer_can_be_accepted(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        service.transfer(robot.session_id, TransferRequest(reason="r"), actor="bot")
        clock.move_to(T0 + timedelta(seconds=301))
        new_id = sweep_transfers(runtime).reoffered[0]
        accepted = service.accept_transfer(new_id, agent_id="agent-9", actor="desk")
    assert accepted.status == "ACCEPTED" and accepted.agent_id == "agent-9"
