"""The MySQL driver connection: PyMySQL, reading each result's column descriptors once.

MySQL's text protocol sends a descriptor packet for every column of every result set
(catalog, schema, table, column name, charset, type, flags…), and PyMySQL parses each
one in Python: for a 33-column session row that is most of the client's cost of the
read (measured: ~700 µs for the row, ~120 µs for one column of it). The descriptors of
a statement are the same bytes every time it runs, so this connection reads the
packets as usual but parses a given run of them only the first time, and reuses the
parsed fields, converters and `cursor.description` afterwards; and once a run of
descriptor packets has been seen, the same bytes at the head of the read buffer are
taken in one read (not two reads a packet). Rows are read one by one as PyMySQL reads
them, in one loop over the packet's bytes. Nothing else of the protocol changes.

It relies on private methods of PyMySQL (`Connection._read_query_result`,
`MySQLResult._get_descriptions`, `MySQLResult._read_row_from_packet`) and private
helpers and attributes (`Connection._read_packet`, `_read_bytes`, `_rfile`, `_next_seq_id`);
`tests/core/test_dbdriver.py` pins them: the same rows and descriptions as the plain
driver for every column type of the schema, and the methods' presence on the locked
PyMySQL version.
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from pymysql.connections import MAX_PACKET_LEN, Connection, MysqlPacket, MySQLResult
from pymysql.constants import FIELD_TYPE, SERVER_STATUS
from pymysql.converters import convert_datetime, decoders, encoders, escape_datetime

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


# The descriptor packets of a result as they arrive (headers and sequence numbers
# included), by the connection's decoding and the bytes: a block seen before is
# recognised in the connection's read buffer and taken in one read instead of two reads
# a packet (80 for a session row: PyMySQL's `_read_bytes` costs ~1 µs a call).
_blocks: dict[tuple[Any, ...], _ParsedShape] = {}
# the lengths of the blocks seen, by (field count, first sequence number)
_block_lengths: dict[tuple[int, int], tuple[int, ...]] = {}
MAX_LENGTHS = 16  # distinct block lengths remembered for one field count


def _decoding(conn: CachingConnection) -> tuple[Any, ...]:
    return (conn.encoding, conn.use_unicode, id(conn.decoders))


def _known_block(conn: CachingConnection, count: int) -> _ParsedShape | None:
    """The parsed shape of the next `count` descriptor packets when the read buffer
    starts with a block seen before (then consumed); None, consuming nothing, when it
    does not, or not yet all of it arrived (the caller reads packet by packet)."""
    seq = conn._next_seq_id
    lengths = _block_lengths.get((count, seq))
    if not lengths:
        return None
    rfile = conn._rfile
    try:
        buffered = rfile.peek(lengths[-1])  # what is buffered; one socket read if nothing
    except (OSError, ValueError):  # a broken or closed socket: the packet reader says so
        return None
    decoding = _decoding(conn)
    for length in lengths:
        if len(buffered) < length:
            break
        shape = _blocks.get((decoding, buffered[:length]))
        if shape is not None:
            rfile.read(length)  # buffered already: cannot block or fail
            conn._next_seq_id = (seq + count) % 256
            return shape
    return None


def _remember_block(conn: CachingConnection, count: int, seq: int, block: bytes,
                    shape: _ParsedShape) -> None:
    with _shapes_guard:
        if len(_blocks) >= MAX_SHAPES:
            return
        _blocks[(_decoding(conn), block)] = shape
        lengths = _block_lengths.get((count, seq), ())
        if len(block) not in lengths and len(lengths) < MAX_LENGTHS:
            _block_lengths[(count, seq)] = tuple(sorted((*lengths, len(block))))


def _read_descriptor_packets(conn: CachingConnection,
                             count: int) -> tuple[list[bytes], bytes | None]:
    """The payloads of the next `count` packets, read as `Connection._read_packet` reads
    them (sequence numbers checked, an error packet raised) without building a packet
    object for each: a result's column descriptors are small, many and never an error
    in practice, and this loop is a third of their cost. With them the block as it
    arrived (headers included), or None when a packet was not an ordinary one."""
    read = conn._read_bytes
    seq = conn._next_seq_id
    payloads = []
    raw: list[bytes] | None = []
    for _ in range(count):
        header = read(4)
        length = header[0] | header[1] << 8 | header[2] << 16
        if header[3] != seq or length >= MAX_PACKET_LEN:
            # a wrong sequence number (PyMySQL raises) or a packet of 16 MiB or more
            # (continued in the next ones): PyMySQL's own reader
            conn._next_seq_id = seq
            payloads.append(conn._read_packet_with_header(header))
            seq = conn._next_seq_id
            raw = None
            continue
        seq = (seq + 1) % 256
        data = read(length)
        if data[:1] == b"\xff":
            conn._next_seq_id = seq
            MysqlPacket(data, conn.encoding).raise_for_error()
        payloads.append(data)
        if raw is not None:
            raw += (header, data)
    conn._next_seq_id = seq
    return payloads, (b"".join(raw) if raw is not None else None)


class _Result(MySQLResult):
    def _get_descriptions(self) -> None:
        conn = self.connection
        count = self.field_count
        shape = _known_block(conn, count)
        if shape is None:
            seq = conn._next_seq_id
            payloads, block = _read_descriptor_packets(conn, count)
            eof = conn._read_packet()
            key = (*_decoding(conn), *payloads)
            shape = _shapes.get(key)
            if shape is None:
                packets = [MysqlPacket(data, conn.encoding) for data in payloads]
                shape = self._parse(packets, eof)
                with _shapes_guard:
                    if len(_shapes) < MAX_SHAPES:
                        _shapes[key] = shape
            if block is not None:
                _remember_block(conn, count, seq, block, shape)
        else:  # the EOF after the descriptors (its status is not used)
            assert conn._read_packet().is_eof_packet(), "Protocol error, expecting EOF"
        self.fields = shape.fields
        self.converters = shape.converters
        self.description = shape.description

    def _read_row_from_packet(self, packet: Any) -> tuple[Any, ...]:
        """PyMySQL's row reader (length-coded values, each decoded and converted; a row
        that ends early ends there) in one loop over the packet's bytes, instead of two
        method calls a value (~25 µs of a 40-column row)."""
        data = packet.get_all_data()
        pos = 0
        row: list[Any] = []
        append = row.append
        try:
            for encoding, converter in self.converters:
                first = data[pos]
                if first < 251:
                    length, pos = first, pos + 1
                elif first == 251:  # NULL
                    pos += 1
                    append(None)
                    continue
                elif first == 252:
                    length, pos = data[pos + 1] | data[pos + 2] << 8, pos + 3
                elif first == 253:
                    length, pos = int.from_bytes(data[pos + 1:pos + 4], "little"), pos + 4
                elif first == 254:
                    length, pos = int.from_bytes(data[pos + 1:pos + 9], "little"), pos + 9
                else:  # 255: not a length (PyMySQL reads it as NULL)
                    pos += 1
                    append(None)
                    continue
                value: Any = data[pos:pos + length]
                if len(value) != length:  # as PyMySQL's `MysqlPacket.read`
                    raise AssertionError(f"Result length not requested length: {length}")
                pos += length
                if encoding is not None:
                    value = value.decode(encoding)
                if converter is not None:
                    value = converter(value)
                append(value)
        except IndexError:  # no more columns in this row (as PyMySQL reads it)
            pass
        return tuple(row)

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


def _escape_datetime(value: datetime, mapping: Any = None) -> str:
    """A naive datetime as a quoted SQL literal, exactly as PyMySQL's `escape_datetime`
    writes it (`'YYYY-MM-DD hh:mm:ss[.ffffff]'`), through the C `isoformat` (0.7 µs
    against 2.7 µs; a heartbeat sends three, a message six); an aware one (PyMySQL drops
    its offset) through PyMySQL's own."""
    if value.tzinfo is not None:
        return str(escape_datetime(value, mapping))
    return "'" + value.isoformat(" ") + "'"


ENCODERS = {**encoders, datetime: _escape_datetime}

# PyMySQL's string escapes (`pymysql.converters.escape_string`) as a translate table: a
# list indexed by code point (several times faster to translate by than a dict).
STRING_ESCAPES = [chr(code) for code in range(128)]
for _char, _escaped in {"\0": "\\0", "\\": "\\\\", "\n": "\\n", "\r": "\\r",
                        "\032": "\\Z", '"': '\\"', "'": "\\'"}.items():
    STRING_ESCAPES[ord(_char)] = _escaped


class CachingConnection(Connection):  # type: ignore[misc]
    """A PyMySQL connection whose results parse a statement's column descriptors once,
    read DATETIME values with the C parser and write them with `isoformat`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        custom = "conv" in kwargs
        super().__init__(*args, **kwargs)
        if not custom:
            self.decoders = DECODERS
            self.encoders = ENCODERS

    def escape(self, obj: Any, mapping: Any = None) -> str:
        """A parameter as PyMySQL writes it into a statement, the common types (a plain
        str, int, None, naive datetime) without its chain of calls (an `isinstance` test
        a type, `escape_item`, the encoder, `escape_string`: ~2 µs a value; a create
        sends about forty). Anything else, another encoder table, or a server in
        NO_BACKSLASH_ESCAPES mode: PyMySQL's own."""
        if mapping is None and self.encoders is ENCODERS and not (
                self.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES):
            cls = obj.__class__
            if cls is str:
                return "'" + obj.translate(STRING_ESCAPES) + "'"
            if cls is int:
                return str(obj)
            if obj is None:
                return "NULL"
            if cls is datetime and obj.tzinfo is None:
                return "'" + obj.isoformat(" ") + "'"
        return str(super().escape(obj, mapping))

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
