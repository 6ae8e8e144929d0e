"""`app.dbdriver.CachingConnection` gives exactly what PyMySQL gives, and pins the
private PyMySQL methods it builds on (a PyMySQL upgrade that moves them fails here)."""

from __future__ import annotations

import inspect
import io
from datetime import UTC, datetime, timedelta, timezone

import pymysql
import pymysql.connections
import pymysql.protocol
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
    assert list(inspect.signature(result._read_row_from_packet).parameters) == [
        "self", "packet"]
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


def _offline(stream: bytes, seq: int = 1, buffer: int = 8192) -> CachingConnection:
    conn = CachingConnection(defer_connect=True)
    conn._rfile = io.BufferedReader(io.BytesIO(stream), buffer)  # as `socket.makefile`
    conn._next_seq_id = seq
    conn._current_timeout = conn._read_timeout  # as after the query's first packet
    return conn


def test_descriptor_packets_are_read_as_pymysql_reads_them():
    conn = _offline(_packet(1, b"first") + _packet(2, b"second") + _packet(3, b"rest"))
    assert dbdriver._read_descriptor_packets(conn, 2) == (
        [b"first", b"second"], _packet(1, b"first") + _packet(2, b"second"))
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


@given(st.datetimes(), st.sampled_from([None, UTC, timezone(timedelta(hours=-8, minutes=-30))]))
def test_datetimes_are_written_exactly_as_pymysql_writes_them(value, tz):
    from pymysql.converters import escape_datetime

    value = value.replace(tzinfo=tz)
    assert dbdriver._escape_datetime(value) == escape_datetime(value)
    assert dbdriver.ENCODERS[datetime] is dbdriver._escape_datetime


def test_a_written_datetime_reads_back_unchanged(runtime):
    """Through the connection's own encoders (the app's connections write every
    DATETIME parameter so), incl. a whole second and the smallest and largest values."""
    cached = connect(CachingConnection, runtime)
    values = [datetime(2026, 12, 6, 3, 4, 5, 123456), datetime(2026, 12, 6, 3, 4, 5),
              datetime(1000, 1, 1), datetime(9999, 12, 31, 23, 59, 59, 999999)]
    try:
        with cached.cursor() as cur:
            for value in values:
                cur.execute("SELECT CAST(%s AS DATETIME(6))", (value,))
                assert cur.fetchall() == ((value,),)
    finally:
        cached.close()


class _StrKind(str):
    pass


PARAMETERS = st.one_of(
    st.text(), st.text(alphabet=st.sampled_from("\0\\\n\r\x1a\"'%s()ab\u00e9\U0001f600")),
    st.integers(min_value=-(2**70), max_value=2**70), st.none(), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False), st.datetimes(),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=45))])),
    st.binary(max_size=40), st.text().map(_StrKind), st.decimals(allow_nan=False,
                                                                 allow_infinity=False))


def _offline_pair() -> tuple[CachingConnection, pymysql.connections.Connection]:
    ours = CachingConnection(defer_connect=True)
    plain = pymysql.connections.Connection(defer_connect=True)
    plain.encoders = dbdriver.ENCODERS  # the same table: only the way through differs
    return ours, plain


@settings(deadline=None)  # the machine may be busy: what is checked here is equality
@given(PARAMETERS, st.booleans())
def test_parameters_are_written_exactly_as_pymysql_writes_them(value, no_backslashes):
    """`CachingConnection.escape` (the common types without PyMySQL's chain of calls)
    writes every value as PyMySQL's own `escape` does, in either escaping mode."""
    from pymysql.constants import SERVER_STATUS

    ours, plain = _offline_pair()
    mode = SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES if no_backslashes else 0
    ours.server_status = plain.server_status = mode
    assert ours.escape(value) == plain.escape(value)
    assert ours.escape(value, dbdriver.ENCODERS) == plain.escape(value, dbdriver.ENCODERS)


def test_parameters_read_back_unchanged_through_mariadb(runtime):
    """Every character a string can hold, and the other common types, go to MariaDB and
    come back as sent (the fast escapes are the statement's real text)."""
    cached = connect(CachingConnection, runtime)
    text = "".join(chr(c) for c in range(0, 0xD800, 7)) + "'\\\"\0\x1a%s%%\U0001f600"
    values = [text, "", "it's", -(2**63), 2**64 - 1, 0, None,
              datetime(2026, 12, 6, 7, 8, 9, 10)]
    try:
        with cached.cursor() as cur:
            for value in values:
                cur.execute("SELECT %s", (value,))
                (got,), = cur.fetchall()
                if isinstance(value, int):
                    got = int(got)
                elif isinstance(value, datetime):
                    got = datetime.fromisoformat(got)
                assert got == value, repr(value)[:80]
    finally:
        cached.close()


def _lenenc(value: bytes | None) -> bytes:
    if value is None:
        return b"\xfb"
    n = len(value)
    if n < 251:
        return bytes([n]) + value
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little") + value
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little") + value
    return b"\xfe" + n.to_bytes(8, "little") + value


EOF_PACKET = b"\xfe\x00\x00\x02\x00"


def test_a_known_descriptor_block_is_taken_in_one_read(runtime, service):
    """The second run of a statement takes its descriptors from the read buffer at once;
    a changed column (same count, other bytes) is read and parsed anew."""
    ask(service, "AUTO_BARGAIN", shop="d3")
    conn = connect(CachingConnection, runtime)
    plain = connect(pymysql.connections.Connection, runtime)
    reads = 0
    read_bytes = conn._read_bytes

    def counting(n: int) -> bytes:
        nonlocal reads
        reads += 1
        return read_bytes(n)

    conn._read_bytes = counting  # type: ignore[method-assign]
    try:
        sql = "SELECT *, 'one read' AS tag FROM sessions WHERE shop_id = 'd3'"
        with conn.cursor() as cur:
            cur.execute(sql)
            first_reads, reads = reads, 0
            cur.execute(sql)
            assert reads < 12 < first_reads  # ~2 a column the first time
            with plain.cursor() as ref:
                ref.execute(sql)
                assert cur.fetchall() == ref.fetchall()
                assert cur.description == ref.description
        with conn.cursor() as cur, plain.cursor() as ref:
            cur.execute("CREATE TABLE IF NOT EXISTS dbdriver_probe (v VARCHAR(10))")
            cur.execute("DELETE FROM dbdriver_probe")
            cur.execute("INSERT INTO dbdriver_probe VALUES ('7')")
            cur.execute("SELECT v FROM dbdriver_probe")
            cur.execute("SELECT v FROM dbdriver_probe")  # now a known block
            cur.execute("ALTER TABLE dbdriver_probe MODIFY v INT")
            cur.execute("SELECT v FROM dbdriver_probe")
            ref.execute("SELECT v FROM dbdriver_probe")
            assert cur.fetchall() == ref.fetchall() == ((7,),)
            assert cur.description == ref.description
            cur.execute("DROP TABLE dbdriver_probe")
    finally:
        conn.close()
        plain.close()


@pytest.mark.parametrize("buffer", [8192, 16])
def test_a_result_reads_the_same_from_a_known_block_or_packet_by_packet(runtime, buffer):
    """A whole result (count, descriptors, EOF, rows with values of every length
    prefix, EOF) from bytes: the same rows whether the buffer holds the known block
    (one read) or only part of it (packet by packet)."""
    live = connect(CachingConnection, runtime)
    try:
        with live.cursor() as cur:
            cur.execute("SELECT 'abc' AS a, NULL AS b, 7 AS c, 'ü' AS d")
            description = cur.description
    finally:
        live.close()
    (block,) = [block for (_decoding, block), shape in dbdriver._blocks.items()
                if shape.description == description]
    values = [(b"x" * 300, None, b"12", "ü".encode()),
              (b"y" * 70_000, b"", b"-3", b""), (b"", None, None, b"z")]
    stream = _packet(1, b"\x04") + block + _packet(6, EOF_PACKET)
    for n, row in enumerate(values):
        stream += _packet(7 + n, b"".join(_lenenc(v) for v in row))
    stream += _packet(7 + len(values), EOF_PACKET)
    conn = _offline(stream, buffer=buffer)
    conn.encoding, conn.use_unicode = live.encoding, live.use_unicode
    assert conn._read_query_result() == len(values)
    assert conn._result.description == description
    assert conn._result.rows == (("x" * 300, None, 12, "ü"), ("y" * 70_000, "", -3, ""),
                                 ("", None, None, "z"))


@given(st.lists(st.one_of(st.none(), st.binary(max_size=300)), max_size=6),
       st.integers(min_value=0, max_value=8), st.booleans())
def test_rows_read_as_pymysql_reads_them(values, cut, text):
    """Any row packet, cut short anywhere: the same values, or the same error."""
    data = b"".join(_lenenc(v) for v in values)
    data = data[:len(data) - cut] if cut else data
    converters = [("latin-1" if text else None, None)] * (len(values) + 1)

    def read(reader):  # type: ignore[no-untyped-def]
        result = object.__new__(reader)
        result.converters, result.unbuffered_active = converters, False
        try:
            return reader._read_row_from_packet(
                result, pymysql.protocol.MysqlPacket(data, "utf8"))
        except AssertionError:
            return "AssertionError"

    assert read(dbdriver._Result) == read(pymysql.connections.MySQLResult)
