"""The import's shortcuts give exactly what the general path gives (no database).

The chunk validates plain rows without pydantic, NDJSON records are counted without
decoding them, clean rows skip the per-field undecodable check, and staged pieces are
one JSON array. Each shortcut is compared here with the path it stands in for."""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import asdict
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from app.imports import formats
from app.imports.formats import ImportFormat
from app.imports.grouping import Msg, check_msg, plain_msg, validate_row
from app.imports.rows import ChatRow

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
        return formats.open_text(lambda: io.BytesIO(body), "utf-8")  # type: ignore[return-value]
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
    with formats.open_text(lambda: io.BytesIO(body), "utf-8") as t:
        read = list(formats.iter_records(t, fmt))
    assert [r.fields is None for r in read] == [True, False, False]
    assert read[1].fields["content"] == "emoji \U0001f600"


def test_staged_pieces_round_trip_and_old_pieces_still_read():
    rows = [(3, {"content": "你好", "n": 1}), (9, {"content": "line\nbreak"})]
    assert list(formats.unpack_rows(formats.pack_rows(rows))) == rows
    old = zlib.compress("\n".join(json.dumps([n, f], ensure_ascii=False)
                                  for n, f in rows).encode())
    assert list(formats.unpack_rows(old)) == rows
    assert list(formats.unpack_rows(formats.pack_rows([]))) == []
