"""Formats and encodings (SPEC §4): the same rows read alike from every kind of file."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest

from app.imports import decoding, formats
from app.imports.decoding import UnreadableUpload
from app.imports.formats import ImportFormat
from tests.imports.helpers import as_csv, as_json, as_ndjson, conversation, gz, run_job

T = datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
ROWS = conversation("shop-1", T, "crch") + [
    {**r, "content": "你好，我需要帮助 " + r["content"]} for r in conversation("店铺-2", T, "cr")
]


def records(data: bytes, fmt: ImportFormat, encoding: str = "utf-8") -> list[formats.Record]:
    with decoding.open_text(lambda: io.BytesIO(data), encoding) as text:
        return list(formats.iter_records(text, fmt))


@pytest.mark.parametrize(("name", "data"), [
    ("rows.json", as_json(ROWS)),
    ("rows.ndjson", as_ndjson(ROWS)),
    ("rows.csv", as_csv(ROWS)),
    ("rows.csv", b"\xef\xbb\xbf" + as_csv(ROWS)),
    ("rows.csv", as_csv(ROWS, "gbk")),
    ("rows.ndjson", as_ndjson(ROWS).decode().encode("gbk")),
    ("rows.json.gz", gz(as_json(ROWS))),
    ("rows.csv.gz", gz(as_csv(ROWS, "gbk"))),
    (None, as_csv(ROWS)),
    (None, gz(as_ndjson(ROWS))),
    (None, as_json(ROWS)),
])
def test_every_format_and_encoding_imports_the_same_rows(runtime, name, data):
    job = run_job(runtime, data, filename=name)
    assert job.status == "succeeded", job.errors
    assert (job.total_rows, job.inserted, job.invalid, job.sessions_created) == (6, 6, 0, 2)


def test_encoding_is_detected_from_bom_bytes_and_gbk():
    utf8 = as_csv(ROWS)
    assert decoding.detect_encoding(lambda: io.BytesIO(utf8)) == "utf-8"
    assert decoding.detect_encoding(lambda: io.BytesIO(b"\xef\xbb\xbf" + utf8)) == "utf-8-sig"
    assert decoding.detect_encoding(lambda: io.BytesIO(as_csv(ROWS, "gbk"))) == "gbk"
    assert decoding.detect_encoding(lambda: io.BytesIO(gz(as_csv(ROWS, "gbk")))) == "gbk"


def test_a_gbk_character_deep_in_an_ascii_file_is_still_found():
    ascii_rows = conversation("s", T, "cr" * 3000)
    data = as_csv(ascii_rows + [{**ascii_rows[0], "content": "退款"}], "gbk")
    assert decoding.detect_encoding(lambda: io.BytesIO(data)) == "gbk"


def test_csv_lines_are_where_each_record_starts_and_bare_cr_stays_in_the_field():
    data = (b"account_id,shop_id,sender_role,content,sent_at\n"
            b'a,s,counterpart,"two\nlines",2024-01-01T00:00:00Z\n'
            b"a,s,counterpart,bare\rcarriage\rreturns,2024-01-01T00:01:00Z\n"
            b'a,s,counterpart,"three\r\nline\nquote",2024-01-01T00:02:00Z\r\n'
            b"\n"
            b"a,s,counterpart,short\n"
            b"a,s,counterpart,last,2024-01-01T00:03:00Z")
    got = records(data, ImportFormat.CSV)
    assert [r.line for r in got] == [2, 4, 5, 9, 10]
    assert got[0].fields["content"] == "two\nlines"
    assert got[1].fields["content"] == "bare\rcarriage\rreturns"
    assert got[2].fields["content"] == "three\r\nline\nquote"
    assert got[3].fields is None and "5 fields" not in (got[3].error or "x")
    assert "4 fields" in got[3].error and got[4].fields["content"] == "last"


def test_json_array_reports_the_line_of_a_malformed_element_and_goes_on():
    data = (b'[\n{"a": 1},\n{"a": 2, "b": },\n{"a": 3},\n"text",\n{"a":\n 4}\n]')
    got = records(data, ImportFormat.JSON)
    assert [(r.line, r.fields) for r in got if r.fields] == [(2, {"a": 1}), (4, {"a": 3}),
                                                              (6, {"a": 4})]
    assert [(r.line, r.error is not None) for r in got if r.fields is None] == [(3, True),
                                                                               (5, True)]


def test_json_array_read_in_small_blocks_keeps_elements_whole(monkeypatch):
    monkeypatch.setattr(decoding, "BLOCK", 7)
    monkeypatch.setattr(formats, "BLOCK", 7)
    rows = conversation("s", T, "crh" * 20)
    got = records(as_json(rows), ImportFormat.JSON)
    assert [r.fields["content"] for r in got] == [r["content"] for r in rows]
    assert [r.line for r in got] == list(range(2, 62))


def test_a_json_upload_that_is_not_an_array_is_refused_as_a_whole():
    with pytest.raises(UnreadableUpload):
        records(b'{"messages": []}', ImportFormat.JSON)


def test_undecodable_bytes_fail_only_their_row(runtime):
    good = as_ndjson(conversation("s", T, "cr"))
    bad = (b'{"account_id":"a","shop_id":"s","sender_role":"robot","content":"\xff\xfe",'
           b'"sent_at":"2024-01-01T00:00:00Z"}\n')
    job = run_job(runtime, good + bad, filename="x.ndjson", encoding="utf-8")
    assert (job.inserted, job.invalid) == (2, 1)
    assert job.errors[0].line == 3 and "not valid utf-8" in job.errors[0].error


def test_a_truncated_gzip_fails_the_job_with_a_reason(runtime):
    data = gz(as_ndjson(conversation("s", T, "cr" * 50)))[:-30]
    job = run_job(runtime, data, filename="x.ndjson.gz")
    assert job.status == "failed" and "cannot be read" in (job.detail or "")


def test_a_corrupt_gzip_fails_the_job_with_a_reason(runtime):
    data = gz(as_ndjson(conversation("s", T, "cr" * 50)))
    corrupt = data[:20] + bytes(b ^ 0xFF for b in data[20:60]) + data[60:]
    job = run_job(runtime, corrupt, filename="x.ndjson.gz")
    assert job.status == "failed" and "cannot be read" in (job.detail or "")


def test_unknown_format_option_is_a_validation_error(runtime):
    from app.errors import ValidationFailed

    with pytest.raises(ValidationFailed, match="format"):
        run_job(runtime, b"x", format="xml")
