"""`app.fastsql.Prepared` gives what Core gives: the same rows (every type converted by
its own processors), the same counts, the same exceptions — on both backends (on
SQLite it is Core itself)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from app.db import constant, one_of
from app.fastsql import Prepared, takes_several_statements
from app.sessions.enums import SessionStatus, SessionType
from app.sessions.models import READ_SESSION, SESSION_BY_ID, SESSIONS
from app.sessions.schemas import SessionView
from app.transfers.schemas import TransferRequest
from tests.sessions.helpers import ask


def test_a_session_row_reads_the_same_as_through_core(runtime, service):
    sid = ask(service, "AUTO_BARGAIN", shop="f1",
              context={"nested": {"list": [1, "two", None]}, "ü": True}).session.session_id
    service.transfer(sid, TransferRequest(reason="needs a person"), actor="test")
    prepared = Prepared(SESSION_BY_ID)
    with runtime.database.connect() as conn:
        core = conn.execute(SESSION_BY_ID, {"session_id": sid}).one()._asdict()
        for _ in range(2):  # the second time with the result processors built
            fast = prepared.one_or_none(conn, {"session_id": sid})
            assert fast == core
            assert [type(fast[k]) for k in core] == [type(v) for v in core.values()]
        assert fast.status == "TRANSFERRED" and fast._asdict() == core
        # the enum columns come back as their members, by either way
        assert fast.status is SessionStatus.TRANSFERRED and core["status"] is fast.status
        assert fast.session_type is SessionType.AUTO_BARGAIN
        assert fast["context"] == {"nested": {"list": [1, "two", None]}, "ü": True}
        assert fast["created_at"].tzinfo is not None
        assert prepared.one_or_none(conn, {"session_id": "ses_missing"}) is None
        # the hot paths' narrower read: the same view, and the key the desk's check needs
        narrow = READ_SESSION.one_or_none(conn, {"session_id": sid})
    assert SessionView.model_validate(fast) == SessionView.model_validate(core)
    assert SessionView.model_validate(narrow) == SessionView.model_validate(core)
    assert narrow.id == core["id"] and "audit_head" not in narrow


def test_an_enum_literal_in_a_prepared_statement_binds_its_text(runtime, service):
    """A literal (`status == SessionStatus.ACTIVE`) is an anonymous bind: its processor
    is found by the name `construct_params` gives it."""
    sid = ask(service, "AUTO_BARGAIN", shop="f3").session.session_id
    active = Prepared(select(SESSIONS.c.status).where(
        SESSIONS.c.session_id == bindparam("sid"), SESSIONS.c.status == SessionStatus.ACTIVE))
    with runtime.database.connect() as conn:
        for _ in range(2):
            assert active.scalar(conn, {"sid": sid}) is SessionStatus.ACTIVE


def test_constants_are_written_into_the_statement_and_select_the_same_rows(runtime, service):
    """`one_of` and `constant` put our own enum values into the statement's text (no
    parameter to copy and escape on every execution) and match what the parameters
    matched, by Prepared and by Core, on either backend."""
    ids = {status: ask(service, "AUTO_BARGAIN", shop=f"k-{status}").session.session_id
           for status in ("ACTIVE", "PAUSED")}
    service.pause(ids["PAUSED"], actor="test")
    c = SESSIONS.c
    by_constant = select(c.session_id).where(
        c.shop_id.like("k-%"), one_of(c.status, ["PENDING", SessionStatus.PAUSED]),
        c.session_type != constant(SessionType.AUTO_FOLLOW_UP))
    by_parameter = select(c.session_id).where(
        c.shop_id.like("k-%"), c.status.in_(["PENDING", "PAUSED"]),
        c.session_type != SessionType.AUTO_FOLLOW_UP)
    compiled = by_constant.compile(dialect=runtime.database.engine.dialect)
    assert compiled.construct_params() == {"shop_id_1": "k-%"}  # the LIKE pattern only
    assert "'PAUSED'" in compiled.string and "'AUTO_FOLLOW_UP'" in compiled.string
    prepared = Prepared(by_constant)
    with runtime.database.connect() as conn:
        expected = [r.session_id for r in conn.execute(by_parameter)]
        assert expected == [ids["PAUSED"]]
        assert [r.session_id for r in conn.execute(by_constant)] == expected
        assert prepared.scalar(conn, {}) == ids["PAUSED"]


@pytest.mark.parametrize("text", ["", "it's", "a b", "x\\", "'; DROP TABLE sessions; --",
                                  "ü", "x" * 65, "A\n"])
def test_a_constant_is_a_short_plain_word(text):
    with pytest.raises(ValueError, match="not a plain constant"):
        constant(text)


def test_updates_and_inserts_count_and_convert_like_core(runtime, service):
    sid = ask(service, "AUTO_BARGAIN", shop="f2").session.session_id
    touch = Prepared(update(SESSIONS).where(SESSIONS.c.session_id == bindparam("sid")),
                     values_from_params=True)
    at = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    with runtime.database.transaction() as conn:
        assert touch.execute(conn, {"sid": sid, "last_activity_at": at}) == 1
        assert touch.execute(conn, {"sid": sid, "priority": 7, "unanswered": True}) == 1
        assert touch.execute(conn, {"sid": "ses_missing", "priority": 1}) == 0
    with runtime.database.connect() as conn:
        row = conn.execute(SESSION_BY_ID, {"session_id": sid}).one()
    assert (row.last_activity_at, row.priority, row.unanswered) == (at, 7, True)


@pytest.mark.services
def test_errors_are_core_errors_and_a_lost_connection_is_invalidated(runtime, service):
    sid = ask(service, "AUTO_BARGAIN", shop="f3").session.session_id
    with runtime.database.connect() as conn:
        row = conn.execute(select(SESSIONS).where(SESSIONS.c.session_id == sid)).one()
    duplicate = {k: v for k, v in row._asdict().items() if k != "id"}
    again = Prepared(insert(SESSIONS), values_from_params=True)
    with pytest.raises(IntegrityError), runtime.database.transaction() as conn:
        again.execute(conn, duplicate)
    read = Prepared(SESSION_BY_ID)
    with runtime.database.connect() as conn:
        own_id = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        with runtime.database.connect() as killer:
            killer.exec_driver_sql(f"KILL {int(own_id)}")
        with pytest.raises(DBAPIError) as lost:
            read.one_or_none(conn, {"session_id": sid})
        assert lost.value.connection_invalidated and conn.invalidated
    with runtime.database.connect() as conn:  # the pool hands out a working connection
        assert read.one_or_none(conn, {"session_id": sid})["session_id"] == sid


def test_a_write_then_a_read_in_one_query_answer_what_two_answer(runtime, service):
    """`execute_then_one`: the rows the write matched and the row read after it — in one
    query on MySQL's AUTOCOMMIT pool (which asks for several statements a query), one
    after the other elsewhere; the same either way."""
    sid = ask(service, "AUTO_BARGAIN", shop="f4").session.session_id
    touch = Prepared(update(SESSIONS).where(SESSIONS.c.session_id == bindparam("sid")),
                     values_from_params=True)
    at = datetime(2031, 2, 3, 4, 5, 6, 7, tzinfo=UTC)
    with runtime.database.connect() as conn:
        several = takes_several_statements(conn)
        for n in (1, 2):  # the second time with every form compiled
            count, row = touch.execute_then_one(
                conn, {"sid": sid, "last_activity_at": at, "priority": n},
                READ_SESSION, {"session_id": sid})
            assert count == 1 and row is not None
            assert (row.session_id, row.last_activity_at, row.priority) == (sid, at, n)
            assert row.status is SessionStatus.ACTIVE
        count, row = touch.execute_then_one(conn, {"sid": "ses_missing", "priority": 1},
                                            READ_SESSION, {"session_id": "ses_missing"})
        assert (count, row) == (0, None)
        # the connection is in step afterwards (no result left unread)
        assert READ_SESSION.one_or_none(conn, {"session_id": sid}).priority == 2
    assert several == (runtime.database.dialect == "mysql")
    with runtime.database.transaction() as conn:  # the slot transactions' pool: one a query
        assert not takes_several_statements(conn)
        assert touch.execute_then_one(conn, {"sid": sid, "priority": 3}, READ_SESSION,
                                      {"session_id": sid})[1].priority == 3


def test_values_written_into_one_query_are_escaped(runtime, service):
    """What `execute_then_one` writes out is escaped as the driver escapes a parameter: a
    value made to end the statement and start another is only a value."""
    sid = ask(service, "AUTO_BARGAIN", shop="f5").session.session_id
    touch = Prepared(update(SESSIONS).where(SESSIONS.c.session_id == bindparam("sid")),
                     values_from_params=True)
    hostile = "x'; DELETE FROM sessions; -- \\'\"; SELECT 1; %s %(sid)s"
    with runtime.database.connect() as conn:
        count, row = touch.execute_then_one(conn, {"sid": sid, "reason": hostile},
                                            READ_SESSION, {"session_id": sid})
        assert count == 1 and row.reason == hostile
        count, row = touch.execute_then_one(conn, {"sid": hostile, "priority": 1},
                                            READ_SESSION, {"session_id": hostile})
        assert (count, row) == (0, None)
        total = conn.exec_driver_sql("SELECT COUNT(*) FROM sessions").scalar()
    assert total >= 1


@pytest.mark.services
def test_a_failing_write_stops_the_query_and_raises_as_core_raises(runtime, service):
    sid = ask(service, "AUTO_BARGAIN", shop="f6").session.session_id
    other = ask(service, "AUTO_BARGAIN", shop="f7").session.session_id
    clash = Prepared(update(SESSIONS).where(SESSIONS.c.session_id == bindparam("sid")),
                     values_from_params=True)
    read = Prepared(select(SESSIONS.c.priority).where(
        SESSIONS.c.session_id == bindparam("session_id")))
    with runtime.database.connect() as conn:
        with pytest.raises(IntegrityError):  # session_id is unique
            clash.execute_then_one(conn, {"sid": other, "session_id": sid}, read,
                                   {"session_id": sid})
        assert read.one_or_none(conn, {"session_id": other}) is not None  # still in step
        own_id = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar()
        with runtime.database.connect() as killer:
            killer.exec_driver_sql(f"KILL {int(own_id)}")
        with pytest.raises(DBAPIError) as lost:
            clash.execute_then_one(conn, {"sid": sid, "priority": 1}, read,
                                   {"session_id": sid})
        assert lost.value.connection_invalidated and conn.invalidated


def test_the_bulk_insert_leans_on_sqlalchemys_cached_bind_processors():
    """`core_insert` reads each column's bind processor through SQLAlchemy's private
    `TypeEngine._cached_bind_processor` (the per-dialect cache; the public way builds a
    new processor each call). Pinned here: for every column the import inserts, on both
    dialects, it exists and answers what the public `bind_processor` answers, so an
    upgrade that drops or changes it fails this test instead of the import."""
    from sqlalchemy.dialects import mysql, sqlite

    from app.audit.models import Operation
    from app.imports.models import ImportChunkPart
    from app.messages.models import Message
    from app.sessions.models import Session
    from app.transfers.models import Transfer

    samples = {datetime: datetime(2024, 5, 1, 9, 30, 15, 123456, tzinfo=UTC),
               dict: {"a": [1, "ü", None]}, bool: True, int: 7, str: "it's"}
    checked = 0
    for dialect in (sqlite.dialect(), mysql.dialect()):
        for model in (Message, Session, Operation, Transfer, ImportChunkPart):
            for column in model.__table__.columns:
                cached = column.type._cached_bind_processor(dialect)
                public = column.type.dialect_impl(dialect).bind_processor(dialect)
                assert (cached is None) == (public is None), (dialect.name, column)
                assert column.type._cached_bind_processor(dialect) is cached
                try:
                    sample = samples.get(column.type.python_type)
                except NotImplementedError:
                    sample = None
                if cached is not None and public is not None and sample is not None:
                    assert cached(sample) == public(sample), (dialect.name, column)
                    checked += 1
    assert checked  # times, JSON and flags were converted both ways


def _every_prepared_statement() -> list[tuple[str, Prepared]]:
    """Every `Prepared` statement of the app (module constants), and the heartbeat's
    conditional UPDATE for each control condition."""
    import gc

    import app.factory  # noqa: F401 - imports every module that defines one
    from app.api.access import _CONTROL_SQL
    from app.sessions.activity import _touch_statement

    found = [(repr(p.statement)[:60], p) for p in gc.get_objects() if isinstance(p, Prepared)]
    found += [(f"heartbeat {key}", Prepared(_touch_statement(condition)))
              for key, condition in _CONTROL_SQL.items()]
    assert len(found) >= 15
    return found


def _sample(type_: object, n: int) -> object:
    """A value the column type's bind processor accepts."""
    from sqlalchemy import JSON, Boolean, DateTime, Integer

    from app.db import EnumText, UTCDateTime

    if isinstance(type_, UTCDateTime | DateTime):
        return datetime(2026, 12, 6, 7, n % 60, tzinfo=UTC)
    if isinstance(type_, EnumText):
        members = list(type_.enum)
        return members[n % len(members)]
    if isinstance(type_, Boolean):
        return bool(n % 2)
    if isinstance(type_, Integer):
        return n
    if isinstance(type_, JSON):
        return {"n": n}
    return f"v{n}"


def test_planned_parameters_are_what_construct_params_gives():
    """`_Compiled.parameters` builds a positional statement's parameters from a plan made
    once (no `construct_params` per call): for every prepared statement of the app, with
    every parameter given, with optional ones left out (the statement's own literals),
    and with a required one missing (SQLAlchemy's own error), the same as the general way."""
    from types import SimpleNamespace

    from sqlalchemy.dialects.mysql.pymysql import dialect
    from sqlalchemy.exc import InvalidRequestError

    from app.fastsql import _Compiled

    conn = SimpleNamespace(dialect=dialect())
    planned = 0
    for label, prepared in _every_prepared_statement():
        table = getattr(prepared.statement, "table", None)
        key_sets: list[list[str] | None] = [None]
        if prepared.values_from_params and table is not None:
            columns = [c.key for c in table.columns if c.key != "id"]
            key_sets = [columns, columns[: len(columns) // 2]]
        for keys in key_sets:
            compiled = _Compiled(prepared.statement, conn, column_keys=keys)
            if compiled.plan is None:
                continue
            planned += 1
            binds = {bind.key: bind for bind in compiled.compiled.bind_names}
            given = {key: _sample(bind.type, n) for n, (key, bind) in enumerate(binds.items())
                     if bind.required}
            assert compiled.parameters(given) == compiled._constructed(given), label
            everything = {**given, **{key: _sample(bind.type, n + 7)
                                      for n, (key, bind) in enumerate(binds.items())
                                      if not bind.required and bind.value is None}}
            assert compiled.parameters(everything) == compiled._constructed(everything), label
            for missing in [k for k, b in binds.items() if b.required][:2]:
                partial = {k: v for k, v in given.items() if k != missing}
                with pytest.raises(InvalidRequestError) as ours:
                    compiled.parameters(partial)
                with pytest.raises(InvalidRequestError) as theirs:
                    compiled._constructed(partial)
                assert str(ours.value) == str(theirs.value), label
    assert planned >= 15
