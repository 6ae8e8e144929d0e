"""SPEC §3.7: every timeout, run by calling the sweep in-process under freezegun."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import func, select

from app.audit.models import Operation
from app.audit.trail import verify_chain
from app.sessions.enums import SessionStatus
from app.sessions.models import Session, Slot
from app.sweeps.bulk import expire_batch
from app.sweeps.service import sweep_sessions
from tests.sessions.helpers import ask, audit_rows, events_for, status_of

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def test_idle_robot_session_times_out_and_frees_its_slot(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        clock.move_to(T0 + minutes(29))
        assert sweep_sessions(runtime).timed_out == []
        clock.move_to(T0 + minutes(30, ) + timedelta(seconds=1))
        report = sweep_sessions(runtime)
    assert report.timed_out == [robot.session_id]
    view = service.get(robot.session_id)
    assert view.status == "TIMEOUT" and view.end_reason == "timeout"
    assert view.ended_at == T0 + minutes(30) + timedelta(seconds=1)
    last = audit_rows(runtime, robot.session_id)[-1]
    assert (last.operation, last.from_status, last.to_status, last.actor) == (
        "timeout", "ACTIVE", "TIMEOUT", "system:sweep")
    assert events_for(runtime, robot.session_id)[-1] == "session.timeout"
    with runtime.database.read() as db:
        slot = db.get(Slot, ("acc-1", "shop-1"))
        assert slot.occupant_session_id is None
        assert verify_chain(db, db.execute(select(Session.id)).scalar_one())[0]
    # The slot is free: the next request is ACTIVE at once.
    assert ask(service, "AUTO_FOLLOW_UP").session.status == "ACTIVE"


def test_heartbeat_keeps_a_robot_session_alive(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        clock.move_to(T0 + minutes(25))
        service.heartbeat(robot.session_id, actor="bot")
        clock.move_to(T0 + minutes(40))
        assert sweep_sessions(runtime).timed_out == []
        assert status_of(service, robot.session_id) == "ACTIVE"
        clock.move_to(T0 + minutes(56))
        assert sweep_sessions(runtime).timed_out == [robot.session_id]


def test_pending_session_never_activated_times_out(runtime, service):
    with freeze_time(T0) as clock:
        human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
        clock.move_to(T0 + minutes(5))
        robot = ask(service, "AUTO_FOLLOW_UP").session
        assert robot.status == "PENDING"
        clock.move_to(T0 + minutes(35) + timedelta(seconds=1))
        report = sweep_sessions(runtime)
    assert report.timed_out == [robot.session_id]
    assert status_of(service, robot.session_id) == "TIMEOUT"
    assert audit_rows(runtime, robot.session_id)[-1].from_status == "PENDING"
    assert status_of(service, human.session_id) == "ACTIVE"  # the human's 8 h are not up


def test_human_session_times_out_after_eight_hours(runtime, service):
    with freeze_time(T0) as clock:
        human = ask(service, "MANUAL_COMPLAINT").session
        clock.move_to(T0 + timedelta(hours=7, minutes=59))
        assert sweep_sessions(runtime).timed_out == []
        clock.move_to(T0 + timedelta(hours=8, seconds=1))
        assert sweep_sessions(runtime).timed_out == [human.session_id]
    assert status_of(service, human.session_id) == "TIMEOUT"


def test_timeout_promotes_the_next_waiting_session(runtime, service):
    with freeze_time(T0) as clock:
        bargain = ask(service, "AUTO_BARGAIN").session
        clock.move_to(T0 + minutes(20))
        follow = ask(service, "AUTO_FOLLOW_UP").session
        assert follow.status == "PENDING"
        clock.move_to(T0 + minutes(31))
        report = sweep_sessions(runtime)
        assert report.timed_out == [bargain.session_id]
        promoted = service.get(follow.session_id)
        assert promoted.status == "ACTIVE"
        assert events_for(runtime, follow.session_id)[-1] == "session.activated"
        # Idle time counts from activation, not from the request 11 minutes earlier.
        assert promoted.deadline_at == T0 + minutes(31) + minutes(30)
        clock.move_to(T0 + minutes(55))
        assert sweep_sessions(runtime).timed_out == []


def test_preempted_robot_is_resumed_when_the_human_times_out(runtime, service, tmp_path,
                                                           backend):
    from app.runtime import build_runtime, set_runtime

    settings = backend.settings(tmp_path, default_session_timeout=10 * 3600)
    rt = build_runtime(settings)
    rt._schema_checked = True
    set_runtime(rt)
    try:
        with freeze_time(T0) as clock:
            robot = ask(rt.sessions, "AUTO_BARGAIN").session
            human = ask(rt.sessions, "MANUAL_CUSTOMER_SERVICE").session
            assert status_of(rt.sessions, robot.session_id) == "PAUSED"
            clock.move_to(T0 + timedelta(hours=8, seconds=1))
            report = sweep_sessions(rt)
        assert report.timed_out == [human.session_id]
        assert status_of(rt.sessions, robot.session_id) == "ACTIVE"
        assert events_for(rt, robot.session_id)[-1] == "session.resumed"
    finally:
        set_runtime(runtime)
        rt.close()


def test_many_due_sessions_are_expired_in_batches_with_chained_audit(runtime, service):
    with freeze_time(T0) as clock:
        robots = [ask(service, "AUTO_BARGAIN", shop=f"shop-{i}").session for i in range(23)]
        waiting = ask(service, "AUTO_FOLLOW_UP", shop="shop-3").session  # one slot has a waiter
        clock.move_to(T0 + minutes(31))
        report = sweep_sessions(runtime, batch_size=5)
    assert sorted(report.timed_out) == sorted(r.session_id for r in robots)
    assert status_of(service, waiting.session_id) == "ACTIVE"
    with runtime.database.read() as db:
        for pk in db.execute(select(Session.id)).scalars():
            assert verify_chain(db, pk)[0]
        assert db.execute(
            select(func.count()).select_from(Slot).where(Slot.occupant_session_id.is_not(None))
        ).scalar_one() == 1
        fences = dict(db.execute(select(Slot.shop_id, Slot.fence)).all())
    assert fences["shop-0"] == 2  # created, then timed out
    for robot in robots:
        assert events_for(runtime, robot.session_id)[-1] == "session.timeout"


def test_occupant_and_its_waiter_due_in_one_batch_both_time_out_in_bulk(runtime, service):
    with freeze_time(T0) as clock:
        bargain = ask(service, "AUTO_BARGAIN").session
        clock.move_to(T0 + minutes(5))
        follow = ask(service, "AUTO_FOLLOW_UP").session
        assert follow.status == "PENDING"
    with runtime.database.read() as db:
        fence_before = db.execute(select(Slot.fence)).scalar_one()
    now = T0 + minutes(36)  # past both deadlines: nobody is left to promote
    outcome = expire_batch(service, [bargain.session_id, follow.session_id], now)
    assert sorted(outcome.expired) == sorted([bargain.session_id, follow.session_id])
    assert outcome.one_by_one == []
    assert status_of(service, follow.session_id) == "TIMEOUT"
    with runtime.database.read() as db:
        slot = db.execute(select(Slot)).scalar_one()
        assert (slot.fence, slot.occupant_session_id) == (fence_before + 1, None)
        for pk in db.execute(select(Session.id)).scalars():
            assert verify_chain(db, pk)[0]


def test_two_sweeps_at_once_time_each_session_out_exactly_once(runtime, service):
    with freeze_time(T0):
        robots = [ask(service, "AUTO_BARGAIN", shop=f"shop-{i}").session for i in range(12)]
    ids = [r.session_id for r in robots]
    now = T0 + minutes(31)
    barrier = threading.Barrier(2)
    results = []

    def sweep() -> None:
        barrier.wait()
        results.append(expire_batch(service, ids, now))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Whatever one batch could not lock, the sweep's next run finishes.
    sweep_sessions(runtime, now=now)
    with runtime.database.read() as db:
        counts = dict(db.execute(
            select(Operation.session_id, func.count())
            .where(Operation.operation == "timeout").group_by(Operation.session_id)
        ).all())
    assert counts == dict.fromkeys(ids, 1)


def test_session_refreshed_after_the_sweep_looked_is_not_expired(runtime, service):
    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        clock.move_to(T0 + minutes(31))
        service.heartbeat(robot.session_id, actor="bot")  # lands between find and expire
        outcome = expire_batch(service, [robot.session_id], T0 + minutes(31))
    assert outcome.expired == [] and outcome.not_due == 1
    assert status_of(service, robot.session_id) == "ACTIVE"


@pytest.mark.parametrize("status_case", ["transferred_with_open_transfer"])
def test_transferred_session_times_out_and_its_transfer_is_cancelled(runtime, service,
                                                                     status_case):
    from app.transfers.schemas import TransferRequest

    with freeze_time(T0) as clock:
        robot = ask(service, "AUTO_BARGAIN").session
        transfer = service.transfer(robot.session_id, TransferRequest(reason="customer asks"),
                                    actor="bot")
        service.accept_transfer(transfer.transfer_id, agent_id="agent-1", actor="desk")
        clock.move_to(T0 + timedelta(hours=8, minutes=1))
        report = sweep_sessions(runtime)
    assert robot.session_id in report.timed_out
    assert service.get_transfer(transfer.transfer_id).status == "CANCELLED"
    assert "transfer.cancelled" in events_for(runtime, robot.session_id)


def test_waiters_of_one_slot_in_different_batches_all_time_out_in_one_run(runtime, service):
    with freeze_time(T0) as clock:
        human = ask(service, "MANUAL_CUSTOMER_SERVICE").session
        waiters = [ask(service, "AUTO_FOLLOW_UP").session for _ in range(4)]
        assert {w.status for w in waiters} == {"PENDING"}
        clock.move_to(T0 + minutes(31))  # PENDING_TIMEOUT is up; the human's 8 h are not
        report = sweep_sessions(runtime, batch_size=1)
    # One batch per waiter, two batches in flight on MariaDB: the second batch finds the
    # slot locked by the first, and is tried again once they are done.
    assert sorted(report.timed_out) == sorted(w.session_id for w in waiters)
    assert report.busy == 0
    assert status_of(service, human.session_id) == "ACTIVE"
    with runtime.database.read() as db:
        for pk in db.execute(select(Session.id)).scalars():
            assert verify_chain(db, pk)[0]


def test_bulk_timeout_event_carries_what_the_per_session_path_writes(runtime, service):
    from app.events.models import Event

    with freeze_time(T0):
        bulk = ask(service, "AUTO_BARGAIN", shop="shop-bulk", owner_id="bot-7").session
        single = ask(service, "AUTO_BARGAIN", shop="shop-single", owner_id="bot-7").session
    now = T0 + minutes(31)
    assert expire_batch(service, [bulk.session_id], now).expired == [bulk.session_id]
    assert service.expire(single.session_id, now=now) is not None

    def timeout_event(session_id: str) -> Event:
        with runtime.database.read() as db:
            return db.execute(select(Event).where(
                Event.session_id == session_id, Event.type == "session.timeout")).scalar_one()

    by_bulk, by_single = timeout_event(bulk.session_id), timeout_event(single.session_id)
    assert by_bulk.data == {**by_single.data, "session_id": bulk.session_id,
                            "shop_id": "shop-bulk"}
    assert (by_bulk.audience, by_bulk.client_id, by_bulk.account_id) == (
        by_single.audience, by_single.client_id, by_single.account_id)
    assert by_bulk.occurred_at == now


def test_ids_with_quotes_backslashes_and_percent_signs_time_out_in_bulk(runtime, service):
    odd = ["acc'1", "acc\\2", "acc%3", "账号 4"]
    with freeze_time(T0):
        robots = [ask(service, "AUTO_BARGAIN", account=a, shop=f"{a}-shop").session for a in odd]
    outcome = expire_batch(service, [r.session_id for r in robots], T0 + minutes(31))
    assert sorted(outcome.expired) == sorted(r.session_id for r in robots)
    with runtime.database.read() as db:
        slots = {(s.account_id, s.shop_id): (s.fence, s.occupant_session_id)
                 for s in db.execute(select(Slot)).scalars()}
        for pk in db.execute(select(Session.id)).scalars():
            assert verify_chain(db, pk)[0]
    assert slots == {(a, f"{a}-shop"): (2, None) for a in odd}
    for robot in robots:
        assert status_of(service, robot.session_id) == "TIMEOUT"


def test_audit_text_that_needs_escaping_is_stored_exactly(runtime, service):
    """The bulk insert inlines plain text and binds the rest; both store the same."""
    from app.sweeps.bulk import _audit_rows, _heads, _insert_audit

    with freeze_time(T0):
        robot = ask(service, "AUTO_BARGAIN").session
    at = T0 + minutes(31)
    before = len(audit_rows(runtime, robot.session_id))
    with runtime.database.unit_of_work() as uow:
        conn = uow.session.connection()
        pk = conn.execute(select(Session.id)).scalar_one()
        odd_id = "ses_it's\\100%"
        conn.execute(Session.__table__.update().values(session_id=odd_id))
        last = conn.execute(select(Operation.row_hash).where(Operation.session_pk == pk)
                            .order_by(Operation.id.desc()).limit(1)).scalar_one()
        audit = _audit_rows([_held(pk, odd_id, robot.deadline_at, last)], at)
        conn.execute(Session.__table__.update().values(audit_head=_heads(conn, audit, [pk])))
        _insert_audit(conn, audit)
        row = conn.execute(select(Operation).where(Operation.session_pk == pk)
                           .order_by(Operation.id.desc()).limit(1)).one()._mapping
        assert (row["session_id"], row["prev_hash"], row["created_at"]) == (odd_id, last, at)
        assert row["details"] == {"deadline_at": robot.deadline_at.isoformat(),
                                  "status_before": "ACTIVE"}
        uow.commit()
    with runtime.database.read() as db:
        assert verify_chain(db, pk) == (True, None, before + 1)


def _held(pk: int, session_id: str, deadline: datetime, last_hash: str):  # type: ignore[no-untyped-def]
    from app.sweeps.bulk import DueSession, _Held

    return _Held(DueSession(pk, session_id, "acc-1", "shop-1", deadline), SessionStatus.ACTIVE,
                 deadline, 1, False, last_hash)
