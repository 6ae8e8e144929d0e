"""Small builders shared by the core tests."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import select

from app.audit.models import Operation
from app.events.models import Event
from app.runtime import Runtime
from app.sessions.schemas import CreateOutcome, SessionRequest
from app.sessions.service import SessionService


def ask(
    service: SessionService,
    session_type: str,
    *,
    account: str = "acc-1",
    shop: str = "shop-1",
    actor: str = "test",
    **fields: Any,
) -> CreateOutcome:
    request = SessionRequest.model_validate(
        {"account_id": account, "shop_id": shop, "session_type": session_type, **fields}
    )
    return service.create(request, actor=actor)


def audit_rows(runtime: Runtime, session_id: str) -> list[Operation]:
    with runtime.database.read() as db:
        return list(
            db.execute(
                select(Operation).where(Operation.session_id == session_id).order_by(Operation.id)
            ).scalars()
        )


def events_for(runtime: Runtime, session_id: str) -> list[str]:
    with runtime.database.read() as db:
        return list(
            db.execute(
                select(Event.type).where(Event.session_id == session_id).order_by(Event.id)
            ).scalars()
        )


def status_of(service: SessionService, session_id: str) -> str:
    return str(service.get(session_id).status)


def kill(backend, conn_id: int) -> None:  # type: ignore[no-untyped-def]
    """Drop a MariaDB connection from the server side (`KILL`), as a restart would."""
    other = sa.create_engine(backend.server_url)
    with other.connect() as conn:
        conn.exec_driver_sql(f"KILL {int(conn_id)}")
    other.dispose()


def pooled_connection_ids(runtime) -> list[int]:  # type: ignore[no-untyped-def]
    """The server-side ids of the connections the runtime's pools hold now (the
    transactional pool and the AUTOCOMMIT one of the one-statement paths) and of the
    AUTOCOMMIT ones kept by threads (`app.db.ThreadConnections`)."""
    engines = {id(e): e for e in (runtime.database.engine, runtime.database.autocommit_engine)}
    ids = []
    for engine in engines.values():
        pool = engine.pool
        held = [pool.connect() for _ in range(pool.checkedin())]
        for fairy in held:
            cursor = fairy.cursor()
            cursor.execute("SELECT CONNECTION_ID()")
            ids.append(int(cursor.fetchone()[0]))
            cursor.close()
        for fairy in held:
            fairy.close()
    kept = runtime.database.thread_connections
    for driver in kept.idle() if kept is not None else []:  # kept by their threads
        cursor = driver.connection.dbapi_connection.cursor()
        cursor.execute("SELECT CONNECTION_ID()")
        ids.append(int(cursor.fetchone()[0]))
        cursor.close()
    return ids


def innodb_deadlocks(runtime: Runtime) -> int:
    """How many deadlocks the MySQL server has detected since it started (MariaDB's
    `Innodb_deadlocks`; MySQL 8's `lock_deadlocks` metric)."""
    with runtime.database.engine.connect() as conn:
        row = conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'").first()
        if row is None:
            row = conn.exec_driver_sql(
                "SELECT name, count FROM information_schema.INNODB_METRICS "
                "WHERE name = 'lock_deadlocks'").first()
    assert row is not None, "the server counts no deadlocks"
    return int(row[1])
