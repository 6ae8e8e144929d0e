"""The two leaner transactions of the hot paths, held to what Core and the ORM do.

- `Database.transaction()` and `Database.connect()` on MySQL are a `DriverConnection`
  (the pooled driver connection without a Core `Connection`). The transaction commits
  what its block did, rolls back when the block raises, hands the connection back
  clean, falls back to a Core connection over the same transaction for anything
  `Prepared` does not run, and a connection lost before the commit is the retryable
  error Core raises. `connect()`'s statements are each their own transaction.
- A `core_first` unit of work (every slot transaction) makes its ORM session only when
  asked, on its own connection and transaction; an object it adopted and changed is
  flushed at commit even when nothing else made the session.
"""

from __future__ import annotations

import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import DBAPIError

from app.db import DriverConnection, is_unavailable_db_error
from app.fastsql import Prepared
from app.sessions.models import SESSIONS, Session
from tests.sessions.helpers import ask, kill

pytestmark = pytest.mark.services

_REASON = Prepared(update(SESSIONS).where(SESSIONS.c.session_id == bindparam("sid"))
                   .values(reason=bindparam("reason")))
_READ_REASON = Prepared(select(SESSIONS.c.reason).where(
    SESSIONS.c.session_id == bindparam("sid")))


def reason_of(runtime, session_id: str) -> str | None:  # type: ignore[no-untyped-def]
    with runtime.database.connect() as conn:
        return _READ_REASON.scalar(conn, {"sid": session_id})  # type: ignore[no-any-return]


def open_transaction(raw) -> int:  # type: ignore[no-untyped-def]
    """`@@in_transaction` of a driver connection (back in the pool, asked directly)."""
    cursor = raw.cursor()
    try:
        cursor.execute("SELECT @@in_transaction")
        return int(cursor.fetchone()[0])
    finally:
        cursor.close()


@pytest.fixture
def session_id(service) -> str:  # type: ignore[no-untyped-def]
    return ask(service, "AUTO_BARGAIN", shop="lean-shop").session.session_id


def test_a_driver_transaction_commits_its_block(runtime, session_id):
    with runtime.database.transaction() as conn:
        assert isinstance(conn, DriverConnection)
        assert _REASON.execute(conn, {"sid": session_id, "reason": "kept"}) == 1
        raw = conn.connection.dbapi_connection
        assert open_transaction(raw) == 1
    assert reason_of(runtime, session_id) == "kept"
    assert open_transaction(raw) == 0


def test_a_driver_transaction_that_raises_keeps_nothing(runtime, session_id):
    with pytest.raises(RuntimeError), runtime.database.transaction() as conn:
        _REASON.execute(conn, {"sid": session_id, "reason": "dropped"})
        raw = conn.connection.dbapi_connection
        raise RuntimeError("the work failed")
    assert open_transaction(raw) == 0  # rolled back on its way to the pool
    assert reason_of(runtime, session_id) is None


def test_core_statements_in_a_driver_transaction_share_it(runtime, session_id):
    """`execute` (not a `Prepared` statement) runs on a Core connection over the same
    driver connection: one transaction, committed or rolled back as one."""
    with pytest.raises(RuntimeError), runtime.database.transaction() as conn:
        _REASON.execute(conn, {"sid": session_id, "reason": "first"})
        conn.execute(update(Session).where(Session.session_id == session_id)
                     .values(end_reason="second"))
        seen = conn.execute(select(SESSIONS.c.reason).where(
            SESSIONS.c.session_id == session_id)).scalar_one()
        assert seen == "first"
        raise RuntimeError("undo both")
    with runtime.database.read() as db:
        row = db.execute(select(Session.reason, Session.end_reason)
                         .where(Session.session_id == session_id)).one()
    assert tuple(row) == (None, None)

    with runtime.database.transaction() as conn:
        _REASON.execute(conn, {"sid": session_id, "reason": "first"})
        conn.execute(update(Session).where(Session.session_id == session_id)
                     .values(end_reason="second"))
        raw = conn.connection.dbapi_connection
    with runtime.database.read() as db:
        row = db.execute(select(Session.reason, Session.end_reason)
                         .where(Session.session_id == session_id)).one()
    assert tuple(row) == ("first", "second")
    assert open_transaction(raw) == 0


def test_a_connection_lost_before_the_commit_is_a_retryable_unavailable_error(
        runtime, backend, session_id):
    with pytest.raises(DBAPIError) as raised, runtime.database.transaction() as conn:
        _REASON.execute(conn, {"sid": session_id, "reason": "lost"})
        cursor = conn.connection.dbapi_connection.cursor()
        cursor.execute("SELECT CONNECTION_ID()")
        kill(backend, int(cursor.fetchone()[0]))
        cursor.close()
    assert raised.value.connection_invalidated
    assert is_unavailable_db_error(raised.value)
    assert reason_of(runtime, session_id) is None  # the server rolled it back
    with runtime.database.transaction() as conn:  # the pool works on
        assert _REASON.execute(conn, {"sid": session_id, "reason": "again"}) == 1
    assert reason_of(runtime, session_id) == "again"


def test_each_statement_of_a_driver_connection_commits_itself(runtime, session_id):
    with runtime.database.connect() as conn:
        assert isinstance(conn, DriverConnection)
        _REASON.execute(conn, {"sid": session_id, "reason": "at once"})
        assert reason_of(runtime, session_id) == "at once"  # seen before the block ends
        raw = conn.connection.dbapi_connection
        assert open_transaction(raw) == 0
        core = conn.execute(select(SESSIONS.c.reason).where(
            SESSIONS.c.session_id == session_id)).scalar_one()
        assert core == "at once"


def test_a_slot_transaction_that_loads_nothing_makes_no_orm_session(runtime):
    with runtime.database.unit_of_work(core_first=True) as uow:
        uow.connection.exec_driver_sql("SELECT 1")
        uow.commit()
        assert uow._session is None  # noqa: SLF001 - what this test is about


def test_an_adopted_object_changed_later_is_flushed_at_commit(runtime, service):
    """The create path inserts a session with Core and adopts the object; a change made
    to it afterwards, with no ORM session made yet, still reaches the database."""
    created = ask(service, "AUTO_BARGAIN", shop="adopt-shop").session
    with runtime.database.read() as db:
        loaded = db.execute(select(Session).where(
            Session.session_id == created.session_id)).scalar_one()
    with runtime.database.unit_of_work(core_first=True) as uow:
        uow.connection.exec_driver_sql("SELECT 1")
        uow.adopt(loaded)
        loaded.reason = "changed after adoption"
        uow.commit()
    assert reason_of(runtime, created.session_id) == "changed after adoption"


def test_a_core_first_unit_of_work_rolls_back_orm_and_core_work_together(runtime, service):
    created = ask(service, "AUTO_BARGAIN", shop="both-shop").session
    with runtime.database.unit_of_work(core_first=True) as uow:
        _REASON.execute(uow.connection, {"sid": created.session_id, "reason": "core"})
        loaded = uow.session.execute(select(Session).where(
            Session.session_id == created.session_id)).scalar_one()
        assert loaded.reason == "core"  # the ORM session is on the same transaction
        loaded.end_reason = "orm"
        uow.session.flush()
    assert reason_of(runtime, created.session_id) is None  # never committed
    with runtime.database.unit_of_work(core_first=True) as uow:
        _REASON.execute(uow.connection, {"sid": created.session_id, "reason": "core"})
        loaded = uow.session.execute(select(Session).where(
            Session.session_id == created.session_id)).scalar_one()
        loaded.end_reason = "orm"
        uow.commit()
    with runtime.database.read() as db:
        row = db.execute(select(Session.reason, Session.end_reason)
                         .where(Session.session_id == created.session_id)).one()
    assert tuple(row) == ("core", "orm")


@pytest.mark.parametrize("kind", ["transaction", "connect"])
def test_a_refused_database_is_the_error_core_raises(backend, kind):
    """Nothing listens where the database should be: the hot paths' driver connection
    raises what `Engine.connect` raises (the API's retryable 503), not the driver's own
    exception."""
    import socket

    from sqlalchemy.engine import make_url

    from app.db import Database

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = make_url(backend.database_url).set(host="127.0.0.1", port=port)
    database = Database(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(DBAPIError) as raised, getattr(database, kind)():
            pass
        with pytest.raises(DBAPIError) as through_core:
            database.engine.connect()
        assert type(raised.value) is type(through_core.value)
        assert is_unavailable_db_error(raised.value)
    finally:
        database.dispose()
