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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Executable
from sqlalchemy.exc import DBAPIError

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
        for name, bind in compiled.binds.items():
            if getattr(bind, "expanding", False):
                raise ValueError(f"fastsql: expanding parameter {name!r} is not supported")
            self.bind_processors[name] = bind.type.dialect_impl(dialect).bind_processor(dialect)
        columns = list(getattr(statement, "selected_columns", ()))
        self.keys = [column.key for column in columns]
        self.types = [column.type for column in columns]
        self.result_processors: list[Processor] | None = None

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = self.compiled.construct_params(params)
        processors = self.bind_processors
        for name, processor in processors.items():
            if processor is not None:
                values[name] = processor(values[name])
        if self.positional:
            return tuple(values[name] for name in self.names)
        return values

    def processors_for(self, description: Any, dialect: Any) -> list[Processor]:
        if self.result_processors is None:
            self.result_processors = [
                type_.dialect_impl(dialect).result_processor(dialect, column[1])
                for type_, column in zip(self.types, description, strict=True)
            ]
        return self.result_processors


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
        fairy = conn.connection
        dbapi_conn = fairy.dbapi_connection
        dialect = conn.dialect
        cursor = dbapi_conn.cursor()  # type: ignore[union-attr]
        try:
            if many is not None:
                cursor.executemany(compiled.sql, args)
            else:
                cursor.execute(compiled.sql, args)
            rows: list[Record] = []
            if fetch:
                raw = cursor.fetchall()
                if raw:
                    processors = compiled.processors_for(cursor.description, dialect)
                    keys = compiled.keys
                    for values in raw:
                        rows.append(Record({
                            key: (processor(value) if processor is not None else value)
                            for key, processor, value in zip(keys, processors, values,
                                                             strict=True)}))
            return cursor.rowcount, cursor.lastrowid, rows
        except dialect.loaded_dbapi.Error as exc:
            lost = dialect.is_disconnect(exc, dbapi_conn, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                compiled.sql, args, exc, dialect.loaded_dbapi.Error,
                connection_invalidated=lost, dialect=dialect) from exc
        finally:
            if not conn.invalidated:
                cursor.close()

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
        self._run(conn, rows[0], many=rows)
