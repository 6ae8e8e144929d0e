"""`app.dbdriver.CachingConnection` gives exactly what PyMySQL gives, and pins the
private PyMySQL methods it builds on (a PyMySQL upgrade that moves them fails here)."""

from __future__ import annotations

import inspect
import io

import pymysql
import pymysql.connections
import pytest
from sqlalchemy.engine import make_url

from app import dbdriver
from app.dbdriver import CachingConnection
from app.transfers.schemas import TransferRequest
from tests.sessions.helpers import ask

pytestmark = pytest.mark.services


def connect(cls, runtime):  # type: ignore[no-untyped-def]
    url = make_url(runtime.database.url)
    return cls(host=url.host, port=url.port or 3306, user=url.username,
               password=url.password or "", database=url.database, charset="utf8mb4",
               autocommit=True)


def test_the_private_pymysql_api_it_relies_on_is_there():
    result = pymysql.connections.MySQLResult
    assert list(inspect.signature(result._get_descriptions).parameters) == ["self"]
    assert list(inspect.signature(pymysql.connections.Connection._read_query_result)
                .parameters) == ["self", "unbuffered"]
    assert "packet_type" in inspect.signature(
        pymysql.connections.Connection._read_packet).parameters
    # the engine opens its connections with it
    assert issubclass(CachingConnection, pymysql.connections.Connection)


def test_every_table_reads_back_the_same_as_through_plain_pymysql(runtime, service):
    """Rows, types and descriptions of every table (every column type of the schema:
    integers, strings, datetimes, JSON, booleans, NULLs), twice (the second time from
    the cached descriptors), and of results of other shapes in between."""
    first = ask(service, "AUTO_BARGAIN", shop="d1", context={"k": ["v", 1, None]}).session
    ask(service, "AUTO_FOLLOW_UP", shop="d1")
    service.transfer(first.session_id, TransferRequest(reason="needs a person"),
                     actor="test")
    plain = connect(pymysql.connections.Connection, runtime)
    cached = connect(CachingConnection, runtime)
    try:
        with plain.cursor() as cur:
            cur.execute("SHOW TABLES")
            tables = [t for (t,) in cur.fetchall()]
        assert {"sessions", "session_transfers", "events", "session_operations",
                "messages"} <= set(tables)
        statements = [f"SELECT * FROM `{t}` ORDER BY 1" for t in tables]
        statements += ["SELECT 1, NULL, 'ü', JSON_OBJECT('a', 1), "
                       "TIMESTAMP '2026-12-02 01:02:03.456789', CAST(1.5 AS DECIMAL(4,2))",
                       "SELECT COUNT(*) FROM sessions", "UPDATE sessions SET priority = "
                       "priority WHERE 1 = 0"]
        for _round in range(2):
            for sql in statements:
                with plain.cursor() as a, cached.cursor() as b:
                    rows_a, rows_b = a.execute(sql), b.execute(sql)
                    assert rows_a == rows_b, sql
                    assert a.description == b.description, sql
                    assert a.fetchall() == b.fetchall(), sql
    finally:
        plain.close()
        cached.close()


def test_a_statement_parses_its_descriptors_once(runtime, service):
    ask(service, "AUTO_BARGAIN", shop="d2")
    conn = connect(CachingConnection, runtime)
    try:
        sql = "SELECT session_id, status, created_at AS parsed_once FROM sessions"
        with conn.cursor() as cur:
            cur.execute(sql)
            shapes = len(dbdriver._shapes)
            first = cur.description
            cur.execute(sql)
            assert len(dbdriver._shapes) == shapes
            assert cur.description is first  # the parsed description, reused
            cur.execute(sql.replace("parsed_once", "another_shape"))
            assert len(dbdriver._shapes) == shapes + 1
    finally:
        conn.close()


def _packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def _offline(stream: bytes, seq: int = 1) -> CachingConnection:
    conn = CachingConnection(defer_connect=True)
    conn._rfile = io.BytesIO(stream)
    conn._next_seq_id = seq
    conn._current_timeout = conn._read_timeout  # as after the query's first packet
    return conn


def test_descriptor_packets_are_read_as_pymysql_reads_them():
    conn = _offline(_packet(1, b"first") + _packet(2, b"second") + _packet(3, b"rest"))
    assert dbdriver._read_descriptor_packets(conn, 2) == [b"first", b"second"]
    assert conn._next_seq_id == 3 and conn._read_packet().get_all_data() == b"rest"
    # a wrong sequence number is PyMySQL's own error (and closes the connection)
    wrong = _offline(_packet(1, b"first") + _packet(7, b"second"))
    with pytest.raises(pymysql.err.InternalError, match="sequence number wrong"):
        dbdriver._read_descriptor_packets(wrong, 2)
    # an error packet in their place raises the server's error
    error = b"\xff" + (1146).to_bytes(2, "little") + b"#42S02Table 'x.y' doesn't exist"
    with pytest.raises(pymysql.err.ProgrammingError, match="doesn't exist"):
        dbdriver._read_descriptor_packets(_offline(_packet(1, error)), 1)


@pytest.mark.parametrize("text", [
    "2026-12-02 03:13:06.123456", "2026-12-02 03:13:06", "1970-01-01 00:00:00.000001",
    "0000-00-00 00:00:00", "2026-13-45 03:13:06", "2026-12-02 03:13:06.12", "2026-12-02",
    "9999-12-31 23:59:59.999999"])
def test_datetimes_convert_exactly_as_pymysql_converts_them(text):
    from pymysql.converters import convert_datetime

    assert dbdriver._datetime(text) == convert_datetime(text)
    assert type(dbdriver._datetime(text)) is type(convert_datetime(text))
