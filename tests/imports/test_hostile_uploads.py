"""Hostile uploads (SPEC §4 "Limits", §8 "Bad input"), generated here and run through
the real pipeline: a gzip bomb stops at MAX_UPLOAD_EXPANDED_BYTES with nothing kept, an
upload past MAX_UPLOAD_BYTES is a 413 whatever its shape, a row nested too deep, with a
time outside 1970-01-01 … now + 1 day or a string that is not valid Unicode is one bad
row reported with its line, a document nobody can parse fails its job — which always
ends, its staged data deleted — and memory stays bounded while it all happens."""

from __future__ import annotations

import io
import itertools
import json
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from app.errors import UploadTooLarge
from app.imports import formats
from app.imports.lifecycle import MAX_CHUNK_ATTEMPTS
from app.imports.models import ImportChunk, ImportJob, ImportUploadPart
from app.imports.service import ImportService
from app.manager import AutoSessionManager
from app.sessions.models import Session
from tests.imports.helpers import (
    as_csv,
    as_json,
    as_ndjson,
    conversation,
    gzip_of_repeated,
    message_count,
    row,
    run_job,
    staged_left,
    stored_by_job,
)

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
GOOD = conversation("s1", T0, "crchr") + conversation("s2", T0 + timedelta(hours=1), "crc")


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python allocations made inside the block (bytes), in `box[0]`."""
    box = [0]
    tracemalloc.start()
    try:
        yield box
    finally:
        box[0] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


def session_count(runtime: Any) -> int:
    with runtime.database.read() as db:
        return db.execute(select(func.count()).select_from(Session)).scalar_one()


def nested_array(depth: int, inner: str = "1") -> str:
    return "[" * depth + inner + "]" * depth


def nested_object(depth: int, inner: str = "1") -> str:
    return '{"a": ' * depth + inner + "}" * depth


def assert_ended_and_cleaned(runtime: Any, job_id: str) -> None:
    view = ImportService(runtime).get(job_id)
    assert view.finished, view
    assert staged_left(runtime, job_id) == (0, 0)


# ---- decompressed size: gzip bombs ----------------------------------------------------------
ROW_LINE = (json.dumps(GOOD[0]) + "\n").encode()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("block", [b"\0" * (1 << 20), ROW_LINE * ((1 << 20) // len(ROW_LINE))],
                         ids=["zeros", "rows"])
def test_a_gzip_bomb_fails_its_job_at_the_expanded_limit_and_nothing_is_kept(runtime, block):
    runtime.settings.max_upload_expanded_bytes = 8 << 20  # a broken limit fails, not the box
    bomb = gzip_of_repeated(block, 320 << 20)  # 320 MiB once inflated
    assert len(bomb) < 2 << 20
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(bomb), filename="history.ndjson.gz")
    with peak_memory() as peak:
        outcome = service.prepare(job.job_id)  # splitting alone: a broken limit fails fast
    view = service.get(job.job_id)
    assert outcome.chunk_pks == [] and view.status == "failed", view
    assert "MAX_UPLOAD_EXPANDED_BYTES" in (view.detail or "")
    assert peak[0] < 32 << 20, f"peak {peak[0] >> 20} MiB while reading a bomb"
    assert (message_count(runtime), session_count(runtime)) == (0, 0)
    assert_ended_and_cleaned(runtime, job.job_id)
    assert service.finish(job.job_id).status == "failed"  # a late finish changes nothing


def test_an_upload_just_under_the_expanded_limit_is_imported(runtime):
    body = as_ndjson(GOOD)
    runtime.settings.max_upload_expanded_bytes = len(body)
    job = run_job(runtime, gzip_of_repeated(body, len(body)), filename="x.ndjson.gz")
    assert (job.status, job.inserted) == ("succeeded", len(GOOD))
    runtime.settings.max_upload_expanded_bytes = len(body) - 1
    job = run_job(runtime, gzip_of_repeated(body, len(body)), filename="y.ndjson.gz")
    assert job.status == "failed" and "MAX_UPLOAD_EXPANDED_BYTES" in (job.detail or "")


# ---- size on the wire: 413 -----------------------------------------------------------------
def _wire_bodies(body: bytes) -> Iterator[tuple[str, dict[str, Any]]]:
    """The same export sent every way an upload can come: raw, multipart, and both
    without a Content-Length (chunked), which only counting while streaming can stop."""
    boundary, multipart = encode_multipart(
        MultiDict({"file": FileStorage(io.BytesIO(body), "history.ndjson")}))
    multipart_type = f"multipart/form-data; boundary={boundary}"
    yield "raw", {"data": body, "content_type": "application/x-ndjson"}
    yield "multipart", {"data": {"file": (io.BytesIO(body), "history.ndjson")},
                        "content_type": "multipart/form-data"}
    chunked = {"environ_overrides": {"wsgi.input_terminated": True},
               "headers": {"Transfer-Encoding": "chunked"}}
    yield "raw chunked", {**chunked, "input_stream": io.BytesIO(body),
                          "content_type": "application/x-ndjson"}
    yield "multipart chunked", {**chunked, "input_stream": io.BytesIO(multipart),
                                "content_type": multipart_type}


def _post(caller: Any, path: str, how: dict[str, Any]) -> Any:
    how = dict(how)
    headers = caller.headers(how.pop("headers", {}))
    return caller.http.post(path, headers=headers, **how)


@pytest.mark.parametrize("path", ["/api/v1/imports", "/admin/api/imports"])
def test_an_upload_past_max_upload_bytes_is_413_in_every_shape_and_nothing_is_kept(
        admin, runtime, path):
    runtime.settings.max_upload_bytes = 256 << 10
    body = as_ndjson(GOOD * 2000)  # ~3 MB
    assert len(body) > 4 * runtime.settings.max_upload_bytes
    for shape, how in _wire_bodies(body):
        answer = _post(admin, path, how)
        assert answer.status_code == 413, (shape, answer.get_data(as_text=True)[:300])
        assert answer.mimetype == "application/problem+json", shape
        problem = answer.get_json()
        assert problem["status"] == 413 and "MAX_UPLOAD_BYTES" in problem["detail"], shape
    with runtime.database.read() as db:
        assert db.execute(select(func.count()).select_from(ImportJob)).scalar_one() == 0
        assert db.execute(select(func.count()).select_from(ImportUploadPart)).scalar_one() == 0


@pytest.mark.parametrize("path", ["/api/v1/imports", "/admin/api/imports"])
def test_an_upload_under_max_upload_bytes_is_accepted_in_every_shape(admin, runtime, path):
    body = as_ndjson(GOOD)
    runtime.settings.max_upload_bytes = len(body) + 4096  # room for the multipart framing
    runtime.settings.max_request_bytes = 1024  # other bodies' bound does not apply here
    for shape, how in _wire_bodies(body):
        answer = _post(admin, path, how)
        assert answer.status_code == 202, (shape, answer.get_data(as_text=True)[:300])
    from tasks.imports import wait_eager

    for job in ImportService(runtime).list():
        wait_eager(job.job_id, 60)


def test_a_stream_without_end_is_cut_at_max_upload_bytes(runtime):
    class Endless(io.RawIOBase):
        read_so_far = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            buffer[:] = b"{" * len(buffer)
            self.read_so_far += len(buffer)
            return len(buffer)

    endless = Endless()
    with pytest.raises(UploadTooLarge) as refused:
        ImportService(runtime).create_job(io.BufferedReader(endless), max_bytes=3 << 20)
    assert refused.value.status == 413
    assert endless.read_so_far <= 5 << 20  # it stopped reading, it did not drain the stream
    with runtime.database.read() as db:
        assert db.execute(select(func.count()).select_from(ImportJob)).scalar_one() == 0


# ---- depth ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["ndjson", "json"])
def test_rows_nested_too_deep_are_bad_rows_with_their_line(runtime, shape):
    bad = [
        nested_array(100_000),                                          # parser's limit
        '{"account_id": "acc-1", "shop_id": "s9", "content": ' + nested_object(100_000) + "}",
        json.dumps({**GOOD[0], "message_id": "deep-40", "content": json.loads(nested_array(40))}),
        json.dumps({**GOOD[1], "message_id": "deep-x", "extra": json.loads(nested_object(60))}),
    ]
    good = [json.dumps(r) for r in GOOD]
    lines = good[:2] + bad[:2] + good[2:5] + bad[2:] + good[5:]
    if shape == "ndjson":
        data, first_line = "\n".join(lines).encode(), 1
    else:
        data, first_line = ("[\n" + ",\n".join(lines) + "\n]\n").encode(), 2
    expected_bad = [first_line + i for i, text in enumerate(lines) if text in bad]
    job = run_job(runtime, data, filename=f"deep.{shape}")
    assert job.status == "partially_succeeded", job
    assert (job.inserted, job.invalid, job.total_rows) == (len(GOOD), 4, len(lines))
    assert [e.line for e in job.errors] == expected_bad
    assert all("nested deeper than 32 levels" in e.error for e in job.errors), job.errors
    assert_ended_and_cleaned(runtime, job.job_id)


@pytest.mark.parametrize(("document", "reason"), [
    (nested_array(100_000), "line 1: nested deeper than 32 levels"),  # one element, no row
    ("[" * 100_000, "nested deeper than 32 levels and does not end"),  # never closed
    ("[" + nested_array(100_000) + ", {}", "not closed"),              # deep, then truncated
    (nested_object(100_000), "line 1: nested deeper than 32 levels"),  # NDJSON: one bad line
], ids=["deep-array", "unclosed", "deep-then-truncated", "deep-object"])
def test_a_document_too_deep_to_read_fails_its_job_which_ends(runtime, document, reason):
    job = run_job(runtime, document.encode(), filename="history.json"
                  if document.startswith("[") else "history.ndjson")
    assert job.status == "failed", job
    assert reason in (job.detail or ""), job.detail
    assert (message_count(runtime), session_count(runtime)) == (0, 0)
    assert_ended_and_cleaned(runtime, job.job_id)


def test_a_deep_document_through_the_tasks_ends_failed(runtime):
    from tasks import imports as tasks
    from tasks.celery_app import celery

    if not celery.conf.task_always_eager:
        pytest.skip("runs the pipeline in-process (embedded default)")
    service = ImportService(runtime)
    for document, name in ((nested_array(100_000), "a.json"), (nested_object(100_000), "b.ndjson")):
        job = service.create_job(io.BytesIO(document.encode()), filename=name)
        runtime.dispatcher.start_import(job.job_id)
        tasks.wait_eager(job.job_id, timeout=60)
        assert service.get(job.job_id).status == "failed"
        assert_ended_and_cleaned(runtime, job.job_id)


def test_a_split_that_raises_anything_fails_its_job_with_the_reason(runtime, monkeypatch):
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(formats, "iter_records", broken)
    job = run_job(runtime, as_json(GOOD), filename="x.json")
    assert job.status == "failed" and "parser exploded" in (job.detail or "")
    assert_ended_and_cleaned(runtime, job.job_id)


# ---- bad times and strings that are not Unicode, among good rows ---------------------------
FAR_EPOCHS = st.one_of(
    st.floats(max_value=-1.0),                   # before 1970 (and -inf)
    st.floats(min_value=2e9, max_value=1e11),    # seconds after 2033
    st.floats(min_value=2e12),                   # milliseconds after 2033 (and inf, 1e300)
    st.just(float("nan")),
    st.integers(min_value=-(10 ** 300), max_value=-1),
    st.integers(min_value=2 * 10 ** 12, max_value=10 ** 300),
)
EDGE_DATES = st.builds(
    lambda year, month, day, hour, offset: f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:00:00"
                                           + offset,
    st.sampled_from([1, 9999]), st.integers(1, 12), st.integers(1, 28), st.integers(0, 23),
    st.sampled_from(["", "Z", "+14:00", "-14:00", "+23:59", "-23:59", "+05:30"]),
)
SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)


@st.composite
def bad_row(draw: st.DrawFn, account: str) -> tuple[dict[str, Any], str]:
    """A row that is bad in one way, and the word its error must contain."""
    base = row("s-bad", "robot", T0, "bad one", account=account)
    kind = draw(st.sampled_from(["epoch", "date", "surrogate"]))
    if kind == "epoch":
        return {**base, "sent_at": draw(FAR_EPOCHS)}, "sent_at"
    if kind == "date":
        return {**base, "sent_at": draw(EDGE_DATES)}, "sent_at"
    field = draw(st.sampled_from(["content", "sender_id", "message_id", "shop_id"]))
    return {**base, field: "x" + draw(SURROGATES) + "y"}, "Unicode"


_examples = itertools.count()


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_times_and_lone_surrogates_are_each_one_bad_row(runtime, data):
    account = f"acc-{next(_examples)}"  # every example stores rows of its own
    good = [{**r, "account_id": account} for r in GOOD]
    bad = data.draw(st.lists(bad_row(account), min_size=1, max_size=6))
    rows: list[Any] = list(good)
    for bad_r, _word in bad:
        rows.insert(data.draw(st.integers(0, len(rows))), bad_r)
    shape = data.draw(st.sampled_from(["ndjson", "json"]))
    lines = [json.dumps(r) for r in rows]  # escaped: a lone surrogate is spelt \udXXX
    text = ("\n".join(lines) if shape == "ndjson" else "[\n" + ",\n".join(lines) + "\n]"
            ).encode()
    first_line = 1 if shape == "ndjson" else 2
    job = run_job(runtime, text, filename=f"x.{shape}")
    expected = {first_line + i: word for i, r in enumerate(rows)
                for bad_r, word in bad if r is bad_r}
    assert job.status == "partially_succeeded", job
    assert (job.inserted, job.invalid, job.total_rows) == (len(good), len(bad), len(rows))
    assert {e.line for e in job.errors} == set(expected)
    for error in job.errors:
        assert expected[error.line] in error.error, (error, rows[error.line - first_line])
    assert stored_by_job(runtime, job.job_id) == len(good)
    assert_ended_and_cleaned(runtime, job.job_id)


@pytest.mark.parametrize("sent_at", [
    "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00",
    "1969-12-31T23:59:59Z", "2999-01-01T00:00:00Z",
])
def test_csv_rows_at_the_ends_of_the_calendar_are_bad_rows(runtime, sent_at):
    rows = GOOD[:3] + [row("s1", "robot", T0, "edge", sent_at=sent_at)] + GOOD[3:]
    job = run_job(runtime, as_csv(rows), filename="x.csv")
    assert (job.status, job.inserted, job.invalid) == ("partially_succeeded", len(GOOD), 1)
    assert job.errors[0].line == 5 and "sent_at" in job.errors[0].error


def test_the_python_api_takes_bad_times_and_strings_as_bad_rows(runtime):
    manager = AutoSessionManager(runtime)
    rows = [{**r, "account_id": "py"} for r in GOOD[:3]]
    result = manager.process_chat_messages([
        rows[0], {**rows[1], "message_id": "t1", "sent_at": 1e300},
        {**rows[1], "message_id": "t2", "sent_at": "0001-01-01T00:00:00+14:00"},
        {**rows[1], "message_id": "t3", "content": "\ud800"}, rows[1], rows[2],
    ])
    assert (result.inserted, result.invalid) == (3, 3)
    assert sorted(e.line for e in result.errors) == [2, 3, 4]


# ---- CSV bombs -----------------------------------------------------------------------------
def test_csv_bombs_are_bounded_bad_records_and_the_rows_around_them_are_stored(runtime):
    text = as_csv(GOOD).decode().splitlines()
    header, good = text[0], text[1:]
    width = header.count(",") + 1
    bombs = [
        "acc-1,s1,robot,r," + "y" * (8 << 20) + ",2024-05-01T09:00:00+00:00",  # 8 MiB line
        'acc-1,s1,robot,r,"' + "q" * 300_000 + '",2024-05-01T09:00:00+00:00',  # huge field
        "," * 400_000,                                                         # 400k columns
    ]
    lines = [header, *good[:3], *bombs, *good[3:]]
    data = ("\n".join(lines) + "\n").encode()
    del lines, bombs
    with peak_memory() as peak:
        job = run_job(runtime, data, filename="bomb.csv")
    assert peak[0] < 48 << 20, f"peak {peak[0] >> 20} MiB for a {len(data) >> 20} MiB CSV bomb"
    assert (job.status, job.inserted, job.invalid) == ("partially_succeeded", len(GOOD), 3)
    assert [e.line for e in job.errors] == [5, 6, 7]
    assert "longer than" in job.errors[0].error and "field" in job.errors[1].error
    assert f"header has {width}" in job.errors[2].error
    assert_ended_and_cleaned(runtime, job.job_id)


def test_a_csv_record_spanning_megabytes_of_quoted_lines_is_bounded(runtime):
    good = as_csv(GOOD).decode()
    spanning = "acc-1,s1,robot,r," + ",".join(['"a\nb"'] * 400_000) + "\n"  # ~2.7 MiB record
    data = (good + spanning).encode()
    with peak_memory() as peak:
        job = run_job(runtime, data, filename="span.csv")
    assert peak[0] < 64 << 20, f"peak {peak[0] >> 20} MiB"
    assert job.inserted == len(GOOD) and job.invalid >= 1
    assert job.errors[0].line == len(GOOD) + 2 and "longer than" in job.errors[0].error
    assert_ended_and_cleaned(runtime, job.job_id)


def test_a_csv_header_with_too_many_columns_fails_its_job(runtime):
    data = (",".join(f"c{i}" for i in range(100_000)) + "\n" + "x\n").encode()
    job = run_job(runtime, data, filename="wide.csv")
    assert job.status == "failed" and "at most 1000" in (job.detail or "")
    assert_ended_and_cleaned(runtime, job.job_id)


# ---- every job ends ------------------------------------------------------------------------
def test_a_chunk_attempted_too_often_fails_and_the_job_ends(runtime):
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(as_ndjson(GOOD)), filename="x.ndjson")
    (chunk_pk,) = service.prepare(job.job_id).chunk_pks
    with runtime.database.unit_of_work() as uow:  # as if it had died that often
        uow.session.execute(update(ImportChunk).where(ImportChunk.id == chunk_pk)
                            .values(attempts=MAX_CHUNK_ATTEMPTS))
        uow.commit()
    assert service.process_chunk(chunk_pk) is None
    view = service.finish(job.job_id)
    assert view.status == "failed" and view.invalid == len(GOOD)
    assert "gave up after" in view.errors[0].error
    assert message_count(runtime) == 0
    assert_ended_and_cleaned(runtime, job.job_id)


def test_a_chunk_that_always_raises_fails_and_the_job_ends_through_the_tasks(
        runtime, monkeypatch):
    from app.imports import chunks as chunks_module
    from tasks import imports as tasks
    from tasks.celery_app import celery

    if not celery.conf.task_always_eager:
        pytest.skip("runs the pipeline in-process (embedded default)")

    def explode(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("something nobody expected")

    monkeypatch.setattr(chunks_module, "import_messages", explode)
    service = ImportService(runtime)
    job = service.create_job(io.BytesIO(as_ndjson(GOOD)), filename="x.ndjson")
    runtime.dispatcher.start_import(job.job_id)
    tasks.wait_eager(job.job_id, timeout=60)
    view = service.get(job.job_id)
    assert view.status == "failed" and "KeyError" in view.errors[0].error
    assert_ended_and_cleaned(runtime, job.job_id)


def test_staged_data_is_deleted_however_the_job_ends(runtime):
    succeeded = run_job(runtime, as_ndjson(GOOD), filename="a.ndjson")
    partial = run_job(runtime, as_ndjson(GOOD) + b"not json\n", filename="b.ndjson")
    unreadable = run_job(runtime, b"[1, 2", filename="c.json")
    empty = run_job(runtime, b"account_id,shop_id\n", filename="d.csv")
    assert [j.status for j in (succeeded, partial, unreadable, empty)] == [
        "succeeded", "partially_succeeded", "failed", "failed"]
    for job in (succeeded, partial, unreadable, empty):
        assert_ended_and_cleaned(runtime, job.job_id)
