"""The import's shortcuts give exactly what the general path gives (no database).

The chunk validates plain rows without pydantic and writes its multi-row INSERTs
itself on MariaDB, NDJSON records are counted without
decoding them, clean rows skip the per-field undecodable check, one pass over the bytes
finds the encoding and the lines, the split stages an NDJSON line's own text, and times
are bound as text. Each shortcut is compared here with the path it stands in for."""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pymysql.converters
import pytest
from pydantic import ValidationError

from app.db import UTCDateTime
from app.dbdriver import STRING_ESCAPES
from app.fastsql import STATEMENT_CHARS, core_insert, mysql_utc_text
from app.imports import chunking, decoding, formats
from app.imports.chunking import ChunkSpool, bucket_of
from app.imports.formats import ImportFormat
from app.imports.rows import ChatRow, Msg, check_msg, plain_msg, validate_row
from tests.imports.helpers import gz

TZ = ZoneInfo("Asia/Shanghai")
BASE = {"message_id": "m1", "account_id": "acc", "shop_id": "shop", "sender_role": "robot",
        "sender_id": "bot-1", "content": "hi", "sent_at": "2024-05-01T09:00:00"}


def through_pydantic(fields: dict) -> Msg | str:
    try:
        row = ChatRow.model_validate(fields, context={"tz": TZ})
    except ValidationError as exc:
        return f"invalid: {exc.error_count()}"
    return check_msg(Msg.from_row(7, row))


PLAIN = [
    BASE,
    {**BASE, "message_id": "  m2 ", "account_id": " acc ", "sender_id": None},
    {**BASE, "sender_role": " Customer ", "message_type": "", "task_type": " Complaint "},
    {**BASE, "sender_role": "staff", "message_type": "image", "session_id": "ses_1"},
    {**BASE, "sent_at": "2024-05-01T09:00:00Z", "task_type": ""},
    {**BASE, "sent_at": "2024-05-01T09:00:00.123456+02:00", "sender_id": "  "},
    {**BASE, "content": "", "session_id": ""},
]
NOT_PLAIN = [
    {k: v for k, v in BASE.items() if k != "message_id"},  # stable id computed
    {**BASE, "message_id": ""},
    {**BASE, "account_id": 12},
    {**BASE, "user_id": "u1", "account_id": None},
    {**BASE, "sender_role": None, "is_robot": "yes", "direction": "out"},
    {**BASE, "is_robot": "maybe"},  # still refused by ChatRow
    {**BASE, "sender_role": "alien"},
    {**BASE, "sent_at": "yesterday"},
    {**BASE, "sent_at": 1714554000},
    {k: v for k, v in BASE.items() if k != "sent_at"} | {"timestamp": "2024-05-01T09:00:00"},
    {**BASE, "task_type": "karaoke"},
    {**BASE, "message_type": "x" * 33},
    {**BASE, "content": 42},
    {**BASE, "content": None},
    {**BASE, "shop_id": "s" * 65},
    # bad times and strings that are not Unicode: a bad row either way, never an exception
    {**BASE, "sent_at": "0001-01-01T00:00:00+14:00"},
    {**BASE, "sent_at": "9999-12-31T23:59:59-14:00"},
    {**BASE, "sent_at": "1969-12-31T23:59:59Z"},
    {**BASE, "sent_at": "2999-01-01T00:00:00"},
    {**BASE, "sent_at": 1e300},
    {**BASE, "sent_at": -1e300},
    {**BASE, "sent_at": float("nan")},
    {**BASE, "sent_at": 10 ** 30},
    {**BASE, "content": "lone \ud800 surrogate"},
    {**BASE, "sender_id": "\udc80"},
    {**BASE, "message_id": "m\udfff"},
]


@pytest.mark.parametrize("fields", PLAIN)
def test_plain_rows_validate_exactly_as_chatrow_does(fields):
    fast = plain_msg(7, dict(fields), TZ)
    assert fast is not None
    slow = through_pydantic(dict(fields))
    assert isinstance(slow, Msg)
    assert asdict(fast) == asdict(slow)
    assert [type(v) for v in asdict(fast).values()] == [type(v) for v in asdict(slow).values()]


@pytest.mark.parametrize("fields", NOT_PLAIN)
def test_other_rows_are_left_to_chatrow(fields):
    assert plain_msg(7, dict(fields), TZ) is None
    general = validate_row(7, dict(fields), TZ)
    slow = through_pydantic(dict(fields))
    assert isinstance(general, Msg) == isinstance(slow, Msg)
    if isinstance(slow, Msg):
        assert asdict(general) == asdict(slow)  # type: ignore[arg-type]


def test_ndjson_count_matches_the_records_read():
    body = ("\ufeff" + json.dumps(BASE) + "\n\n   \n" + "{not json\n" + '"a string"\n'
            + "\ufeff\n" + json.dumps(BASE) + "\r\n" + json.dumps(BASE)).encode()
    def text() -> io.TextIOWrapper:
        return decoding.open_text(lambda: io.BytesIO(body), "utf-8")  # type: ignore[return-value]
    with text() as t:
        read = list(formats.iter_records(t, ImportFormat.NDJSON))
    with text() as t:
        assert formats.count_records(t, ImportFormat.NDJSON) == len(read) == 5


@pytest.mark.parametrize("fmt", [ImportFormat.NDJSON, ImportFormat.JSON])
def test_escaped_lone_surrogates_are_still_refused_and_pairs_accepted(fmt):
    rows = [{**BASE, "content": "bad \udc80 escape"}, {**BASE, "content": "emoji \U0001f600"},
            {**BASE, "content": "plain"}]
    lines = [json.dumps(r) for r in rows]  # ensure_ascii: \\udc80, \\ud83d\\ude00
    body = ("\n".join(lines) if fmt is ImportFormat.NDJSON
            else "[\n" + ",\n".join(lines) + "\n]").encode()
    with decoding.open_text(lambda: io.BytesIO(body), "utf-8") as t:
        read = list(formats.iter_records(t, fmt))
    assert [r.fields is None for r in read] == [True, False, False]
    assert read[1].fields["content"] == "emoji \U0001f600"


def test_staged_pieces_round_trip_and_old_pieces_still_read():
    rows = [(3, {"content": "你好", "n": 1}), (9, {"content": "line\nbreak"})]
    assert list(chunking.unpack_rows(chunking.pack_rows(rows))) == rows
    old = zlib.compress("\n".join(json.dumps([n, f], ensure_ascii=False)
                                  for n, f in rows).encode())
    assert list(chunking.unpack_rows(old)) == rows
    assert list(chunking.unpack_rows(chunking.pack_rows([]))) == []


@pytest.mark.parametrize(("data", "given", "expected"), [
    (b"a\nb\n", None, ("utf-8", True, 2)),
    (b"a\nb", None, ("utf-8", True, 2)),
    (b"", None, ("utf-8", True, 0)),
    ("\ufeff店\n铺\n\n".encode(), None, ("utf-8-sig", True, 3)),
    ("店铺\n".encode("gbk") * 3, None, ("gbk", False, 3)),
    (b"ok\n" * 30000 + "退款\n".encode("gbk"), None, ("gbk", False, 30001)),
    ("退款\n".encode("gbk"), "utf-8", ("utf-8", False, 1)),
    ("退款\n".encode(), "utf-8", ("utf-8", True, 1)),
    (b"a" + "退".encode()[:2], None, ("gbk", False, 1)),  # cut mid-character
])
def test_one_scan_finds_the_encoding_the_lines_and_whether_every_byte_decodes(
        data, given, expected):
    for body in (data, gz(data)):
        scan = decoding.scan_upload(lambda b=body: io.BytesIO(b), given)
        assert (scan.encoding, scan.clean, scan.lines) == expected
        if given is None:
            assert decoding.detect_encoding(lambda b=body: io.BytesIO(b)) == scan.encoding


def test_a_clean_scan_reads_the_same_records_and_still_refuses_escaped_surrogates():
    rows = [BASE, {**BASE, "content": "bad \udc80 escape"}, {**BASE, "content": "好"}]
    body = "\n".join(json.dumps(r) for r in rows).encode()
    read = {}
    for clean in (False, True):
        with decoding.open_text(lambda: io.BytesIO(body), "utf-8") as t:
            read[clean] = [(r.line, r.fields, r.error) for r in
                           formats.iter_records(t, ImportFormat.NDJSON, clean=clean)]
    assert read[True] == read[False]
    assert [fields is None for _, fields, _ in read[True]] == [False, True, False]


def test_the_split_stages_a_lines_own_text_only_when_it_decodes_to_the_kept_fields():
    lines = [json.dumps(BASE), json.dumps({**BASE, "Shop ID": "other"}),
             json.dumps({**BASE, "extra": "x" * 50}), json.dumps({"Account-ID": "a", **BASE})]
    with decoding.open_text(lambda: io.BytesIO("\n".join(lines).encode()), "utf-8") as t:
        records = list(formats.iter_records(t, ImportFormat.NDJSON))
    assert [r.source is not None for r in records] == [True, False, True, False]
    staged: list[str] = []
    spool = ChunkSpool(1, lambda _bucket, rows: staged.extend(rows))
    for r in records:
        spool.add(("acc", "shop"), r.line, r.fields, r.source)
    spool.flush()
    assert staged[0] == f"1\t{lines[0]}"  # the line itself, not encoded again
    unpacked = list(chunking.unpack_rows(chunking.pack_staged(staged)))
    known = [{k: v for k, v in r.fields.items() if k != "extra"} for r in records]
    assert unpacked == [(r.line, fields) for r, fields in zip(records, known, strict=True)]
    assert unpacked[1][1]["shop_id"] == "other"  # the normalised key, as the chunk reads it


def test_the_spool_writes_every_row_once_in_order_and_in_bounded_pieces():
    written: list[tuple[int, list[str]]] = []
    spool = ChunkSpool(3, lambda bucket, rows: written.append((bucket, list(rows))),
                       spool_rows=40, spool_chars=6_000, piece_chars=800)
    added: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for i in range(600):
        slot = ("acc", f"shop-{i % 7}")
        spool.add(slot, i + 1, {**BASE, "content": "x" * (i % 90)})
        added[bucket_of(slot, 3)].append(f"{i + 1}\t")
    spool.flush()
    for bucket, rows in added.items():
        staged = [row for b, piece in written if b == bucket for row in piece]
        assert [row.split("\t")[0] + "\t" for row in staged] == rows
        assert spool.rows_per_bucket[bucket] == len(rows)
    longest = max(len(row) for _, piece in written for row in piece)
    assert all(sum(map(len, piece)) < 800 + longest for _, piece in written)
    assert all(len(piece) <= 40 for _, piece in written)


@pytest.mark.parametrize("moment", [
    datetime(2024, 5, 1, 9, 0, tzinfo=UTC),
    datetime(2024, 5, 1, 9, 0, 0, 123456, tzinfo=UTC),
    datetime(2024, 5, 1, 17, 30, 5, 7, tzinfo=timezone(timedelta(hours=8))),
    datetime(2024, 11, 3, 1, 30, tzinfo=ZoneInfo("America/New_York")),
    datetime(999, 1, 1, tzinfo=UTC),
])
def test_times_are_bound_as_the_literal_pymysql_would_send(moment):
    naive_utc = UTCDateTime().process_bind_param(moment, None)
    assert naive_utc is not None
    literal = pymysql.converters.escape_datetime(naive_utc).strip("'")
    text = mysql_utc_text(moment)
    assert text is not None and datetime.fromisoformat(text) == datetime.fromisoformat(literal)
    assert mysql_utc_text(None) is None
    with pytest.raises(ValueError):
        mysql_utc_text(moment.replace(tzinfo=None))


HOSTILE_TEXT = ["", "plain", "it's \"quoted\"", "back\\slash \\' \\\\", "nul \0 ctrl \x1a \r\n",
                "100% %s %(name)s %%", "长 emoji \U0001f600", "'); DROP TABLE messages; --",
                "".join(chr(i) for i in range(1, 300))]


@pytest.mark.parametrize("text", HOSTILE_TEXT)
def test_strings_are_escaped_as_pymysql_escapes_them(text):
    assert text.translate(STRING_ESCAPES) == pymysql.converters.escape_string(text)


def test_the_written_out_insert_stores_what_executemany_stores(runtime):
    """On MariaDB the import writes its multi-row INSERT itself (`_mysql_insert`); the
    rows stored are those PyMySQL's executemany stores, whatever the values hold, and
    no statement holds more rows than the batch or more than STATEMENT_CHARS."""
    if runtime.database.dialect != "mysql":
        pytest.skip("the written-out INSERT is MySQL's (PyMySQL) path")
    from sqlalchemy import event, select

    from app.imports.models import ImportChunkPart, ImportJob
    from app.imports.service import ImportService

    job = ImportService(runtime).create_job(io.BytesIO(b"{}\n"), filename="x.ndjson")
    values = [{"job_pk": None, "bucket": i % 3 - 1, "seq": i, "row_count": i * 1000,
               "payload": (text.encode("utf-8") + bytes(range(256)) * (i % 2))}
              for i, text in enumerate(HOSTILE_TEXT * 3)]
    big = "x" * (STATEMENT_CHARS // 3)
    values += [{"job_pk": None, "bucket": 9, "seq": 100 + i, "row_count": 0,
                "payload": big.encode()} for i in range(7)]
    statements: list[tuple[int, int]] = []

    def seen(_conn, _cursor, statement, _parameters, _context, _many):  # type: ignore[no-untyped-def]
        if statement.startswith("INSERT INTO import_chunk_parts"):
            statements.append((statement.count("),(") + 1, len(statement)))

    with runtime.database.unit_of_work() as uow:
        job_pk = uow.session.execute(select(ImportJob.id).where(
            ImportJob.job_id == job.job_id)).scalar_one()
        for row in values:
            row["job_pk"] = job_pk
        event.listen(runtime.database.engine, "before_cursor_execute", seen)
        try:
            core_insert(uow.session, ImportChunkPart, values, batch=4)
        finally:
            event.remove(runtime.database.engine, "before_cursor_execute", seen)
        uow.commit()
    with runtime.database.read() as db:
        stored = db.execute(select(ImportChunkPart.bucket, ImportChunkPart.seq,
                                   ImportChunkPart.row_count, ImportChunkPart.payload)
                            .order_by(ImportChunkPart.seq)).all()
    assert [tuple(r) for r in stored] == [
        (v["bucket"], v["seq"], v["row_count"], v["payload"]) for v in values]
    assert max(rows for rows, _ in statements) == 4, statements
    assert all(chars < STATEMENT_CHARS + 4096 for _, chars in statements)
    assert len(statements) > len(values) / 4  # the big payloads went two a statement

    from app.messages.models import Message
    from app.sessions.models import Session

    with runtime.database.unit_of_work() as uow:
        session = Session(session_id="ses_x", account_id="a", shop_id="s",
                          session_type="AUTO_BARGAIN", task_type="negotiation", priority=3,
                          status="COMPLETED", origin="import", created_at=datetime.now(UTC),
                          requested_at=datetime.now(UTC), last_activity_at=datetime.now(UTC),
                          message_count=0, robot_message_count=0, human_message_count=0,
                          counterpart_message_count=0, unanswered=False)
        uow.session.add(session)
        uow.session.flush()
        moment = datetime(2024, 5, 1, 17, 30, 5, 7, tzinfo=timezone(timedelta(hours=8)))
        core_insert(uow.session, Message, [
            {"message_id": f"m{i}\\'", "session_pk": session.id, "account_id": "a",
             "shop_id": "s", "sender_role": "robot", "sender_id": None, "content": text,
             "message_type": "text", "sent_at": moment, "received_at": moment,
             "import_job_id": None} for i, text in enumerate(HOSTILE_TEXT)], batch=100)
        uow.commit()
    with runtime.database.read() as db:
        messages = db.execute(select(Message).order_by(Message.id)).scalars().all()
    assert [m.content for m in messages] == HOSTILE_TEXT
    assert [m.message_id for m in messages] == [f"m{i}\\'" for i in range(len(HOSTILE_TEXT))]
    assert {m.sent_at for m in messages} == {moment.astimezone(UTC)}
    assert all(m.sender_id is None for m in messages)
