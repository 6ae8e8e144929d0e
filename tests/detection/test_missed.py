"""The safety net for lost detection runs: an ACTIVE robot session with a counterpart
message no run has judged (its task was lost: a broker restarted without its data, a
process killed with its queue) is judged by the beat's `detection.sweep_missed`, not
only at the session's next counterpart message. The end to end fault, a real worker on
a Redis restarted without its data, is in test_missed_fault.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import count

import sqlalchemy as sa

from app.detection.service import MISSED_WINDOW, detect_session, missed_sessions
from app.messages.service import LiveMessage
from app.runtime import build_runtime
from app.sessions.models import Session
from tasks.celery_app import celery
from tasks.detection import MISSED_SWEEP_INTERVAL, sweep_missed_detection
from tests.detection.helpers import settled
from tests.sessions.helpers import ask, status_of

_ids = count(1)


def said(role: str, text: str) -> LiveMessage:
    return LiveMessage(message_id=f"missed-{next(_ids)}", sender_role=role, content=text,
                       sent_at=datetime.now(UTC), sender_id=f"{role}-1")


def say_without_detection(settings, session_id: str, *messages: LiveMessage) -> None:  # type: ignore[no-untyped-def]
    """Record messages from a process whose detection never runs: a runtime that no
    composition root wired (no dispatcher) commits them and sends nothing, as when the
    task is lost after the commit."""
    lost = build_runtime(settings)
    lost._schema_checked = True
    try:
        lost.sessions.record_messages(session_id, list(messages), actor="bot")
    finally:
        lost.close()


def test_a_request_for_a_person_whose_detection_was_lost_is_judged_by_the_safety_net(
        runtime, settings, service):
    robot = ask(service, "AUTO_BARGAIN").session
    say_without_detection(settings, robot.session_id, said("counterpart", "帮我转人工"))
    settled()
    assert status_of(service, robot.session_id) == "ACTIVE"  # nobody judged it
    assert missed_sessions(runtime) == [robot.session_id]

    assert sweep_missed_detection() == [robot.session_id]
    settled()
    assert status_of(service, robot.session_id) == "TRANSFERRED"
    assert missed_sessions(runtime) == []
    entry = celery.conf.beat_schedule["detection-missed"]
    assert (entry["task"], entry["schedule"]) == (sweep_missed_detection.name,
                                                  MISSED_SWEEP_INTERVAL)


def test_only_live_robot_sessions_with_unjudged_counterpart_messages_are_missed(
        runtime, settings, service):
    judged = ask(service, "AUTO_BARGAIN", shop="judged").session
    service.record_messages(judged.session_id, [said("counterpart", "能便宜点吗")],
                            actor="bot")  # detection runs (in the background)
    settled()
    robot_only = ask(service, "AUTO_BARGAIN", shop="robot-only").session
    say_without_detection(settings, robot_only.session_id, said("robot", "亲，最低价了"))
    human = ask(service, "MANUAL_CUSTOMER_SERVICE", shop="human").session
    say_without_detection(settings, human.session_id, said("counterpart", "我要投诉"))
    lost = ask(service, "AUTO_BARGAIN", shop="lost").session
    say_without_detection(settings, lost.session_id, said("counterpart", "还在吗"))
    paused = ask(service, "AUTO_BARGAIN", shop="paused").session
    say_without_detection(settings, paused.session_id, said("counterpart", "还在吗"))
    service.pause(paused.session_id, actor="test")
    # quiet for longer than the window (its deadline is its last activity + the timeout)
    quiet = ask(service, "AUTO_BARGAIN", shop="quiet").session
    say_without_detection(settings, quiet.session_id, said("counterpart", "还在吗"))
    deadline = service.get(quiet.session_id).deadline_at
    with runtime.database.transaction() as conn:
        conn.execute(sa.update(Session).where(Session.session_id == quiet.session_id)
                     .values(deadline_at=deadline - MISSED_WINDOW - timedelta(seconds=5)))
    assert missed_sessions(runtime) == [lost.session_id]
    # a run that judged the message (no person asked for) clears it
    assert detect_session(runtime, lost.session_id).examined == 1
    assert missed_sessions(runtime) == []


def test_a_run_with_nothing_new_catches_the_mark_up_with_the_count(runtime, service):
    """A message that committed between a run's read of the count and of the messages
    was judged by that run but not counted on its mark: the next run finds nothing new
    and still records the count, so the safety net does not send the session forever."""
    robot = ask(service, "AUTO_BARGAIN").session
    service.record_messages(robot.session_id, [said("counterpart", "好的")], actor="bot")
    settled()
    with runtime.database.transaction() as conn:
        conn.execute(sa.text("UPDATE detection_marks SET counterpart_seen = 0"))
    assert missed_sessions(runtime) == [robot.session_id]
    assert detect_session(runtime, robot.session_id).examined == 0
    assert missed_sessions(runtime) == []
