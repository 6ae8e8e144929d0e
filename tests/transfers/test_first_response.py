"""SPEC §12 first response: an accepted transfer with no human message within
FIRST_RESPONSE_TIMEOUT gets `transfer.first_response_overdue` once and is flagged in the
queue; the statistics report first-response time (median, p90) over 24 hours."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from freezegun import freeze_time
from prometheus_client import REGISTRY
from sqlalchemy import select

from admin import stats as admin_stats
from admin import transfers as admin_transfers
from app.clients.service import ClientService
from app.db import utcnow
from app.events.models import Event
from app.factory import create_app
from app.messages.service import LiveMessage
from app.sessions.enums import SenderRole
from app.sweeps.service import sweep_first_responses
from app.transfers.queries import TransferFilters, list_transfers
from app.transfers.schemas import TransferRequest
from tasks.sweeps import sweep_transfers_task
from tests.sessions.helpers import ask

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
OVERDUE = "transfer.first_response_overdue"


def accepted_transfer(service, shop: str = "shop-1", agent: str = "a1") -> tuple[str, str]:  # type: ignore[no-untyped-def]
    robot = ask(service, "AUTO_BARGAIN", shop=shop).session
    transfer = service.transfer(robot.session_id, TransferRequest(reason="help"), actor="bot")
    service.accept_transfer(transfer.transfer_id, agent_id=agent, actor="desk")
    return robot.session_id, transfer.transfer_id


def post(service, session_id: str, role: SenderRole = SenderRole.HUMAN,  # type: ignore[no-untyped-def]
         agent: str | None = "a1") -> None:
    service.record_messages(session_id, [LiveMessage(
        message_id=f"m-{session_id}-{utcnow().timestamp()}-{role}", sender_role=role,
        content="hi", sent_at=utcnow())], actor="client:desk", agent_id=agent,
        as_operator=False)


def overdue_events(runtime) -> list[Event]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        return list(db.execute(select(Event).where(Event.type == OVERDUE)
                               .order_by(Event.id)).scalars())


def test_unanswered_accept_is_flagged_once_after_the_timeout(runtime, service):
    assert runtime.settings.first_response_timeout == 120
    with freeze_time(T0) as clock:
        session_id, transfer_id = accepted_transfer(service)
        post(service, session_id, SenderRole.COUNTERPART)  # the customer is no answer
        clock.move_to(T0 + timedelta(seconds=119))
        assert sweep_first_responses(runtime).first_response_overdue == []
        assert service.get_transfer(transfer_id).first_response_overdue is False
        counted = {"sweep": "first_response", "outcome": "first_response_overdue"}
        before = REGISTRY.get_sample_value("autosession_sweep_rows_total", counted) or 0.0
        clock.move_to(T0 + timedelta(seconds=121))
        assert sweep_first_responses(runtime).first_response_overdue == [transfer_id]
        clock.move_to(T0 + timedelta(seconds=400))
        assert sweep_first_responses(runtime).first_response_overdue == []
        assert REGISTRY.get_sample_value("autosession_sweep_rows_total", counted) == before + 1
    events = overdue_events(runtime)
    assert len(events) == 1
    assert (events[0].session_id, events[0].audience) == (session_id, "desk")
    assert events[0].data["transfer_id"] == transfer_id and events[0].data["agent_id"] == "a1"
    assert events[0].occurred_at == T0 + timedelta(seconds=121)
    view = service.get_transfer(transfer_id)
    assert view.first_response_overdue is True and view.first_response_at is None
    assert view.first_response_overdue_at == T0 + timedelta(seconds=121)
    # flagged in the queue: the desk API's and the console's
    with runtime.database.read() as db:
        items, _ = list_transfers(db, TransferFilters(status="accepted"))
        assert [(t.transfer_id, t.first_response_overdue) for t in items] == [
            (transfer_id, True)]
        handled = admin_transfers.transfer_queue(db, status="ACCEPTED")  # type: ignore[arg-type]
    assert handled[0]["first_response_overdue"] is True
    assert handled[0]["first_response_wait_seconds"] > 120


def test_a_human_message_in_time_stops_the_timer(runtime, service):
    with freeze_time(T0) as clock:
        session_id, transfer_id = accepted_transfer(service)
        clock.move_to(T0 + timedelta(seconds=30))
        post(service, session_id, SenderRole.HUMAN)
        clock.move_to(T0 + timedelta(seconds=45))
        post(service, session_id, SenderRole.HUMAN)  # only the first one counts
        clock.move_to(T0 + timedelta(seconds=600))
        assert sweep_first_responses(runtime).first_response_overdue == []
    view = service.get_transfer(transfer_id)
    assert view.first_response_at == T0 + timedelta(seconds=30)
    assert view.first_response_overdue is False
    assert overdue_events(runtime) == []


def test_a_late_answer_keeps_the_flag_and_is_measured(runtime, service):
    with freeze_time(T0) as clock:
        session_id, transfer_id = accepted_transfer(service)
        clock.move_to(T0 + timedelta(seconds=200))
        assert sweep_first_responses(runtime).first_response_overdue == [transfer_id]
        clock.move_to(T0 + timedelta(seconds=250))
        post(service, session_id)
    view = service.get_transfer(transfer_id)
    assert view.first_response_overdue is True
    assert view.first_response_at == T0 + timedelta(seconds=250)


def test_ended_and_pending_transfers_are_never_flagged(runtime, service):
    with freeze_time(T0) as clock:
        done, _ = accepted_transfer(service, shop="s-done")
        service.complete(done, actor="desk")
        robot = ask(service, "AUTO_BARGAIN", shop="s-pending").session
        service.transfer(robot.session_id, TransferRequest(reason="help"), actor="bot")
        clock.move_to(T0 + timedelta(seconds=1000))
        assert sweep_first_responses(runtime).first_response_overdue == []
    assert overdue_events(runtime) == []


def test_the_beat_task_flags_them_too(runtime, service):
    with freeze_time(T0) as clock:
        _, transfer_id = accepted_transfer(service)
        clock.move_to(T0 + timedelta(seconds=121))
        summary = sweep_transfers_task()
    assert summary["first_response_overdue"] == 1
    assert service.get_transfer(transfer_id).first_response_overdue is True


def test_statistics_report_first_response_median_and_p90_over_24_hours(runtime, service):
    answers = [10, 20, 30, 40, 50, 60, 70, 80, 90, 300]  # seconds after each accept
    with freeze_time(T0 - timedelta(hours=30)) as clock:
        old_session, _ = accepted_transfer(service, shop="s-old")
        clock.tick(5)
        post(service, old_session)  # answered more than 24 h before: not counted
        clock.move_to(T0)
        for i, delay in enumerate(answers):
            session_id, _ = accepted_transfer(service, shop=f"s-{i}")
            clock.tick(delay)
            post(service, session_id)
        accepted_transfer(service, shop="s-silent")  # still waiting for its answer
        clock.tick(200)
        sweep_first_responses(runtime)
        with runtime.database.read() as db:
            figures = admin_stats.statistics(db)["first_response"]
    assert figures["answered_24h"] == 10
    assert figures["median_s"] == 50  # nearest rank: the 5th of 10
    assert figures["p90_s"] == 90  # the 9th of 10
    # the silent one; the 300 s answer came before any sweep looked (with the beat every
    # TRANSFER_SWEEP_INTERVAL it would have been flagged at about 120 s)
    assert figures["overdue_24h"] == 1
    assert figures["waiting"] == 1


def test_admin_api_and_dashboard_show_first_response(runtime, service):
    token = ClientService(runtime.database).create(name="ops", role="admin").token
    http = create_app(runtime, TESTING=True).test_client()
    headers = {"Authorization": f"Bearer {token}"}
    with freeze_time(T0) as clock:
        session_id, transfer_id = accepted_transfer(service)
        clock.tick(42)
        post(service, session_id)
        _, silent = accepted_transfer(service, shop="s-2")
        clock.tick(200)
        sweep_first_responses(runtime)
        stats = http.get("/admin/api/stats", headers=headers).get_json()
        queue = http.get("/admin/api/transfers", headers=headers).get_json()
    assert stats["first_response"]["median_s"] == 42
    assert stats["first_response"]["p90_s"] == 42
    flags = {t["transfer_id"]: t["first_response_overdue"] for t in queue["accepted"]}
    assert flags == {transfer_id: False, silent: True}
    assert queue["items"] == []  # the waiting queue itself is unchanged: PENDING only
