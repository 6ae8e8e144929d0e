"""Pooled MySQL connections: pinged when they sat idle, not on every checkout, and a
connection the server dropped costs no valid request its answer.

The counters are the server's own: `Com_admin_commands` of a connection counts the
COM_PING packets it received, and `CONNECTION_ID()` tells a fresh connection from a
reused one. Connections are dropped for real, with `KILL` from another connection.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from app.db import Database, is_retryable_db_error, make_engine
from app.fastsql import Prepared
from tests.sessions.helpers import ask, kill, pooled_connection_ids

pytestmark = pytest.mark.services

IDLE = 0.3  # the ping window of these tests' engines
READ_ONE = Prepared(sa.select(sa.literal_column("1")))
CONNECTION_ID = Prepared(sa.select(sa.func.connection_id()))
PINGS = Prepared(sa.select(sa.column("VARIABLE_VALUE")).select_from(
    sa.table("SESSION_STATUS", schema="information_schema")).where(
    sa.column("VARIABLE_NAME") == "COM_ADMIN_COMMANDS"))


@pytest.fixture
def engine(backend) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    engine = make_engine(backend.database_url, pool_size=1, max_overflow=0,
                         ping_if_idle_for=IDLE)
    yield engine
    engine.dispose()


def connection_and_pings(engine: Engine) -> tuple[int, int]:
    """(CONNECTION_ID(), pings that connection received) of the next pooled connection."""
    with engine.connect() as conn:
        conn_id = conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
        pings = conn.exec_driver_sql(
            "SHOW SESSION STATUS LIKE 'Com_admin_commands'").one()[1]
    return int(conn_id), int(pings)


def test_a_connection_back_in_the_pool_a_moment_ago_is_not_pinged(engine):
    first, pings = connection_and_pings(engine)
    again, pings_after = connection_and_pings(engine)
    assert again == first
    assert pings_after == pings  # no round trip spent on a connection just used


def test_a_connection_idle_for_the_window_is_pinged_once(engine):
    first, pings = connection_and_pings(engine)
    time.sleep(IDLE + 0.2)
    again, pings_after = connection_and_pings(engine)
    assert again == first
    assert pings_after == pings + 1


def test_a_dropped_idle_connection_is_replaced_before_anyone_uses_it(backend, engine):
    first, _ = connection_and_pings(engine)
    kill(backend, first)
    time.sleep(IDLE + 0.2)
    with engine.connect() as conn:  # no error reaches the caller
        assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
        assert conn.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one() != first


def test_inside_the_window_a_dropped_connection_fails_once_and_is_retryable(backend, engine):
    first, _ = connection_and_pings(engine)
    kill(backend, first)
    with engine.connect() as conn, pytest.raises(DBAPIError) as caught:
        conn.exec_driver_sql("SELECT 1")
    assert caught.value.connection_invalidated
    assert is_retryable_db_error(caught.value)
    fresh, _ = connection_and_pings(engine)  # the pool reconnected
    assert fresh != first


def test_a_slot_transaction_on_a_dropped_connection_retries_and_commits(backend, runtime,
                                                                         service, caplog):
    ask(service, "AUTO_BARGAIN", shop="warm")  # the pool now holds a used connection
    # frozen clock: however slow the machine, the connections stay inside the ping window
    with freeze_time(), caplog.at_level(logging.INFO, logger="app.sessions.runner"):
        ids = pooled_connection_ids(runtime)  # (given back to the pool on the frozen clock)
        assert ids
        for conn_id in ids:
            kill(backend, conn_id)
        out = ask(service, "AUTO_FOLLOW_UP", shop="after-kill")
    assert out.session.status == "ACTIVE"
    assert "(acc-1, after-kill) attempt 1 retried: OperationalError" in caplog.text
    with runtime.database.read() as db:
        stored = db.execute(sa.text(
            "SELECT COUNT(*) FROM sessions WHERE shop_id = 'after-kill'")).scalar_one()
    assert stored == 1


# ---- AUTOCOMMIT connections kept by the thread (`app.db.ThreadConnections`) -----------
@pytest.fixture
def database(backend) -> Iterator[Database]:  # type: ignore[no-untyped-def]
    database = Database(backend.database_url, ping_if_idle_for=IDLE)
    yield database
    database.dispose()


def kept_id_and_pings(database: Database) -> tuple[int, int]:
    """(CONNECTION_ID(), pings it received) of the calling thread's one-statement
    connection, read through the connection itself."""
    with database.connect() as conn:
        return int(CONNECTION_ID.scalar(conn, {})), int(PINGS.scalar(conn, {}))


def in_thread(work):  # type: ignore[no-untyped-def]
    """`work()` in a thread of its own, which then ends: its answer (or its error)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(work).result(30)


def test_a_thread_keeps_its_connection_without_a_pool_checkout(database):
    first, pings = kept_id_and_pings(database)
    pool = database.autocommit_engine.pool
    assert pool.checkedout() == 1  # kept by this thread, not back in the pool
    checkouts: list[object] = []
    sa.event.listen(database.autocommit_engine, "checkout", lambda *a: checkouts.append(a))
    again, pings_after = kept_id_and_pings(database)
    assert (again, pings_after) == (first, pings)  # the same one, no ping, no checkout
    assert checkouts == []
    other, _ = in_thread(lambda: kept_id_and_pings(database))
    assert other != first  # another thread has its own
    assert len(checkouts) == 1


def test_a_kept_connection_idle_for_the_window_is_pinged_and_replaced_when_dropped(
        backend, database):
    first, pings = kept_id_and_pings(database)
    time.sleep(IDLE + 0.2)
    again, pings_after = kept_id_and_pings(database)
    assert (again, pings_after) == (first, pings + 1)
    kill(backend, first)
    time.sleep(IDLE + 0.2)
    fresh, _ = kept_id_and_pings(database)  # no error reaches the caller
    assert fresh != first


def test_a_kept_connection_dropped_inside_the_window_fails_once_and_is_not_kept(
        backend, database):
    first, _ = kept_id_and_pings(database)
    kill(backend, first)
    with pytest.raises(DBAPIError) as caught, database.connect() as conn:
        READ_ONE.scalar(conn, {})
    assert caught.value.connection_invalidated and is_retryable_db_error(caught.value)
    fresh, _ = kept_id_and_pings(database)
    assert fresh != first


def test_a_connection_lost_in_one_thread_has_the_others_pinged_before_their_next_use(
        backend, database):
    """A restarted server drops every connection at once: the first thread to find its
    own lost makes the others ping theirs before using them (as the pool does)."""
    mine, pings = kept_id_and_pings(database)
    with ThreadPoolExecutor(1) as other_thread:
        other, _ = other_thread.submit(kept_id_and_pings, database).result(30)
        kill(backend, other)
        with pytest.raises(DBAPIError):  # that thread finds its own lost
            other_thread.submit(kept_id_and_pings, database).result(30)
    again, pings_after = kept_id_and_pings(database)  # well inside the idle window
    assert (again, pings_after) == (mine, pings + 1)


def test_at_most_the_limit_of_connections_are_kept_and_ended_threads_give_theirs_back(
        database):
    limit = database.thread_connections.limit
    pool = database.autocommit_engine.pool
    release = threading.Event()
    ready = threading.Barrier(limit + 3)

    def use() -> None:
        kept_id_and_pings(database)
        ready.wait(30)
        release.wait(30)

    threads = [threading.Thread(target=use) for _ in range(limit + 2)]
    for thread in threads:
        thread.start()
    ready.wait(30)
    assert pool.checkedout() == limit  # the others went back to the pool
    release.set()
    for thread in threads:
        thread.join(30)
    # their threads ended: the next thread to find the limit reached gives them back
    kept_id_and_pings(database)
    assert pool.checkedout() == 1


def test_a_connection_used_through_core_or_inside_another_use_is_not_kept(database):
    with database.connect() as outer, database.connect() as inner:
        assert outer is not inner
        inner.exec_driver_sql("SELECT 1")  # a Core connection made over it
    assert database.autocommit_engine.pool.checkedout() == 1  # the outer one, kept
    with database.connect() as conn:
        assert conn is outer


def test_dispose_gives_the_kept_connections_back(database):
    kept_id_and_pings(database)
    in_thread(lambda: kept_id_and_pings(database))
    assert database.autocommit_engine.pool.checkedout() == 2
    database.thread_connections.close_all()
    assert database.autocommit_engine.pool.checkedout() == 0


def test_a_forked_child_does_not_use_its_parents_connection(database):
    """As gunicorn's and Celery's forked workers would, were a connection kept before."""
    mine, _ = kept_id_and_pings(database)
    reader, writer = os.pipe()
    with warnings.catch_warnings():  # pytest's own threads: this child uses none of them
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its own connection, the parent's left alone
        try:
            child, _ = kept_id_and_pings(database)
            os.write(writer, str(child).encode())
        finally:
            os._exit(0)
    os.close(writer)
    answered: list[int] = []
    try:
        answered, _, _ = select.select([reader], [], [], 30)
        child_id = int(os.read(reader, 64) or b"0") if answered else 0
    finally:
        if not answered:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(reader)
    assert child_id not in (0, mine)
    assert kept_id_and_pings(database)[0] == mine  # still working, still the same
