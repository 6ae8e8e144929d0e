"""The create path's cost in SQL statements, and what its Core INSERT leaves in the row.

A create is the request upstream bots send most; its statement count is what the API
benchmark's creation rate follows. These tests pin the count, so that a read added to
the hot path is a visible decision rather than a slow drift.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pymysql.cursors
import pytest
from sqlalchemy import event, text

from app.audit.trail import verify_chain
from app.runtime import Runtime
from app.sessions.models import Session
from app.sessions.schemas import SessionRequest
from tests.sessions.helpers import ask, audit_rows, events_for


@contextmanager
def statements(runtime: Runtime) -> Iterator[list[str]]:
    """The SQL statements sent to the database inside the block, by verb, and COMMITs
    (SQLite's explicit BEGIN IMMEDIATE is left out: MySQL begins implicitly). Counted
    where they reach the driver: Core's events on SQLite; on MySQL the PyMySQL cursor's
    and connection's calls (the hot statements and commits run there directly,
    `app.fastsql`, `app.db.DriverConnection`)."""
    seen: list[str] = []

    def verb(statement: str | bytes | bytearray) -> str:
        if not isinstance(statement, str):
            statement = bytes(statement[:16]).decode()
        return statement.split(None, 1)[0].upper()

    def before(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if verb(statement) != "BEGIN" and runtime.database.dialect != "mysql":
            seen.append(verb(statement))

    def commit(conn):  # type: ignore[no-untyped-def]
        if runtime.database.dialect != "mysql":
            seen.append("COMMIT")

    engine = runtime.database.engine
    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "commit", commit)
    original = (pymysql.cursors.Cursor.execute, pymysql.connections.Connection.commit,
                pymysql.connections.Connection.rollback)

    def execute(cursor, query, args=None):  # type: ignore[no-untyped-def]
        seen.append(verb(query))
        return original[0](cursor, query, args)

    def driver_commit(connection):  # type: ignore[no-untyped-def]
        seen.append("COMMIT")  # on MySQL a slot transaction commits on the driver itself
        return original[1](connection)

    def driver_rollback(connection):  # type: ignore[no-untyped-def]
        seen.append("ROLLBACK")
        return original[2](connection)

    # (PyMySQL's executemany sends what it sends through `execute`: one multi-row
    # INSERT, or one statement a row)
    mysql = runtime.database.dialect == "mysql"
    if mysql:
        pymysql.cursors.Cursor.execute = execute  # type: ignore[method-assign]
        pymysql.connections.Connection.commit = driver_commit  # type: ignore[method-assign]
        pymysql.connections.Connection.rollback = driver_rollback  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        if mysql:
            pymysql.cursors.Cursor.execute = original[0]  # type: ignore[method-assign]
            pymysql.connections.Connection.commit = original[1]  # type: ignore[method-assign]
            pymysql.connections.Connection.rollback = original[2]  # type: ignore[method-assign]
        event.remove(engine, "before_cursor_execute", before)
        event.remove(engine, "commit", commit)


def test_create_on_a_never_used_slot_is_five_statements_and_a_commit(runtime, service):
    ask(service, "AUTO_BARGAIN", shop="warm-up")  # first-use caches (webhook presence)
    with statements(runtime) as seen:
        out = ask(service, "AUTO_BARGAIN", shop="fresh")
    # fence read, session, its two audit rows (one statement), its event, the slot row
    assert seen == ["SELECT", "INSERT", "INSERT", "INSERT", "INSERT", "COMMIT"]
    assert out.session.status == "ACTIVE"
    assert [r.operation for r in audit_rows(runtime, out.session.session_id)] == [
        "create", "activate"]
    assert events_for(runtime, out.session.session_id) == ["session.activated"]


def test_create_on_a_used_free_slot_bumps_the_fence_instead(runtime, service):
    first = ask(service, "AUTO_BARGAIN", shop="again").session
    service.complete(first.session_id, actor="test")
    with statements(runtime) as seen:
        ask(service, "AUTO_BARGAIN", shop="again")
    assert seen == ["SELECT", "INSERT", "INSERT", "INSERT", "UPDATE", "COMMIT"]


def test_created_row_keeps_sql_nulls_and_stays_updatable(runtime, service):
    out = ask(service, "AUTO_BARGAIN", shop="nulls")
    with runtime.database.read() as db:
        row = db.execute(text(
            "SELECT context IS NULL, result IS NULL, ended_at IS NULL, message_count, "
            "origin, unanswered FROM sessions WHERE session_id = :sid"),
            {"sid": out.session.session_id}).one()
    assert tuple(row) == (1, 1, 1, 0, "live", 0)
    # the object inserted by Core joined the unit of work: later changes are flushed
    paused = service.pause(out.session.session_id, actor="test")
    assert paused.status == "PAUSED"
    with runtime.database.read() as db:
        session = db.query(Session).filter_by(session_id=out.session.session_id).one()
        assert (session.status, session.pause_cause) == ("PAUSED", "owner")
        assert verify_chain(db, session.id)[0]


@pytest.mark.services  # SQLite has no row locks: there every create takes the slot lock
def test_a_create_joining_a_busy_slots_line_needs_neither_the_slot_lock_nor_the_fence(
        runtime, service):
    ask(service, "MANUAL_CUSTOMER_SERVICE", shop="busy", owner_id="agent-1")
    ask(service, "AUTO_BARGAIN", shop="busy")  # waits: the slot is now known to be busy
    with runtime.locks.hold("acc-1", "busy"), statements(runtime) as seen:
        # the slot lock is taken (a slow slot change elsewhere): joining the line is not
        # held up by it
        out = ask(service, "AUTO_FOLLOW_UP", shop="busy")
    assert out.session.status == "PENDING"
    # the slot row read shared, the session, its place in line, its audit row, its
    # event: no fence bump
    assert seen == ["SELECT", "INSERT", "SELECT", "INSERT", "INSERT", "COMMIT"]
    assert events_for(runtime, out.session.session_id) == ["session.queued"]
    with runtime.database.read() as db:
        pk = db.query(Session.id).filter_by(session_id=out.session.session_id).scalar()
        assert verify_chain(db, pk)[0]


def test_a_heartbeat_is_one_query_on_mysql(runtime, service):
    """The conditional UPDATE and the read of the answer go together (MySQL's AUTOCOMMIT
    pool takes several statements a query); on SQLite, one after the other in one
    transaction."""
    from sqlalchemy import true

    sid = ask(service, "AUTO_BARGAIN", shop="beat").session.session_id
    service.heartbeat(sid, actor="test", controlled_if=(true(), {}))  # a pooled connection
    before = service.get(sid).deadline_at
    with statements(runtime) as seen:
        view = service.heartbeat(sid, actor="test", controlled_if=(true(), {}))
    mysql = runtime.database.dialect == "mysql"
    assert seen == (["UPDATE"] if mysql else ["UPDATE", "SELECT", "COMMIT"])
    assert view.status == "ACTIVE" and view.deadline_at > before
    assert service.get(sid).deadline_at == view.deadline_at
    # a session the condition does not match: the row-locked path says why
    service.complete(sid, actor="test")
    with statements(runtime) as seen:
        assert service.heartbeat(sid, actor="test",
                                 controlled_if=(true(), {})).status == "COMPLETED"
    assert seen[0] == "UPDATE" and "SELECT" in seen[1:]


def test_one_robot_message_is_two_round_trips_on_mysql(runtime, service):
    """Given the control as SQL, one new robot message is one query (the transaction's
    start, the counters' UPDATE, the INSERT … SELECT, the answer's read) and a COMMIT; a
    duplicate of it is rolled back there and answered by the row-locked path."""
    from app.api.access import controlled_by
    from app.clients.service import ClientIdentity, ClientRole
    from app.db import utcnow
    from app.messages.service import LiveMessage
    from app.sessions.enums import SenderRole

    bot = ClientIdentity(client_id="cli_hot", name="hot", role=ClientRole.BOT)
    sid = service.create(SessionRequest(account_id="acc-1", shop_id="talk",
                                        session_type="AUTO_BARGAIN"),
                         actor=bot.actor, client_id=bot.client_id).session.session_id

    def post(mid: str, fits: tuple[str | None, str | None] = (None, None)):  # type: ignore[no-untyped-def]
        return service.record_messages(
            sid, [LiveMessage(message_id=mid, sender_role=SenderRole.ROBOT, content="hi",
                              sent_at=utcnow())],
            actor=bot.actor, controlled_if=controlled_by(bot, messages=True), fits=fits)

    post("warm-up")  # a pooled connection
    with statements(runtime) as seen:
        outcome = post("m-1", ("acc-1", "talk"))
    mysql = runtime.database.dialect == "mysql"
    assert seen == (["START", "COMMIT"] if mysql else ["SELECT", "INSERT", "UPDATE", "COMMIT"])
    assert (outcome.accepted, outcome.duplicates, outcome.session.message_count) == (1, 0, 2)
    with statements(runtime) as seen:
        again = post("m-1")
    assert (again.accepted, again.duplicates, again.session.message_count) == (0, 1, 2)
    if mysql:
        assert seen[:2] == ["START", "ROLLBACK"] and "SELECT" in seen[2:]
    assert service.get(sid).message_count == 2


def test_session_new_builds_what_the_constructor_builds_and_tracks_later_changes():
    from datetime import UTC, datetime

    from sqlalchemy import inspect

    from app.sessions.enums import SessionStatus, SessionType, TaskType

    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    values = {"session_id": "ses_x", "account_id": "a", "shop_id": "s",
              "session_type": "AUTO_BARGAIN", "task_type": TaskType.NEGOTIATION, "priority": 5,
              "status": "PENDING", "created_at": at, "context": {"k": [1]}, "reason": None}
    built, made = Session(**dict(values)), Session.new(**dict(values))
    assert inspect(made).transient
    plain = {k: v for k, v in inspect(built).dict.items() if k in values}
    assert {k: v for k, v in inspect(made).dict.items() if k in values} == plain
    assert made.session_type is SessionType.AUTO_BARGAIN  # text → member, as validated
    assert made.status is SessionStatus.PENDING
    assert made.ended_at is None  # unset: as the constructor leaves it
    assert not inspect(made).modified
    made.status = SessionStatus.ACTIVE  # later assignments are tracked and validated
    assert inspect(made).modified and made.status is SessionStatus.ACTIVE
    made.status = "PAUSED"
    assert made.status is SessionStatus.PAUSED
    with pytest.raises(TypeError, match="'nope' is an invalid keyword"):
        Session.new(nope=1)
    with pytest.raises(TypeError):
        Session(nope=1)
