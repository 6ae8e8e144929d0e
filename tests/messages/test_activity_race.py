"""Live messages and heartbeats take the session's row lock, not the slot transaction:
racing a pause, a transfer, a preemption or a timeout, each either lands before the
change or is refused after it. Proved on MariaDB + Redis with threads posting while
another changes the session: every accepted message was received before the session
left ACTIVE/TRANSFERRED, and no heartbeat answered ACTIVE after it."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.api.access import control_of, controlled_by
from app.audit.models import Operation
from app.clients.service import ClientIdentity, ClientRole
from app.db import utcnow
from app.errors import AutoSessionError
from app.messages.models import Message
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.enums import SenderRole
from app.sessions.models import Session
from app.sessions.schemas import SessionRequest
from app.transfers.schemas import TransferRequest
from tests.sessions.helpers import ask, innodb_deadlocks

pytestmark = [pytest.mark.services, pytest.mark.slow]
POSTERS = 6
_ids = itertools.count()
BOT = ClientIdentity(client_id="cli_racing_bot", name="racing-bot", role=ClientRole.BOT)


def left_at(runtime: Runtime, session_id: str) -> datetime:
    """When the session stopped being ACTIVE (its first audit row leaving ACTIVE)."""
    with runtime.database.read() as db:
        rows = db.execute(select(Operation).where(Operation.session_id == session_id)
                          .order_by(Operation.id)).scalars().all()
    for row in rows:
        if row.from_status == "ACTIVE" and row.to_status != "ACTIVE":
            return row.created_at
    raise AssertionError(f"session {session_id} never left ACTIVE: {rows}")


def race(runtime: Runtime, change: Callable[[str], Any], *, heartbeats: bool = False,
         as_sql: bool = False) -> tuple[str, list[tuple[str, Any]]]:
    """Posters (and heartbeats) hammer one ACTIVE robot session; `change` runs midway.
    `as_sql`: the control given as SQL too, as the HTTP API gives it (one message in two
    round trips, a heartbeat in one query), else only the row-locked path."""
    service = runtime.sessions
    request = SessionRequest(account_id="acc", shop_id=f"race-{next(_ids)}",
                             session_type="AUTO_FOLLOW_UP")
    session_id = service.create(request, actor=BOT.actor,
                                client_id=BOT.client_id).session.session_id
    answers: list[tuple[str, Any]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def post() -> None:
        while not stop.is_set():
            mid = f"m-{next(_ids)}"
            try:
                if heartbeats:
                    view = service.heartbeat(
                        session_id, actor=BOT.actor, control=control_of(BOT, messages=False),
                        controlled_if=controlled_by(BOT, messages=False) if as_sql else None)
                    outcome: Any = ("heartbeat", view.status, view.last_activity_at)
                else:
                    service.record_messages(session_id, [LiveMessage(
                        message_id=mid, sender_role=SenderRole.ROBOT, content="hi",
                        sent_at=utcnow())], actor=BOT.actor,
                        control=control_of(BOT, messages=True),
                        controlled_if=controlled_by(BOT, messages=True) if as_sql else None)
                    outcome = ("accepted", mid)
            except AutoSessionError as exc:
                outcome = ("refused", type(exc).__name__)
            with lock:
                answers.append(outcome)

    threads = [threading.Thread(target=post) for _ in range(POSTERS)]
    deadlocks = innodb_deadlocks(runtime)
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.4)
        change(session_id)
        time.sleep(0.4)
    finally:  # a change that fails must not leave the posters running for good
        stop.set()
        for thread in threads:
            thread.join(30)
    # Every party takes the session's row the same way (its unique key; the posters'
    # transactions at READ COMMITTED, as the slot transactions): they wait for each
    # other, and none is ever chosen as a deadlock's victim (one that was fell back to
    # a slower path, and a change could lose all its attempts to a stream of posters).
    assert innodb_deadlocks(runtime) == deadlocks
    return session_id, answers


def assert_messages_before_leaving(runtime: Runtime, session_id: str,
                                   answers: list[tuple[str, Any]]) -> None:
    accepted = {a[1] for a in answers if a[0] == "accepted"}
    refused = [a for a in answers if a[0] == "refused"]
    assert accepted and refused, (len(accepted), len(refused))
    moment = left_at(runtime, session_id)
    with runtime.database.read() as db:
        stored = db.execute(select(Message.message_id, Message.received_at, Message.sent_at)
                            .where(Message.message_id.in_(accepted))).all()
    assert len(stored) == len(accepted)
    late = [(mid, at) for mid, at, _ in stored if at > moment]
    assert not late, (moment, late[:5])
    # the session's counters and times say exactly what was stored
    with runtime.database.read() as db:
        session = db.execute(select(Session).where(Session.session_id == session_id)).scalar_one()
    assert session.message_count == session.robot_message_count == len(accepted)
    assert session.first_message_at == min(sent for *_, sent in stored)
    assert session.last_message_at == max(sent for *_, sent in stored)


WAYS = pytest.mark.parametrize("as_sql", [False, True], ids=["row-locked", "as-sql"])


@WAYS
@pytest.mark.parametrize("attempt", range(3))
def test_messages_racing_a_pause_land_before_it_or_are_refused(runtime: Runtime, attempt: int,
                                                                as_sql: bool):
    session_id, answers = race(runtime, lambda sid: runtime.sessions.pause(sid, actor="bot"),
                               as_sql=as_sql)
    assert_messages_before_leaving(runtime, session_id, answers)


@WAYS
def test_messages_racing_a_transfer_land_before_it_or_are_refused(runtime: Runtime, as_sql: bool):
    """The bot controls its session until the transfer; after it the desk does."""

    def transfer(sid: str) -> None:
        runtime.sessions.transfer(sid, TransferRequest(reason="help"), actor=BOT.actor)

    session_id, answers = race(runtime, transfer, as_sql=as_sql)
    assert_messages_before_leaving(runtime, session_id, answers)


@WAYS
def test_messages_racing_a_preemption_land_before_it_or_are_refused(runtime: Runtime, as_sql: bool):
    def preempt(sid: str) -> None:
        session = runtime.sessions.get(sid)
        ask(runtime.sessions, "MANUAL_CUSTOMER_SERVICE", account=session.account_id,
            shop=session.shop_id)

    session_id, answers = race(runtime, preempt, as_sql=as_sql)
    assert_messages_before_leaving(runtime, session_id, answers)


@WAYS
def test_messages_racing_a_timeout_land_before_it_or_are_refused(runtime: Runtime, as_sql: bool):
    def time_out(sid: str) -> None:
        assert runtime.sessions.expire(sid, now=utcnow() + timedelta(days=1)) is not None

    session_id, answers = race(runtime, time_out, as_sql=as_sql)
    assert_messages_before_leaving(runtime, session_id, answers)


@WAYS
def test_heartbeats_racing_a_timeout_never_answer_active_after_it(runtime: Runtime, as_sql: bool):
    def time_out(sid: str) -> None:
        assert runtime.sessions.expire(sid, now=utcnow() + timedelta(days=1)) is not None

    session_id, answers = race(runtime, time_out, heartbeats=True, as_sql=as_sql)
    moment = left_at(runtime, session_id)
    active = [a for a in answers if a[0] == "heartbeat" and a[1] == "ACTIVE"]
    ended = [a for a in answers if a[0] == "heartbeat" and a[1] == "TIMEOUT"]
    assert active and ended, (len(active), len(ended))
    assert all(a[2] <= moment for a in active)
    assert runtime.sessions.get(session_id).status == "TIMEOUT"
