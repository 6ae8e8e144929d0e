"""The hot paths' statements, run on the driver's cursor of a SQLAlchemy connection.

A Core `conn.execute()` of a built-once statement costs ~100–200 µs of Python above
the driver's own work: the compiled-cache key, an execution context, the cursor
result and its row metadata, built again on every call. The few statements that run
on every bot request (a session's row by id, the heartbeat's conditional UPDATE, the
message path's reads and writes) are `Prepared` instead: compiled by SQLAlchemy once per
dialect (`construct_params` for the literal values of the statement, each parameter's
and each selected column's own type processors — so a `UTCDateTime`, a JSON column or
a boolean converts exactly as through Core) and then executed directly on the
connection's DBAPI cursor, inside whatever transaction the connection is in.

Errors are what Core raises: the driver's exception wrapped by
`sqlalchemy.exc.DBAPIError.instance`, and a lost connection invalidated first (as
Core's `_handle_dbapi_exception` does), so the 503 mapping and the retry rules see the
same exceptions either way. On a dialect other than MySQL (SQLite, the embedded
default, where a request's cost is not the product's cost) it is plain `conn.execute`.
`tests/core/test_fastsql.py` holds the two ways to the same rows, counts and errors.

`core_insert` is the history import's bulk INSERT: many same-keyed rows with each
column's bind processor applied in one tight loop (SQLAlchemy's private, cached
`_cached_bind_processor`, pinned by `tests/core/test_fastsql.py`), and on PyMySQL the
multi-row statement written out here.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pymysql.constants import CLIENT
from sqlalchemy import Connection, Executable
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session as DbSession

from app.db import UTCDateTime
from app.dbdriver import STRING_ESCAPES

Processor = Callable[[Any], Any] | None


class Record(dict[str, Any]):
    """A result row: a dict of column key → value, also read as attributes (`row.status`)
    and as `row._asdict()`, like the Core rows the callers were written against."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _asdict(self) -> dict[str, Any]:
        return dict(self)


class _Compiled:
    """One statement compiled for one dialect: its SQL, how to build its parameters,
    and (filled on the first execution) how to convert its result columns."""

    def __init__(self, statement: Any, conn: Connection,
                 column_keys: list[str] | None = None) -> None:
        dialect = conn.dialect
        compiled = statement.compile(dialect=dialect, column_keys=column_keys)
        self.compiled = compiled
        self.sql: str = compiled.string
        self.positional: bool = bool(compiled.positional)
        self.names: list[str] = list(compiled.positiontup or []) if self.positional \
            else list(compiled.binds)
        self.bind_processors: dict[str, Processor] = {}
        # keyed by the name `construct_params` gives each bind (an anonymous one, a
        # literal such as `status == SessionStatus.PENDING`, has no name of its own)
        for bind, name in compiled.bind_names.items():
            if getattr(bind, "expanding", False):
                raise ValueError(f"fastsql: expanding parameter {name!r} is not supported")
            self.bind_processors[name] = bind.type.dialect_impl(dialect).bind_processor(dialect)
        columns = list(getattr(statement, "selected_columns", ()))
        self.keys = [column.key for column in columns]
        self.types = [column.type for column in columns]
        self.result_processors: list[Processor] | None = None
        # Positional paramstyles only: with PyMySQL loaded the engine's is "pyformat",
        # whose parameters are `construct_params`' own dict, as cheap as a plan's
        # (measured: 0.7 µs for a read's one parameter, 3 µs for a heartbeat's UPDATE).
        self.plan = self._plan(compiled) if self.positional else None

    def _plan(self, compiled: Any) -> list[tuple[str, str, bool, Any, Processor]] | None:
        """What `construct_params` does for each positional parameter, decided once: the
        bind's key (else its name) looked up in the call's mapping, else its fixed value
        (a literal of the statement), then its type's processor. None (the general way on
        every call) for what it does not cover: escaped or post-compiled names,
        collected parameters, value callables."""
        if (compiled.escaped_bind_names or getattr(compiled, "_render_postcompile", False)
                or getattr(compiled, "_collected_params", None)):
            return None
        by_name = {name: bind for bind, name in compiled.bind_names.items()}
        plan = []
        for name in self.names:
            bind = by_name.get(name)
            if bind is None or bind.callable is not None:
                return None
            plan.append((bind.key, name, bool(bind.required), bind.value,
                         self.bind_processors[name]))
        return plan

    def parameters(self, params: Mapping[str, Any]) -> Any:
        plan = self.plan
        if plan is not None:
            values = []
            for key, name, required, fixed, processor in plan:
                if key in params:
                    value = params[key]
                elif name in params:
                    value = params[name]
                elif required:  # the general way raises SQLAlchemy's own error
                    return self._constructed(params)
                else:
                    value = fixed
                values.append(value if processor is None else processor(value))
            return tuple(values)
        return self._constructed(params)

    def _constructed(self, params: Mapping[str, Any]) -> Any:
        """The parameters through SQLAlchemy's `construct_params` (the reference)."""
        values = self.compiled.construct_params(params)
        processors = self.bind_processors
        for name, processor in processors.items():
            if processor is not None:
                values[name] = processor(values[name])
        if self.positional:
            return tuple(values[name] for name in self.names)
        return values

    def records(self, cursor: Any, dialect: Any) -> list[Record]:
        """The rows of the cursor's current result, each column converted by its type."""
        raw = cursor.fetchall()
        if not raw:
            return []
        processors = self.processors_for(cursor.description, dialect)
        keys = self.keys
        return [Record({key: (processor(value) if processor is not None else value)
                        for key, processor, value in zip(keys, processors, values,
                                                         strict=True)})
                for values in raw]

    def processors_for(self, description: Any, dialect: Any) -> list[Processor]:
        if self.result_processors is None:
            self.result_processors = [
                type_.dialect_impl(dialect).result_processor(dialect, column[1])
                for type_, column in zip(self.types, description, strict=True)
            ]
        return self.result_processors


def takes_several_statements(conn: Connection) -> bool:
    """Whether the connection's driver connection accepts several statements in one
    query (PyMySQL's MULTI_STATEMENTS capability, asked for when it connected)."""
    flags = getattr(conn.connection.dbapi_connection, "client_flag", 0)
    return bool(flags & CLIENT.MULTI_STATEMENTS)


def _wrapped(conn: Connection, sql: str, args: Any, exc: Any, cursor: Any) -> BaseException:
    """The driver's error as Core raises it, the connection invalidated first when it was
    lost (as Core's `_handle_dbapi_exception` does)."""
    dialect = conn.dialect
    dbapi_conn = conn.connection.dbapi_connection
    lost = dialect.is_disconnect(exc, dbapi_conn, cursor)
    if lost:
        conn.invalidate(exc)
    return DBAPIError.instance(sql, args, exc, dialect.loaded_dbapi.Error,
                               connection_invalidated=lost, dialect=dialect)


Step = tuple["Prepared", Mapping[str, Any]] | str


def in_one_query(conn: Connection, steps: Sequence[Step]) -> list[tuple[int, list[Record]]]:
    """Several statements sent as one query, on a MySQL connection that takes several
    (`takes_several_statements`: the AUTOCOMMIT pool, `app.db.make_engine`): for each,
    the rows it matched and the rows it read. A step is a `Prepared` with its parameters,
    written out as the driver writes a statement (`mogrify`: every value escaped), or a
    statement text of our own (`START TRANSACTION`). The server stops at the first
    statement that fails; its error is raised as Core raises it, and whatever the
    statements before it did stays done (a transaction they opened stays open: the
    caller ends it)."""
    compiled = [None if isinstance(step, str) else step[0]._compiled(conn, step[1])
                for step in steps]
    dbapi_conn = conn.connection.dbapi_connection
    cursor = dbapi_conn.cursor()  # type: ignore[union-attr]
    sql = ""
    try:
        sql = ";".join(
            step if isinstance(step, str)
            else cursor.mogrify(form.sql, form.parameters(step[1]))  # type: ignore[union-attr]
            for step, form in zip(steps, compiled, strict=True))
        cursor.execute(sql)  # no parameters: the text is not formatted again
        results = []
        for n, form in enumerate(compiled):
            if n:
                cursor.nextset()
            results.append((int(cursor.rowcount),
                            form.records(cursor, conn.dialect) if form is not None else []))
        return results
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, sql, None, exc, cursor) from exc
    finally:
        if not conn.invalidated:
            cursor.close()  # reads any result left (PyMySQL's `close`)


def end_transaction(conn: Connection, *, commit: bool) -> None:
    """COMMIT (or ROLLBACK) the transaction a query of `in_one_query` opened, on the
    driver; its error raised as Core raises it (a lost connection invalidated first)."""
    dbapi_conn = conn.connection.dbapi_connection
    try:
        if commit:
            dbapi_conn.commit()  # type: ignore[union-attr]
        else:
            dbapi_conn.rollback()  # type: ignore[union-attr]
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrapped(conn, "COMMIT" if commit else "ROLLBACK", None, exc, None) from exc


class Prepared:
    """A built-once Core statement, executed without Core's per-call machinery.

    `values_from_params`: an UPDATE/INSERT whose SET columns are the parameters given
    (as Core does for `conn.execute(update(t).where(…), {…})`); compiled once per set of
    parameter names."""

    def __init__(self, statement: Executable, *, values_from_params: bool = False) -> None:
        self.statement = statement
        self.values_from_params = values_from_params
        self._forms: dict[Any, _Compiled] = {}

    def _compiled(self, conn: Connection, params: Mapping[str, Any]) -> _Compiled:
        key: Any = conn.dialect.name
        if self.values_from_params:
            key = (key, frozenset(params))
        compiled = self._forms.get(key)
        if compiled is None:
            compiled = self._forms.setdefault(key, _Compiled(
                self.statement, conn,
                column_keys=list(params) if self.values_from_params else None))
        return compiled

    def _run(self, conn: Connection, params: Mapping[str, Any], *, fetch: bool = False,
             many: Sequence[Mapping[str, Any]] | None = None) -> tuple[int, Any, list[Record]]:
        """Execute on the connection's cursor: (rowcount, lastrowid, rows)."""
        compiled = self._compiled(conn, params)
        args: Any = ([compiled.parameters(p) for p in many] if many is not None
                     else compiled.parameters(params))
        dbapi_conn = conn.connection.dbapi_connection
        cursor = dbapi_conn.cursor()  # type: ignore[union-attr]
        try:
            if many is not None:
                cursor.executemany(compiled.sql, args)
            else:
                cursor.execute(compiled.sql, args)
            rows = compiled.records(cursor, conn.dialect) if fetch else []
            return cursor.rowcount, cursor.lastrowid, rows
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrapped(conn, compiled.sql, args, exc, cursor) from exc
        finally:
            if not conn.invalidated:
                cursor.close()

    def execute_then_one(self, conn: Connection, params: Mapping[str, Any], then: Prepared,
                         then_params: Mapping[str, Any]) -> tuple[int, Record | None]:
        """This statement (an INSERT/UPDATE/DELETE), then `then`'s only row: the rows this
        one matched, and that row (or None). In one query where the connection takes
        several (`in_one_query`: a heartbeat's UPDATE and the read of its answer cost the
        client ~40 µs less than two queries, and the server one network read); else one
        after the other."""
        if conn.dialect.name != "mysql" or not takes_several_statements(conn):
            return self.execute(conn, params), then.one_or_none(conn, then_params)
        (count, _), (_, rows) = in_one_query(conn, [(self, params), (then, then_params)])
        if len(rows) > 1:
            raise ValueError(f"fastsql: {len(rows)} rows where one at most was expected")
        return count, (rows[0] if rows else None)

    def one_or_none(self, conn: Connection, params: Mapping[str, Any]) -> Record | None:
        """The statement's only row (column key → converted value), or None."""
        if conn.dialect.name != "mysql":
            row = conn.execute(self.statement, dict(params)).one_or_none()
            return None if row is None else Record(row._asdict())
        _count, _id, rows = self._run(conn, params, fetch=True)
        if len(rows) > 1:
            raise ValueError(f"fastsql: {len(rows)} rows where one at most was expected")
        return rows[0] if rows else None

    def scalar(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first column of the statement's only row (None without a row)."""
        row = self.one_or_none(conn, params)
        return None if row is None else next(iter(row.values()))

    def execute(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run an INSERT/UPDATE/DELETE; answers the rows it matched (MySQL's rowcount)."""
        if conn.dialect.name != "mysql":
            result: Any = conn.execute(self.statement, dict(params))
            return int(result.rowcount or 0)
        count, _id, _rows = self._run(conn, params)
        return int(count)

    def insert(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run a one-row INSERT; answers the new row's AUTO_INCREMENT primary key."""
        if conn.dialect.name != "mysql":
            key = conn.execute(self.statement, dict(params)).inserted_primary_key
            assert key is not None
            return int(key[0])
        _count, new_id, _rows = self._run(conn, params)
        return int(new_id)

    def execute_many(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run an INSERT for many rows of the same columns (the driver sends one
        multi-row INSERT)."""
        if not rows:
            return
        if conn.dialect.name != "mysql":
            conn.execute(self.statement, [dict(r) for r in rows])
            return
        # One row (a slot transaction's audit row, its event): the same INSERT without
        # PyMySQL's executemany, which matches the statement against a regular
        # expression and rebuilds it around the rows' VALUES.
        self._run(conn, rows[0], many=rows if len(rows) > 1 else None)


# ---- bulk INSERTs (the history import) ------------------------------------------------
# A multi-row INSERT written out here (`_mysql_insert`) holds at most this many
# characters — at most 4 bytes each in UTF-8: about PyMySQL's own 1 MB statements, far
# inside max_allowed_packet — and at most `batch` rows.
STATEMENT_CHARS = 256 * 1024


def core_insert(db: DbSession, model: Any, rows: list[dict[str, Any]], *,
                batch: int | None = None) -> None:
    """Same-keyed rows inserted on the transaction's connection, in database batches
    of at most `batch` rows (the import passes BATCH_SIZE, the seed's 批处理大小: one
    database batch — on MySQL one multi-row INSERT — holds at most that many rows), or
    all of them in one batch without `batch`.

    The ORM's bulk path (`db.execute(insert(Model), rows)`) and even Core's spend
    more time arranging each row's parameters than the driver spends sending them.
    Here every column's bind processor (UTC times, JSON, …) is applied in one tight
    loop; on MySQL times go as the text of their literal (`mysql_utc_text`), and with
    PyMySQL the multi-row INSERT is written out here (`_mysql_insert`) — what PyMySQL's
    executemany sends, without its generic escaping of each value — elsewhere the rows
    go to the driver's executemany as they are."""
    if not rows:
        return
    conn = db.connection()
    dialect = conn.dialect
    table = model.__table__
    keys = list(rows[0])
    compiled = table.insert().compile(dialect=dialect, column_keys=keys)
    names = list(compiled.positiontup or []) if compiled.positional else keys
    procs = [(i, proc) for i, name in enumerate(names)
             if (proc := _bind_processor(table.c[name].type, dialect)) is not None]
    pick = operator.itemgetter(*names)
    step = batch if batch and batch > 0 else len(rows)
    statement = str(compiled)
    if dialect.name == "mysql" and dialect.driver == "pymysql":
        quote = dialect.identifier_preparer
        prefix = (f"INSERT INTO {quote.format_table(table)} "
                  f"({', '.join(quote.quote(name) for name in names)}) VALUES ")
        _mysql_insert(conn, prefix, rows, pick, len(names), procs, step)
        return
    params: list[Any] = []
    for row in rows:
        values = list(pick(row)) if len(names) > 1 else [pick(row)]
        for i, proc in procs:
            values[i] = proc(values[i])
        params.append(tuple(values) if compiled.positional else dict(zip(names, values,
                                                                         strict=True)))
    for start in range(0, len(params), step):
        conn.exec_driver_sql(statement, params[start:start + step])


def _mysql_insert(conn: Any, prefix: str, rows: list[dict[str, Any]],
                  pick: Callable[[dict[str, Any]], Any], width: int,
                  procs: list[tuple[int, Callable[[Any], Any]]], step: int) -> None:
    """`prefix` (`INSERT INTO t (a, b) VALUES `) then `(…),(…)`: statements of at most
    `step` rows and STATEMENT_CHARS characters each, the values written as PyMySQL
    writes them (`_literals`). Sent without parameters (no `%` formatting), through
    SQLAlchemy, so its errors (a duplicate key) are the usual ones."""
    raw = conn.connection.dbapi_connection
    from pymysql.constants import SERVER_STATUS

    table: list[str] | None = STRING_ESCAPES
    if raw.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
        table = None  # every value from the connection's `escape`, which knows the mode
    picked = [pick(row) for row in rows] if width > 1 else [(pick(row),) for row in rows]
    columns: list[Any] = list(zip(*picked, strict=True))
    for i, proc in procs:
        columns[i] = list(map(proc, columns[i]))
    texts = ["(" + ",".join(values) + ")" for values in zip(
        *(_literals(column, raw.escape, table) for column in columns), strict=True)]
    options = {"no_parameters": True}
    first = chars = 0
    for index, text in enumerate(texts):
        if index > first and (index - first >= step or chars + len(text) > STATEMENT_CHARS):
            conn.exec_driver_sql(prefix + ",".join(texts[first:index]),
                                 execution_options=options)
            first, chars = index, 0
        chars += len(text) + 1
    conn.exec_driver_sql(prefix + ",".join(texts[first:]), execution_options=options)


def _literals(values: Sequence[Any], escape: Callable[[Any], str],
              table: list[str] | None) -> list[str]:
    """One column's values as SQL literals, as PyMySQL writes them: a str escaped by
    PyMySQL's table, in quotes; an int in digits; None as NULL; anything else (bytes,
    bools, floats, …) by the connection's `escape` (and everything by it when `table` is
    None). A column that repeats its values (a slot, a role, the job) has each distinct
    value written once: equal values have the same literal."""
    if table is None:
        return [escape(v) for v in values]
    try:  # judged by its first values: hashing a column of long texts costs
        repeats = len(values) >= 8 and len(set(values[:64])) * 4 <= min(64, len(values))
    except TypeError:  # an unhashable value: written one by one
        repeats = False
    if repeats:
        distinct = list(set(values))
        known = dict(zip(distinct, _literals(distinct, escape, table), strict=True))
        return list(map(known.__getitem__, values))
    return ["'" + v.translate(table) + "'" if v.__class__ is str
            else "NULL" if v is None
            else str(v) if v.__class__ is int
            else escape(v)
            for v in values]


def _bind_processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """The column type's own bind processor, except for UTC times on MySQL."""
    if dialect.name == "mysql" and isinstance(type_, UTCDateTime):
        return mysql_utc_text
    return type_._cached_bind_processor(dialect)  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=8192)
def mysql_utc_text(value: datetime | None) -> str | None:
    """A time as the DATETIME(6) literal that PyMySQL would send for it, made by
    `isoformat` (C): PyMySQL's own formatting plus the UTC conversion cost several
    times more, and a chunk binds about four times per message. Remembered, because
    most binds repeat a time (a session's first and last message, the chunk's now)."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r} given where UTC is required")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None).isoformat(" ", "microseconds")
