"""Pooled MySQL connections: pinged when they sat idle, not on every checkout, and a
connection the server dropped costs no valid request its answer.

The counters are the server's own: `Com_admin_commands` of a connection counts the
COM_PING packets it received, and `CONNECTION_ID()` tells a fresh connection from a
reused one. Connections are dropped for real, with `KILL` from another connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from freezegun import freeze_time
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from app.db import is_retryable_db_error, make_engine
from tests.sessions.helpers import ask, kill, pooled_connection_ids

pytestmark = pytest.mark.services

IDLE = 0.3  # the ping window of these tests' engines


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
