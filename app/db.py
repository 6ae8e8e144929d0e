"""Database plumbing: the engine, the declarative base, UTC times and the unit of work.

The unit of work is the one owner of a transaction: it rolls back unless told
to commit, and runs its after-commit callbacks (the kicks that start webhook
delivery, transfer detection: `app.bootstrap` wires them to the task layer) only
once the commit succeeded and the unit of work has ended.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    ColumnElement,
    DateTime,
    Integer,
    MetaData,
    String,
    create_engine,
    event,
    inspect,
    literal_column,
    or_,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Connection, CursorResult, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# An auto-increment id that is BIGINT on MySQL and INTEGER (rowid) on SQLite.
BigId = BigInteger().with_variant(Integer, "sqlite")
# JSON that is a real JSON column on MySQL 8 and text on MariaDB/SQLite.
JsonDoc = JSON().with_variant(mysql.JSON(), "mysql")


def IdStr(length: int) -> Any:
    """An identifier column: compared byte for byte on MySQL (utf8mb4_bin), so that
    "ABC" and "abc" are two ids and no collation folds them into one."""
    return String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql")


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC (MySQL DATETIME(6) has no zone) and hands back aware UTC."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime())

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given where UTC is required")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class _Lookup(dict[Any, Any]):
    """A conversion table whose `__getitem__` (C, no Python frame on a hit) is the
    processor: a value it does not know passes through unchanged."""

    def __missing__(self, key: Any) -> Any:
        return key


class EnumText[E: StrEnum](TypeDecorator[E]):
    """A `StrEnum` column stored as its text in a VARCHAR (the column type the
    migrations create: no schema change). Binds send the member's plain `.value`; rows
    come back as the member (`SessionStatus.ACTIVE`, not "ACTIVE"), through Core, the
    ORM and `app.fastsql` alike, so callers need not wrap them again. Each processor is
    one dict lookup; a stored text outside the enum comes back as it is."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum
        self._to_db = _Lookup({member: member.value for member in enum})
        self._to_db[None] = None
        self._from_db = _Lookup({member.value: member for member in enum})
        self._from_db[None] = None

    def bind_processor(self, dialect: Any) -> Any:
        to_db = self._to_db.__getitem__
        impl = self.impl_instance.bind_processor(dialect)
        if impl is None:
            return to_db
        return lambda value: impl(to_db(value))

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        from_db = self._from_db.__getitem__
        impl = self.impl_instance.result_processor(dialect, coltype)
        if impl is None:
            return from_db
        return lambda value: from_db(impl(value))

    def member(self, value: Any) -> Any:
        """`value` (a member or its text) as the member; other values as they are."""
        return self._from_db[value]

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        return self._to_db[value]

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return self._from_db[value]


def enum_member(table: Any, key: str, value: Any) -> Any:
    """An `EnumText` column's value as its member, for the models' `@validates` hooks: an
    attribute set from a text ("PENDING") reads back as a loaded row's does."""
    return table.c[key].type.member(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# A pooled MySQL connection used this recently is handed out without a ping.
PING_IF_IDLE_FOR = 1.0
# How long a statement waits for another transaction's row lock before it fails with a
# retryable error (MySQL's default is 50 s). Slot rows and session rows are locked for
# one slot transaction (milliseconds); a wait this long means a holder is stuck, and a
# prompt 503 with Retry-After serves the caller better than a request hanging on it.
ROW_LOCK_WAIT_SECONDS = 5


def make_engine(
    url: str, *, ping_if_idle_for: float = PING_IF_IDLE_FOR, autocommit: bool = False,
    **kwargs: Any,
) -> Engine:
    """An engine tuned for the backend: WAL + IMMEDIATE transactions on SQLite,
    READ COMMITTED on MySQL, whose connections are pinged on checkout when they sat
    idle in the pool for `ping_if_idle_for` seconds or more (`_ping_when_idle`)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let SQLAlchemy's "begin" event emit BEGIN
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            # IMMEDIATE takes the write lock up front, so two writers queue
            # instead of failing with "database is locked" on upgrade.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "mysql":
        query = dict(parsed.query)
        query.setdefault("charset", "utf8mb4")
        parsed = parsed.set(query=query)
        connect_args = kwargs.pop("connect_args", {})
        connect_args.setdefault(
            "init_command", f"SET SESSION innodb_lock_wait_timeout = {ROW_LOCK_WAIT_SECONDS}")
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        engine = create_engine(
            parsed,
            isolation_level="AUTOCOMMIT" if autocommit else "READ COMMITTED",
            pool_recycle=1800,
            pool_reset_on_return=None,  # `_reset_unless_ended` below does it, when needed
            connect_args=connect_args,
            **kwargs,
        )
        if engine.dialect.driver == "pymysql":
            _connect_with_cached_descriptors(engine, several_statements=autocommit)
        if autocommit:
            _no_transaction_round_trips(engine)
            _read_committed(engine)
        else:
            _reset_unless_ended(engine)
        _ping_when_idle(engine, ping_if_idle_for)
        return engine
    return create_engine(url, **kwargs)


def _connect_with_cached_descriptors(engine: Engine, *, several_statements: bool) -> None:
    """Open PyMySQL connections as `app.dbdriver.CachingConnection` (a statement's column
    descriptors parsed once, not on every execution).

    `several_statements` (the AUTOCOMMIT pool of the hot paths): the connection also asks
    for MULTI_STATEMENTS, so that a heartbeat sends its UPDATE and the read of its answer
    in one query (`app.fastsql.Prepared.execute_then_one`). Every statement the app sends
    is compiled by SQLAlchemy with its values escaped by the driver; the capability is
    not asked for on the pool of the slot transactions."""
    from pymysql.constants import CLIENT

    from app.dbdriver import CachingConnection

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        if several_statements:
            cparams = {**cparams,
                       "client_flag": cparams.get("client_flag", 0) | CLIENT.MULTI_STATEMENTS}
        return CachingConnection(*cargs, **cparams)


def _reset_unless_ended(engine: Engine) -> None:
    """Roll a connection back on its way to the pool unless its last transaction already
    ended. SQLAlchemy's own reset sends a ROLLBACK after every COMMIT; on the hot path
    (one slot transaction per request) that is one round trip in eight for nothing.

    A transaction begins with the first statement on a connection (`begin`) and ends
    with `commit` or `rollback`; we remember which on the pooled connection, and the
    reset rolls back whenever it cannot be sure (never used, or still open)."""

    @event.listens_for(engine, "begin")
    def _began(conn: Any) -> None:
        conn.connection.info["transaction_open"] = True

    @event.listens_for(engine, "commit")
    @event.listens_for(engine, "rollback")
    def _ended(conn: Any) -> None:
        if conn.invalidated:  # the connection broke: there is nothing left to mark
            return
        conn.connection.info["transaction_open"] = False

    @event.listens_for(engine, "reset")
    def _reset(dbapi_conn: Any, record: Any, state: Any) -> None:
        if state.terminate_only or state.transaction_was_reset:
            return
        if record.info.get("transaction_open", True):
            dbapi_conn.rollback()


def _no_transaction_round_trips(engine: Engine) -> None:
    """An AUTOCOMMIT engine: every statement is its own transaction on the server, so
    the COMMIT and ROLLBACK that SQLAlchemy's connection sends on its way out (it does,
    even in autocommit mode: one round trip in two for a one-statement read) have
    nothing to end. They are skipped for this engine's dialect only."""
    dialect = engine.dialect
    dialect.do_rollback = lambda dbapi_connection: None  # type: ignore[method-assign]
    dialect.do_commit = lambda dbapi_connection: None  # type: ignore[method-assign]


def _read_committed(engine: Engine) -> None:
    """The AUTOCOMMIT pool's connections at READ COMMITTED, like every other connection
    of the app (SQLAlchemy sets no isolation level with AUTOCOMMIT: the server's default
    stood, REPEATABLE READ). A transaction one of them opens itself (`START TRANSACTION`:
    a live message in one query, `app.messages.service`) then takes the locks the rest of
    the app expects. At REPEATABLE READ its `INSERT … SELECT` held a next-key lock on the
    session's `session_id` index entry and the gap before it: a slot transaction inserting
    a new session into that gap (a preemption) deadlocked with the bot's messages, and
    lost all its attempts to a steady stream of them (a 503 for the takeover)."""

    @event.listens_for(engine, "connect")
    def _set(dbapi_conn: Any, _record: Any) -> None:
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")


def _ping_when_idle(engine: Engine, idle_for: float) -> None:
    """Pessimistic disconnect handling, without a round trip per checkout when busy.

    SQLAlchemy's `pool_pre_ping` pings on every checkout: on the hot path (one slot
    transaction per request) that is one round trip in nine. A connection given back
    to the pool less than `idle_for` seconds ago was working then, so it is handed out
    as is (HikariCP's "alive bypass window"); an older one is pinged, and a dead one is
    replaced by a fresh connection before anyone uses it (a `DisconnectionError` from
    `checkout` makes the pool reconnect). A server that goes away inside the window is
    caught the optimistic way: the failing statement invalidates the pool, and slot
    transactions retry on a fresh connection (`is_retryable_db_error`)."""

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _mark(dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["alive_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _check(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        alive_at = record.info.get("alive_at")
        if alive_at is not None and time.monotonic() - alive_at < idle_for:
            return
        try:
            engine.dialect.do_ping(dbapi_conn)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"pooled connection is gone: {exc}") from exc


# MySQL/MariaDB client and server codes that mean "the server cannot be reached or is
# going away", whatever the request: can't connect (2002/2003/2005), gone away or lost
# (2006/2013/2055), too many connections (1040), shutting down (1053, 1077, 1079),
# read-only failover (1290), wsrep not ready (1047), killed connection (1927, 4031).
UNAVAILABLE_CODES = frozenset(
    {1040, 1047, 1053, 1077, 1079, 1290, 1927, 2002, 2003, 2005, 2006, 2013, 2055, 4031}
)


def is_unavailable_db_error(exc: BaseException) -> bool:
    """The database could not be reached (a refused new connection, a dropped one, an
    exhausted pool, a server shutting down): the client should retry, it did nothing
    wrong. Retrying the same statement at once in the same request rarely helps."""
    if isinstance(exc, SATimeoutError):  # the pool had no connection to give in time
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "args", [None])[0] if orig is not None else None
    if isinstance(exc, OperationalError | InterfaceError) and code in UNAVAILABLE_CODES:
        return True
    # PyMySQL's InterfaceError(0, '') is a socket already closed under the connection.
    if isinstance(exc, InterfaceError):
        return True
    return isinstance(exc, OperationalError) and (
        "database is locked" in str(exc) or "unable to open database" in str(exc))


def is_retryable_db_error(exc: BaseException) -> bool:
    """Deadlocks, lock wait timeouts and SQLite busy errors: safe to retry the whole unit."""
    if isinstance(exc, OperationalError):
        orig = getattr(exc, "orig", None)
        code = getattr(orig, "args", [None])[0]
        if code in (1205, 1213):  # lock wait timeout, deadlock
            return True
        if "database is locked" in str(exc):
            return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def run_after_commit(callback: Callable[[], None]) -> None:
    """Run one after-commit callback. The change is durable already: a failing callback
    is logged, not raised (a lost kick is recovered by the sweeps and the beat's runs)."""
    try:
        callback()
    except Exception:
        log.exception("after-commit callback failed")


class UnitOfWork:
    """One transaction. Use as a context manager; nothing is kept unless `commit()` is called.

    `under` (e.g. the slot lock) is entered before the transaction starts and left after
    it ends. The after-commit callbacks run last, once the unit of work has ended: after
    the session is closed and `under` is released, so a kick never lengthens either.

    `core_first` (slot transactions): the transaction is a connection's (`connection`:
    on MySQL the pooled driver connection itself, a `DriverConnection`; elsewhere a Core
    one), and the ORM session (`session`) is made only when something asks for it, bound
    to that connection and its transaction (on MySQL through a Core connection made over
    the same driver connection). A slot transaction that loads no
    object — a create on a free slot: Core reads and inserts only — never pays for the
    ORM's session, its connection hand-over, its flush and commit bookkeeping (~180 µs
    of a one-statement transaction, measured). Objects given to `adopt` join the session
    when it is made; `commit` makes it when an adopted object was changed meanwhile, so a
    change is never left unflushed."""

    def __init__(self, session_factory: sessionmaker[Session],
                 under: AbstractContextManager[object] | None = None, *,
                 core_first: bool = False) -> None:
        self._factory = session_factory
        self._under = under
        self._core_first = core_first
        self._pending: list[Callable[[], None]] = []
        self._committed: list[Callable[[], None]] = []
        self._session: Session | None = None
        self._connection: Connection | None = None
        self._adopted: list[Any] = []

    @property
    def session(self) -> Session:
        """The ORM session of this transaction (made on first use in `core_first` mode)."""
        if self._session is None:
            connection = self.connection
            if isinstance(connection, DriverConnection):  # a Core one over the same
                connection = connection.as_core()          # driver connection
            self._session = self._factory(bind=connection,
                                          join_transaction_mode="control_fully")
            for obj in self._adopted:
                self._session.add(obj)
            self._adopted = []
        return self._session

    @property
    def connection(self) -> Connection:
        """The transaction's Core connection (on the ORM session's own in the default mode)."""
        if self._connection is None:
            if not self._core_first:
                return self.session.connection()
            bind = self._factory.kw["bind"]
            if bind.dialect.name == "mysql":
                # The pooled driver connection itself (`DriverConnection`): the slot
                # transaction's Prepared statements need nothing more; a Core
                # connection is made over it only if something asks for one.
                self._connection = cast(Connection, DriverConnection(bind, transaction=True))
                return self._connection
            self._connection = bind.connect()
            try:
                self._connection.begin()
            except BaseException:
                self._connection.close()
                self._connection = None
                raise
        return self._connection

    def adopt(self, obj: Any) -> None:
        """`obj` (a persistent object, detached: a row this transaction wrote) joins the
        ORM session — now, or when the session is made."""
        if self._session is not None or not self._core_first:
            self.session.add(obj)
        else:
            self._adopted.append(obj)

    def __enter__(self) -> UnitOfWork:
        self._pending, self._committed = [], []
        self._session, self._connection, self._adopted = None, None, []
        if not self._core_first:
            self._session = self._factory()  # no connection until the first statement
        if self._under is not None:
            try:
                self._under.__enter__()
            except BaseException:
                if self._session is not None:
                    self._session.close()
                raise
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool | None:
        try:
            if self._under is None:
                self._end()
                return None
            try:  # the session ends first, then `under` is left (as nested `with`s would)
                self._end()
            except BaseException as error:
                if not self._under.__exit__(type(error), error, error.__traceback__):
                    raise
                return True
            return self._under.__exit__(exc_type, exc, tb)
        finally:
            callbacks, self._committed, self._pending = self._committed, [], []
            for callback in callbacks:
                run_after_commit(callback)

    def _end(self) -> None:
        session, connection = self._session, self._connection
        self._adopted = []
        try:
            if session is not None:
                try:
                    session.rollback()
                finally:
                    session.close()
        finally:
            if connection is not None:
                connection.close()  # rolls back what is still open, back to the pool

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Run `callback` once this transaction has committed and the unit of work has
        ended (never if it rolls back); a failure is logged, not raised."""
        self._pending.append(callback)

    def commit(self) -> None:
        if self._session is None and any(inspect(obj).modified for obj in self._adopted):
            self.session  # noqa: B018 - made now: it flushes the adopted objects' changes
        if self._session is not None:
            self._session.commit()
        elif self._connection is not None:
            self._connection.commit()
        self._committed.extend(self._pending)
        self._pending = []


class DriverConnection:
    """A pooled driver connection without a Core `Connection` around it: what the hot
    paths run on (a read, a heartbeat, a live message). Their statements are
    `app.fastsql.Prepared`, which use only the driver connection, the dialect and
    `invalidate`; the Core connection's checkout, begin, commit and close bookkeeping
    (~50 µs of a request's client CPU, measured) is left out. Anything else asked of it
    (`execute`, …) is answered by a Core `Connection` made then over the same driver
    connection, which from then on also ends the transaction.

    `transaction=True`: one transaction, committed by `commit()`, rolled back on its way
    back to the pool otherwise (`_reset_unless_ended`); else an AUTOCOMMIT engine's
    connection, each statement its own transaction. The pool's events run as for a Core
    connection (the checkout's ping when idle); a driver error when connecting or at
    commit is raised as Core raises it (`DBAPIError.instance`: a refused database is the
    same retryable 503), the connection invalidated first when it was lost."""

    _core: Connection | None = None  # class defaults: `__getattr__` never recurses
    _lost = False
    # kept by a thread between two uses (`ThreadConnections`)
    kept_by: int | None = None
    used_at = 0.0
    kept_lost_at = 0

    def __init__(self, engine: Engine, *, transaction: bool) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        dbapi = self.dialect.loaded_dbapi
        try:
            self.connection = engine.raw_connection()
        except dbapi.Error as exc:  # a refused connection: as `Engine.connect` raises it
            raise DBAPIError.instance(
                None, None, exc, dbapi.Error,
                connection_invalidated=self.dialect.is_disconnect(exc, None, None),
                dialect=self.dialect) from exc
        if transaction:
            self.connection.info["transaction_open"] = True  # until it commits

    def as_core(self) -> Connection:
        """A Core `Connection` over this driver connection (made once; from then on it
        also ends the transaction)."""
        if self._core is None:
            self._core = Connection(self.engine, connection=self.connection)
        return self._core

    def __getattr__(self, name: str) -> Any:
        return getattr(self.as_core(), name)

    @property
    def has_core(self) -> bool:
        """A Core `Connection` was made over this one (`as_core`)."""
        return self._core is not None

    def ping(self) -> bool:
        """True when the server answers a ping; else the connection is invalidated."""
        dbapi_connection = self.connection.dbapi_connection
        if dbapi_connection is None:  # invalidated already
            return False
        try:
            self.dialect.do_ping(dbapi_connection)
        except self.dialect.loaded_dbapi.Error as exc:
            self.invalidate(exc)
            return False
        return True

    @property
    def invalidated(self) -> bool:
        return self._core.invalidated if self._core is not None else self._lost

    def invalidate(self, exception: BaseException | None = None) -> None:
        if self._core is not None:
            self._core.invalidate(exception)
            return
        self._lost = True
        self.connection.invalidate(exception)

    def commit(self) -> None:
        if self._core is not None:
            self._core.commit()
            return
        dbapi = self.dialect.loaded_dbapi
        try:
            self.connection.dbapi_connection.commit()  # type: ignore[union-attr]
        except dbapi.Error as exc:
            lost = self.dialect.is_disconnect(exc, self.connection.dbapi_connection, None)
            if lost:
                self.invalidate(exc)
            raise DBAPIError.instance(None, None, exc, dbapi.Error,
                                      connection_invalidated=lost,
                                      dialect=self.dialect) from exc
        self.connection.info["transaction_open"] = False

    def close(self) -> None:
        """Back to the pool (a transaction not committed is rolled back there)."""
        if self._core is not None:
            self._core.close()
        elif not self._lost:
            self.connection.close()


# How many AUTOCOMMIT connections of one engine threads keep between two uses
# (`ThreadConnections`): half the pool, so that other threads still find pooled ones.
KEPT_CONNECTIONS = 5


class ThreadConnections:
    """AUTOCOMMIT driver connections kept by the threads that use them (the hot paths:
    a read, a heartbeat, a live message), instead of a pool checkout and checkin a
    request (~25 µs of a request's CPU under load, measured: the pool's queue, its
    records and events) — as redis-py's connection is kept for the slot lock's commands
    (`app.coordination.slot_locks.ThreadCommands`).

    A connection goes back to the thread that gave it (`take` / `give_back`), at most
    `limit` of them kept per process; others go back to the pool as before. What the
    pool does for a connection on checkout is done here too: one that sat unused for
    `idle_for` seconds or more is pinged first (`_ping_when_idle`), and replaced when
    that fails; after any connection of the engine was found lost, every kept one is
    pinged before its next use. A connection whose statement failed with a lost
    connection (invalidated), or over which a Core `Connection` was made, is not kept.
    The kept ones are held in a dict by thread id (taking one is an atomic `pop`, so
    `close_all` from another thread never hands out one in use); a forked child does not
    touch its parent's; a thread that ended leaves its connection until a thread that
    finds the limit reached puts it back in the pool."""

    def __init__(self, engine: Engine, *, limit: int, idle_for: float) -> None:
        self.engine = engine
        self.limit = limit
        self.idle_for = idle_for
        self._idle: dict[int, DriverConnection] = {}
        self._kept: set[int] = set()  # ids of the threads that keep one (idle or in use)
        self._guard = threading.Lock()
        self._pid = os.getpid()
        self._inherited: list[dict[int, DriverConnection]] = []
        self._lost_at = 0  # bumped whenever a connection of the engine is invalidated

        @event.listens_for(engine, "invalidate")
        def _lost(*_args: Any) -> None:
            self._lost_at += 1

    def take(self) -> DriverConnection:
        """The calling thread's kept connection (pinged first when idle for long), or
        one from the pool."""
        if self._pid != os.getpid():
            self._forked()
        conn = self._idle.pop(threading.get_ident(), None)
        if conn is not None:
            if (conn.kept_lost_at == self._lost_at
                    and time.monotonic() - conn.used_at < self.idle_for) or conn.ping():
                return conn
            self._drop(conn)
        return DriverConnection(self.engine, transaction=False)

    def give_back(self, conn: DriverConnection) -> None:
        """Keep `conn` for the calling thread, or give it back to the pool."""
        ident = threading.get_ident()
        if conn.invalidated or conn.has_core:
            self._drop(conn)
            return
        if ident in self._idle or not self._room(ident):
            # a use inside another (the thread keeps the other one), or no room left
            conn.close()
            return
        conn.used_at = time.monotonic()
        conn.kept_lost_at = self._lost_at
        conn.kept_by = ident
        self._idle[ident] = conn

    def _room(self, ident: int) -> bool:
        if ident in self._kept:
            return True
        with self._guard:
            if len(self._kept) >= self.limit:
                self._release_ended_threads()
            if len(self._kept) >= self.limit:
                return False
            self._kept.add(ident)
            return True

    def _release_ended_threads(self) -> None:
        living = {thread.ident for thread in threading.enumerate()}
        for ident in list(self._kept):
            if ident not in living:
                self._kept.discard(ident)
                conn = self._idle.pop(ident, None)
                if conn is not None:
                    conn.close()

    def _drop(self, conn: DriverConnection) -> None:
        if conn.kept_by is not None:
            with self._guard:
                self._kept.discard(conn.kept_by)
            conn.kept_by = None
        conn.close()

    def _forked(self) -> None:
        """In a forked child: the parent's connections are its own (their sockets are
        shared); they are never used, closed or collected here."""
        self._inherited.append(self._idle)
        self._idle, self._kept = {}, set()
        self._guard = threading.Lock()
        self._pid = os.getpid()

    def idle(self) -> list[DriverConnection]:
        """The kept connections not in use now (for diagnostics and tests)."""
        return list(self._idle.values()) if self._pid == os.getpid() else []

    def close_all(self) -> None:
        """Back to the pool, every kept connection not in use now."""
        if self._pid != os.getpid():
            self._forked()
            return
        for ident in list(self._idle):
            conn = self._idle.pop(ident, None)
            if conn is not None:
                self._drop(conn)


class _KeptConnection:
    """`with database.connect() as conn`: the thread's kept connection (MySQL)."""

    __slots__ = ("_connections", "_conn")

    def __init__(self, connections: ThreadConnections) -> None:
        self._connections = connections

    def __enter__(self) -> Connection:
        self._conn = self._connections.take()
        return cast(Connection, self._conn)

    def __exit__(self, *_exc: object) -> None:
        self._connections.give_back(self._conn)


class Database:
    """The engine and the session factory for one configured database."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = url
        self.engine = make_engine(url, **engine_kwargs)
        self.session_factory = sessionmaker(self.engine, expire_on_commit=False)
        # One-statement reads and conditional updates (the hot paths) on MySQL run on a
        # pool of AUTOCOMMIT connections: one round trip each, no COMMIT or ROLLBACK.
        # SQLite has one writer at a time anyway: the same engine.
        self.autocommit_engine = (
            make_engine(url, autocommit=True, **engine_kwargs)
            if self.engine.dialect.name == "mysql" else self.engine)
        self.thread_connections = (
            ThreadConnections(self.autocommit_engine, limit=KEPT_CONNECTIONS,
                              idle_for=engine_kwargs.get("ping_if_idle_for", PING_IF_IDLE_FOR))
            if self.autocommit_engine is not self.engine else None)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def unit_of_work(self, *, under: AbstractContextManager[object] | None = None,
                     core_first: bool = False) -> UnitOfWork:
        """A unit of work; `under` (a lock) is held around its transaction. `core_first`:
        its ORM session is made only if asked for (`UnitOfWork`)."""
        return UnitOfWork(self.session_factory, under, core_first=core_first)

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A short read-only session."""
        session = self.session_factory()
        try:
            yield session
        finally:
            session.close()  # ends the transaction; loaded objects stay readable

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One short transaction: committed when the block ends normally, rolled back if
        it raises (the row-locked hot paths, which need no ORM unit of work). On MySQL a
        `DriverConnection` (the pooled driver connection itself), elsewhere a Core one."""
        if self.engine.dialect.name != "mysql":
            with self.engine.begin() as conn:
                yield conn
            return
        tx = DriverConnection(self.engine, transaction=True)
        try:
            yield cast(Connection, tx)
            tx.commit()
        finally:
            tx.close()

    def connect(self) -> AbstractContextManager[Connection]:
        """Single statements, each its own transaction: on MySQL an AUTOCOMMIT driver
        connection (`DriverConnection`) kept by the calling thread between two uses
        (`ThreadConnections`); on SQLite a Core connection whose block is one
        transaction, committed at its end."""
        if self.thread_connections is None:
            return self.engine.begin()
        return _KeptConnection(self.thread_connections)

    def dispose(self) -> None:
        if self.thread_connections is not None:
            self.thread_connections.close_all()
        self.engine.dispose()
        if self.autocommit_engine is not self.engine:
            self.autocommit_engine.dispose()


# What `constant` writes into a statement's text: enum values and names of our own, never
# client input; nothing a dialect could read as anything but the string itself.
_CONSTANT_TEXT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def constant(value: str) -> ColumnElement[str]:
    """A string constant of our own (an enum value such as a status) written into the
    statement's text instead of passed as a parameter. A statement built once runs many
    times with the same constants: as parameters, each would be copied, converted and
    escaped by the driver on every execution (the heartbeat's UPDATE had 14 of its 19
    parameters so, ~30 µs of its client CPU). Refuses anything but a short plain word."""
    text = str(value)
    if not _CONSTANT_TEXT.fullmatch(text):
        raise ValueError(f"not a plain constant for a statement's text: {text[:80]!r}")
    return literal_column(f"'{text}'", String())


def one_of(column: Any, values: Iterable[Any]) -> Any:
    """`column IN (values)` for a fixed, short list of constants, as plain `=` comparisons
    with the values in the statement's text (`constant`): SQLAlchemy renders `in_()`
    with an "expanding" parameter that it re-renders on every execution (about a third
    of a one-row statement's cost); these compile once with the statement."""
    return or_(*(column == constant(v) for v in values))


def affected_rows(result: Any) -> int:
    """Rows matched by an UPDATE/DELETE (a CursorResult's rowcount), typed."""
    return int(cast(CursorResult[Any], result).rowcount or 0)


def utcnow() -> datetime:
    """Now, aware UTC; freezegun controls it in tests."""
    return datetime.now(UTC)
