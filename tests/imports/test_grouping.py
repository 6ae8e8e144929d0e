"""SPEC §4 steps 2–7, case by case, through the whole pipeline (freezegun for "now")."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from freezegun import freeze_time
from sqlalchemy import select

from app.audit.trail import verify_chain
from app.imports.rows import Msg
from app.imports.segmenting import split_at_gaps
from app.manager import AutoSessionManager
from app.sessions.enums import SenderRole
from app.transfers.models import Transfer
from tests.imports.helpers import (
    as_ndjson,
    conversation,
    message_count,
    messages_of,
    row,
    run_job,
    sessions_of,
)
from tests.sessions.helpers import ask, audit_rows, events_for

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=2)  # "now" for history that is long over


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def imported(runtime, rows, now=LATER, **kw):
    with freeze_time(now):
        return run_job(runtime, as_ndjson(rows), filename="h.ndjson", **kw)


def test_gap_over_thirty_minutes_starts_a_new_session_and_exactly_thirty_does_not(runtime):
    rows = (conversation("s", T0, "crcr")
            + conversation("s", T0 + minutes(3) + minutes(30), "cr")  # exactly 30 min: same
            + conversation("s", T0 + minutes(4) + minutes(61), "cr"))  # 31+ min gap: new
    job = imported(runtime, rows)
    sessions = sessions_of(runtime, "s")
    assert job.sessions_created == 2
    assert [s.message_count for s in sessions] == [6, 2]
    assert all(s.status == "COMPLETED" and s.origin == "import" for s in sessions)
    assert sessions[0].first_message_at == T0
    assert sessions[0].ended_at == T0 + minutes(34)


def test_rows_out_of_order_are_sorted_before_segmenting(runtime):
    rows = conversation("s", T0, "crcrcr")
    imported(runtime, list(reversed(rows)))
    (session,) = sessions_of(runtime, "s")
    assert [m.content for m in messages_of(runtime, session.id)] == [r["content"] for r in rows]


def test_session_type_follows_our_sides_first_sender(runtime):
    imported(runtime, conversation("robot-first", T0, "crch")
             + conversation("staff-first", T0, "chr")
             + conversation("silent", T0, "cc")
             + conversation("silent-complaint", T0, "cc", task_type="complaint")
             + conversation("follow", T0, "cr", task_type="follow_up"))
    kinds = {s.shop_id: (s.session_type, s.task_type, s.unanswered) for s in sessions_of(runtime)}
    assert kinds == {
        "robot-first": ("AUTO_BARGAIN", "negotiation", False),
        "staff-first": ("MANUAL_CUSTOMER_SERVICE", "consultation", False),
        "silent": ("MANUAL_CUSTOMER_SERVICE", "consultation", True),
        "silent-complaint": ("MANUAL_COMPLAINT", "complaint", True),
        "follow": ("AUTO_FOLLOW_UP", "follow_up", False),
    }


def test_robot_then_staff_is_one_session_with_a_history_transfer(runtime):
    imported(runtime, conversation("s", T0, "crcch", sender_id=None))
    (session,) = sessions_of(runtime, "s")
    assert session.session_type == "AUTO_BARGAIN" and session.message_count == 5
    with runtime.database.read() as db:
        (transfer,) = db.execute(select(Transfer)).scalars()
    assert (transfer.session_id, transfer.trigger, transfer.status) == (
        session.session_id, "history", "COMPLETED")
    assert transfer.agent_id == "human-1" and transfer.accepted_at == T0 + minutes(4)
    # The conversation before the hand-off is referenced, not copied: the session and
    # the ids of its messages, stored with it.
    stored = messages_of(runtime, session.id)
    assert transfer.history == {"session_id": session.session_id,
                                "recent_message_ids": [m.message_id for m in stored[:4]]}


def test_staff_joining_an_ended_robot_session_later_is_its_hand_off_once(runtime):
    """A second export continues a closed robot session with staff messages: that session
    gets its history transfer (once: a third upload of more staff adds none)."""
    imported(runtime, conversation("s", T0, "crcr"))
    imported(runtime, conversation("s", T0 + minutes(10), "chch", sender_id="agent-9"))
    imported(runtime, conversation("s", T0 + minutes(20), "ch", sender_id="agent-9"))
    (session,) = sessions_of(runtime, "s")
    assert (session.session_type, session.message_count) == ("AUTO_BARGAIN", 10)
    with runtime.database.read() as db:
        (transfer,) = db.execute(select(Transfer)).scalars()
    assert (transfer.session_id, transfer.trigger, transfer.status, transfer.agent_id) == (
        session.session_id, "history", "COMPLETED", "agent-9")
    assert transfer.accepted_at == T0 + minutes(11)
    ops = audit_rows(runtime, session.session_id)
    assert [o.operation for o in ops] == ["import", "import-messages", "import-messages"]
    assert ops[1].details["transfer_id"] == transfer.transfer_id
    assert "transfer_id" not in ops[2].details
    with runtime.database.read() as db:
        assert verify_chain(db, session.id)[0]


def test_staff_joining_an_ended_human_session_is_no_hand_off(runtime):
    imported(runtime, conversation("s", T0, "chch"))
    imported(runtime, conversation("s", T0 + minutes(10), "ch"))
    with runtime.database.read() as db:
        assert db.execute(select(Transfer)).scalars().all() == []


def test_every_imported_session_is_audited_by_system_import_and_chains(runtime):
    imported(runtime, conversation("s", T0, "cr"))
    (session,) = sessions_of(runtime, "s")
    ops = audit_rows(runtime, session.session_id)
    assert [(o.operation, o.to_status, o.actor) for o in ops] == [
        ("import", "COMPLETED", "system:import")]
    with runtime.database.read() as db:
        assert verify_chain(db, session.id)[0]
    assert events_for(runtime, session.session_id) == []  # history makes no live noise


def test_reupload_changes_nothing_and_new_messages_join_the_session_they_continue(runtime):
    rows = conversation("s", T0, "crcr")
    first = imported(runtime, rows)
    again = imported(runtime, rows)
    assert (again.inserted, again.duplicates, again.sessions_created, again.sessions_updated) == (
        0, 4, 0, 0)
    assert again.status == "succeeded"
    more = rows + conversation("s", T0 + minutes(20), "ch")  # continues within the gap
    third = imported(runtime, more)
    assert (first.inserted, third.inserted, third.duplicates, third.sessions_updated) == (
        4, 2, 4, 1)
    (session,) = sessions_of(runtime, "s")
    assert session.message_count == 6 and session.human_message_count == 1
    assert session.last_message_at == T0 + minutes(21)
    assert [o.operation for o in audit_rows(runtime, session.session_id)] == [
        "import", "import-messages"]
    fourth = imported(runtime, more + conversation("s", T0 + minutes(40), "c"))
    assert (fourth.inserted, fourth.sessions_updated) == (1, 1)
    ops = audit_rows(runtime, session.session_id)
    assert [o.operation for o in ops] == ["import", "import-messages", "import-messages"]
    assert ops[2].prev_hash == ops[1].row_hash and ops[1].prev_hash == ops[0].row_hash
    with runtime.database.read() as db:
        assert verify_chain(db, session.id) == (True, None, 3)


def test_stored_rows_behind_a_new_first_row_are_still_found_duplicates(runtime, caplog):
    """The first attempt looks up only each slot's first row; here that row is new and the
    rest are stored, so the unique key refuses the insert and the retry looks them up."""
    rows = conversation("s", T0, "crc")
    imported(runtime, rows)
    caplog.set_level(logging.INFO, logger="app.imports.batch")
    earlier = row("s", "counterpart", T0 - minutes(5), "an earlier question")
    again = imported(runtime, [earlier, *rows])
    assert "retried after IntegrityError" in caplog.text
    assert (again.inserted, again.duplicates, again.sessions_created, again.sessions_updated) == (
        1, 3, 0, 1)
    (session,) = sessions_of(runtime, "s")
    assert session.message_count == 4 and session.first_message_at == T0 - minutes(5)
    assert message_count(runtime) == 4
    with runtime.database.read() as db:
        assert verify_chain(db, session.id) == (True, None, 2)


def test_duplicates_inside_one_upload_are_counted_once(runtime):
    rows = conversation("s", T0, "cr")
    rows = [{**r, "message_id": f"m{i}"} for i, r in enumerate(rows)]
    job = imported(runtime, rows + rows[:1] + [{**rows[1], "content": "same id"}])
    assert (job.inserted, job.duplicates, job.total_rows) == (2, 2, 4)


def test_history_attaches_to_a_live_session_it_overlaps(runtime):
    with freeze_time(T0):
        live = ask(runtime.sessions, "AUTO_BARGAIN", account="acc-1", shop="s").session
    seen: list[list[str]] = []
    runtime.hooks.counterpart_messages = lambda ids: seen.append(list(ids))
    job = imported(runtime, conversation("s", T0 + minutes(5), "crc"), now=T0 + minutes(10))
    assert (job.sessions_created, job.sessions_updated, job.conflicts) == (0, 1, 0)
    view = runtime.sessions.get(live.session_id)
    assert view.status == "ACTIVE" and view.message_count == 3
    assert seen == [[live.session_id]]  # counterpart messages go to transfer detection
    assert audit_rows(runtime, live.session_id)[-1].actor == "system:import"


def test_a_segment_still_going_on_becomes_a_live_session_under_the_slot_rules(runtime):
    now = T0 + minutes(15)
    job = imported(runtime, conversation("s", T0, "cr"), now=now)
    (session,) = sessions_of(runtime, "s")
    assert (session.status, session.origin, bool(session.holds_slot)) == ("ACTIVE", "import", True)
    assert job.sessions_created == 1
    assert events_for(runtime, session.session_id) == ["session.activated"]


def test_live_history_joins_the_open_session_never_a_second_occupant(runtime):
    with freeze_time(T0 - timedelta(hours=3)):
        human = ask(runtime.sessions, "MANUAL_CUSTOMER_SERVICE", shop="s").session
    # The human session is open but its window ended; a fresh robot segment starts now.
    with runtime.database.unit_of_work() as uow:
        from app.sessions.models import Session
        row_ = uow.session.get(Session, sessions_of(runtime, "s")[0].id)
        row_.first_message_at = row_.created_at
        uow.commit()
    job = imported(runtime, conversation("s", T0, "cr"), now=T0 + minutes(5))
    # an open session is a candidate until now: the segment joins it, never a 2nd occupant
    assert job.sessions_created == 0 and job.sessions_updated == 1
    assert runtime.sessions.get(human.session_id).status == "ACTIVE"


def test_human_free_chat_on_an_active_robot_slot_is_case_1(runtime):
    with freeze_time(T0):
        robot = ask(runtime.sessions, "AUTO_BARGAIN", shop="s", owner_id="bot-9").session
    rows = conversation("s", T0 + minutes(2), "crh") + conversation(
        "s", T0 + minutes(5), "hc", sender_id="agent-7")
    job = imported(runtime, rows, now=T0 + minutes(8))
    assert job.conflicts == 1 and job.sessions_created == 1
    robot_view = runtime.sessions.get(robot.session_id)
    assert (robot_view.status, robot_view.pause_cause) == ("PAUSED", "preempted")
    assert robot_view.message_count == 2  # the counterpart and robot lines before staff
    human = next(s for s in sessions_of(runtime, "s") if s.session_id != robot.session_id)
    assert (human.session_type, human.status, human.origin) == (
        "MANUAL_CUSTOMER_SERVICE", "ACTIVE", "import")
    assert human.message_count == 3 and human.interrupted_session_id == robot.session_id
    assert "session.paused" in events_for(runtime, robot.session_id)  # the robot is told
    assert [o.operation for o in audit_rows(runtime, robot.session_id)][-2:] == [
        "preempt", "import-conflict"]


def test_free_chat_that_is_already_over_pauses_then_gives_the_slot_back(runtime):
    with freeze_time(T0):
        robot = ask(runtime.sessions, "AUTO_BARGAIN", shop="s").session
    job = imported(runtime, conversation("s", T0 + minutes(1), "hch"), now=T0 + minutes(50))
    assert job.conflicts == 1
    assert runtime.sessions.get(robot.session_id).status == "ACTIVE"
    assert events_for(runtime, robot.session_id)[-2:] == ["session.paused", "session.resumed"]
    human = next(s for s in sessions_of(runtime, "s") if s.session_id != robot.session_id)
    assert human.status == "COMPLETED" and human.message_count == 3


def test_the_segmenter_is_a_replaceable_step(runtime):
    from app.imports.service import ImportService

    def one_segment(messages, gap):
        return [list(messages)] if messages else []

    rows = conversation("s", T0, "cr") + conversation("s", T0 + timedelta(hours=5), "cr")
    with freeze_time(LATER):
        service = ImportService(runtime, segmenter=one_segment)
        import io
        job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="x.ndjson")
        for pk in service.prepare(job.job_id).chunk_pks:
            service.process_chunk(pk)
        service.finish(job.job_id)
    assert len(sessions_of(runtime, "s")) == 1
    assert split_at_gaps([], timedelta(minutes=30)) == []
    msg = Msg(1, "m", "a", "s", SenderRole.ROBOT, None, "x", "text", T0, None, None)
    assert split_at_gaps([msg], timedelta(minutes=30)) == [[msg]]


def test_seed_batch_history_example_through_the_manager(runtime):
    historical_messages = [
        {"user_id": "user123", "shop_id": 1, "sender_role": "counterpart",
         "content": "在吗", "timestamp": "2024-01-01T10:00:00"},
        {"user_id": "user123", "shop_id": 1, "is_robot": True, "content": "您好",
         "timestamp": "2024-01-01T10:01:00"},
        {"user_id": "user123", "shop_id": 1, "sender_role": "counterpart",
         "content": "还有货吗", "timestamp": "2024-01-01T14:00:00"},
        {"user_id": "user123", "shop_id": 1, "content": "bad time", "timestamp": "yesterday"},
    ]
    manager = AutoSessionManager(runtime)
    with freeze_time(LATER):
        result = manager.process_chat_messages(historical_messages)
        again = manager.process_chat_messages(historical_messages)
    assert (result.processed_count, result.sessions_created, result.inserted, result.invalid) == (
        3, 2, 3, 1)
    assert result.errors[0].line == 4
    assert (again.inserted, again.duplicates, again.sessions_created) == (0, 3, 0)
    assert message_count(runtime) == 3


def test_pinned_session_id_rows_attach_to_that_session(runtime):
    with freeze_time(T0):
        live = ask(runtime.sessions, "AUTO_BARGAIN", shop="s").session
    rows = [row("s", "counterpart", T0 + timedelta(hours=3), "pinned",
                session_id=live.session_id)]
    imported(runtime, rows, now=T0 + timedelta(hours=3, minutes=1))
    assert runtime.sessions.get(live.session_id).message_count == 1
