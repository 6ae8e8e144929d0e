"""The MySQL driver connection: PyMySQL, reading each result's column descriptors once.

MySQL's text protocol sends a descriptor packet for every column of every result set
(catalog, schema, table, column name, charset, type, flags…), and PyMySQL parses each
one in Python: for a 33-column session row that is most of the client's cost of the
read (measured: ~700 µs for the row, ~120 µs for one column of it). The descriptors of
a statement are the same bytes every time it runs, so this connection reads the
packets as usual but parses a given run of them only the first time, and reuses the
parsed fields, converters and `cursor.description` afterwards. Nothing else of the
protocol changes; rows are still read and converted one by one.

It relies on two private methods of PyMySQL (`Connection._read_query_result`,
`MySQLResult._get_descriptions`) and one private helper (`Connection._read_packet`);
`tests/core/test_dbdriver.py` pins them: the same rows and descriptions as the plain
driver for every column type of the schema, and the methods' presence on the locked
PyMySQL version.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from pymysql.connections import MAX_PACKET_LEN, Connection, MysqlPacket, MySQLResult
from pymysql.constants import FIELD_TYPE
from pymysql.converters import convert_datetime, decoders

# Distinct result shapes are bounded by the application's statements (column names come
# from our SQL, never from data); the bound only guards against ad-hoc SQL run through
# the same engine.
MAX_SHAPES = 4096


class _ParsedShape:
    __slots__ = ("fields", "converters", "description")

    def __init__(self, fields: list[Any], converters: list[Any],
                 description: tuple[Any, ...]) -> None:
        self.fields = fields
        self.converters = converters
        self.description = description


_shapes: dict[tuple[Any, ...], _ParsedShape] = {}
_shapes_guard = threading.Lock()


def _read_descriptor_packets(conn: CachingConnection, count: int) -> list[bytes]:
    """The payloads of the next `count` packets, read as `Connection._read_packet` reads
    them (sequence numbers checked, an error packet raised) without building a packet
    object for each: a result's column descriptors are small, many and never an error
    in practice, and this loop is a third of their cost."""
    read = conn._read_bytes
    seq = conn._next_seq_id
    payloads = []
    for _ in range(count):
        header = read(4)
        length = header[0] | header[1] << 8 | header[2] << 16
        if header[3] != seq or length >= MAX_PACKET_LEN:
            # a wrong sequence number (PyMySQL raises) or a packet of 16 MiB or more
            # (continued in the next ones): PyMySQL's own reader
            conn._next_seq_id = seq
            payloads.append(conn._read_packet_with_header(header))
            seq = conn._next_seq_id
            continue
        seq = (seq + 1) % 256
        data = read(length)
        if data[:1] == b"\xff":
            conn._next_seq_id = seq
            MysqlPacket(data, conn.encoding).raise_for_error()
        payloads.append(data)
    conn._next_seq_id = seq
    return payloads


class _Result(MySQLResult):
    def _get_descriptions(self) -> None:
        conn = self.connection
        payloads = _read_descriptor_packets(conn, self.field_count)
        eof = conn._read_packet()
        key = (conn.encoding, conn.use_unicode, id(conn.decoders), *payloads)
        shape = _shapes.get(key)
        if shape is None:
            packets = [MysqlPacket(data, conn.encoding) for data in payloads]
            shape = self._parse(packets, eof)
            with _shapes_guard:
                if len(_shapes) < MAX_SHAPES:
                    _shapes[key] = shape
        self.fields = shape.fields
        self.converters = shape.converters
        self.description = shape.description

    def _parse(self, packets: list[Any], eof: Any) -> _ParsedShape:
        """PyMySQL's own parse, fed the packets already read."""
        conn = self.connection
        replay = iter([*packets, eof])

        def read_again(packet_type: Any = None) -> Any:
            packet = next(replay)
            return packet if packet_type is None else packet_type(
                packet.get_all_data(), conn.encoding)

        conn._read_packet = read_again  # type: ignore[method-assign]
        try:
            MySQLResult._get_descriptions(self)
        finally:
            del conn._read_packet
        return _ParsedShape(self.fields, self.converters, self.description)


def _datetime(value: str) -> datetime | str:
    """A DATETIME/TIMESTAMP value as the server sends it (`YYYY-MM-DD hh:mm:ss`, with six
    fraction digits for DATETIME(6)) through the C `fromisoformat` (about 1 µs, against
    PyMySQL's 15 µs regular expression); anything else through PyMySQL's own converter,
    which answers exactly as it would (a zero date stays a string)."""
    if (len(value) == 19 or len(value) == 26) and value[10] == " " and value[0] != "0":
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    return convert_datetime(value)  # type: ignore[no-any-return]


# One decoder table for every connection (PyMySQL builds one per connection), so that a
# statement's parsed descriptors are shared by the whole pool (`_shapes` keys on it).
DECODERS = {**{k: v for k, v in decoders.items() if isinstance(k, int)},
            FIELD_TYPE.DATETIME: _datetime, FIELD_TYPE.TIMESTAMP: _datetime}


class CachingConnection(Connection):  # type: ignore[misc]
    """A PyMySQL connection whose results parse a statement's column descriptors once,
    and read DATETIME values with the C parser."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        custom = "conv" in kwargs
        super().__init__(*args, **kwargs)
        if not custom:
            self.decoders = DECODERS

    def _read_packet_with_header(self, header: bytes) -> bytes:
        """The rest of a packet whose header was read already (an unexpected sequence
        number, or a packet of 16 MiB or more), through PyMySQL's own reader: it raises
        what it raises for those, or reads the continuation packets."""
        replay = [header]

        def first_header_again(num_bytes: int) -> bytes:
            if replay:
                return replay.pop()
            return bytes(Connection._read_bytes(self, num_bytes))

        self._read_bytes = first_header_again  # type: ignore[method-assign]
        try:
            return bytes(self._read_packet().get_all_data())
        finally:
            del self._read_bytes

    def _read_query_result(self, unbuffered: bool = False) -> Any:
        if unbuffered:  # streaming results (not used by the app): PyMySQL's own path
            return super()._read_query_result(unbuffered=True)
        self._result = None
        result = _Result(self)
        result.read()
        self._result = result
        if result.server_status is not None:
            self.server_status = result.server_status
        return result.affected_rows
