"""SPEC §4 step 4 a–c: threads, reply chains and the gap rule, with the upload's options."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time

from app.errors import ValidationFailed
from app.imports.pages import PageLimits
from app.imports.rows import Msg
from app.imports.segmenting import GroupingOptions, segment_slot, split_at_gaps
from app.imports.service import ImportService
from app.sessions.enums import SenderRole
from tests.imports.helpers import (
    as_csv,
    as_json,
    as_ndjson,
    message_count,
    messages_of,
    row,
    run_job,
    sessions_of,
)

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=10)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def imported(runtime, rows, *, fmt=as_ndjson, filename="t.ndjson", now=LATER, **options):
    with freeze_time(now):
        return run_job(runtime, fmt(rows), filename=filename, **options)


def grouped(runtime, shop="s") -> list[tuple[str | None, list[str]]]:
    """(started_by, message ids in time order) of each session of the slot."""
    return [(s.started_by, [m.message_id for m in messages_of(runtime, s.id)])
            for s in sessions_of(runtime, shop)]


def two_threads_interleaved(reply_field="reply_to", thread_field="thread_id"):
    """Two conversations on one slot, interleaved minute by minute over three hours (the
    gap rule sees one), the second linked by replies, the first by a thread key."""
    rows = []
    for i in range(6):
        rows.append(row("s", "counterpart", at(i * 40), message_id=f"a{i}",
                        **{thread_field: "T-1"}))
        rows.append(row("s", "human", at(i * 40 + 1), message_id=f"b{i}",
                        **({reply_field: f"b{i - 1}"} if i else {})))
    return rows


@pytest.mark.parametrize("fmt,filename", [(as_ndjson, "t.ndjson"), (as_json, "t.json"),
                                          (as_csv, "t.csv")])
@pytest.mark.parametrize("reply_field,thread_field", [
    ("reply_to", "thread_id"), ("in_reply_to", "conversation_id"),
    ("in_response_to", "thread")])
def test_threads_and_reply_chains_in_every_format_and_alias(runtime, fmt, filename,
                                                             reply_field, thread_field):
    job = imported(runtime, two_threads_interleaved(reply_field, thread_field), fmt=fmt,
                   filename=filename)
    assert (job.inserted, job.invalid, job.sessions_created) == (12, 0, 2)
    assert sorted(grouped(runtime)) == [
        ("reply", [f"b{i}" for i in range(6)]),
        ("thread", [f"a{i}" for i in range(6)]),
    ]
    thread = next(s for s in sessions_of(runtime, "s") if s.started_by == "thread")
    assert thread.thread_id == "T-1" and thread.message_count == 6


def test_without_threading_fields_the_same_rows_follow_the_gap_rule(runtime):
    rows = [{k: v for k, v in r.items() if k not in ("reply_to", "thread_id")}
            for r in two_threads_interleaved()]
    job = imported(runtime, rows)
    assert job.sessions_created == 6  # 40-minute steps: every step is past the 30-min gap
    assert {s.started_by for s in sessions_of(runtime, "s")} == {"gap"}


def test_grouping_gap_ignores_threading_fields(runtime):
    job = imported(runtime, two_threads_interleaved(), grouping="gap")
    assert (job.grouping, job.sessions_created) == ("gap", 6)
    assert {s.started_by for s in sessions_of(runtime, "s")} == {"gap"}
    assert all(s.thread_id is None for s in sessions_of(runtime, "s"))


def test_grouping_threads_leaves_an_unlinked_row_a_conversation_of_its_own(runtime):
    rows = two_threads_interleaved() + [
        row("s", "counterpart", at(300), message_id="lone-1"),
        row("s", "counterpart", at(301), message_id="lone-2")]
    job = imported(runtime, rows, grouping="threads")
    assert job.sessions_created == 4
    auto = imported(runtime, [row("s2", "counterpart", at(300), message_id="x1"),
                              row("s2", "counterpart", at(301), message_id="x2")])
    assert auto.sessions_created == 1  # auto: the gap rule joins them


def test_a_reply_to_an_unknown_message_is_no_error_and_falls_back_to_the_gap_rule(runtime):
    rows = [row("s", "counterpart", at(0), message_id="m1", reply_to="nowhere"),
            row("s", "robot", at(1), message_id="m2", reply_to="nowhere-either"),
            row("s", "counterpart", at(120), message_id="m3", reply_to="gone")]
    job = imported(runtime, rows)
    assert (job.invalid, job.sessions_created) == (0, 2)
    assert grouped(runtime) == [("gap", ["m1", "m2"]), ("gap", ["m3"])]


def test_reply_chains_branch_and_follow_parents_out_of_time_order(runtime):
    rows = [row("s", "counterpart", at(0), message_id="root"),
            row("s", "human", at(300), message_id="r1", reply_to="root"),
            row("s", "counterpart", at(900), message_id="r2", reply_to="r1"),
            row("s", "human", at(901), message_id="r3", reply_to="r1"),  # a branch
            # its parent comes later in the file and earlier in time than itself
            row("s", "counterpart", at(2000), message_id="r4", reply_to="r3"),
            row("s", "counterpart", at(950), message_id="other")]
    imported(runtime, list(reversed(rows)))
    assert grouped(runtime) == [("reply", ["root", "r1", "r2", "r3", "r4"]),
                                ("gap", ["other"])]


def test_a_reply_to_a_message_of_an_earlier_upload_joins_its_session(runtime):
    imported(runtime, [row("s", "counterpart", at(0), message_id="q"),
                       row("s", "human", at(2), message_id="a")])
    (first,) = sessions_of(runtime, "s")
    later = imported(runtime, [
        row("s", "counterpart", at(3000), message_id="q2", reply_to="a"),
        row("s", "human", at(3001), message_id="a2", reply_to="q2"),
        row("s", "counterpart", at(3002), message_id="new")])
    assert (later.sessions_created, later.sessions_updated) == (1, 1)
    assert grouped(runtime) == [("gap", ["q", "a", "q2", "a2"]), ("gap", ["new"])]
    (session, _) = sessions_of(runtime, "s")
    assert session.session_id == first.session_id
    assert session.message_count == 4 and session.last_message_at == at(3001)


def test_a_reply_to_a_message_of_another_slot_is_not_followed(runtime):
    imported(runtime, [row("other", "counterpart", at(0), message_id="p")])
    imported(runtime, [row("s", "human", at(2), message_id="c", reply_to="p")])
    assert grouped(runtime) == [("gap", ["c"])]
    assert len(sessions_of(runtime, "other")) == 1


def test_a_thread_continued_by_a_later_upload_joins_its_session(runtime):
    imported(runtime, [row("s", "counterpart", at(0), message_id="t1", thread_id="T")])
    job = imported(runtime, [row("s", "human", at(2880), message_id="t2", thread_id="T"),
                             row("s", "counterpart", at(2881), message_id="u1",
                                 thread_id="U")])
    assert (job.sessions_created, job.sessions_updated) == (1, 1)
    assert grouped(runtime) == [("thread", ["t1", "t2"]), ("thread", ["u1"])]


def test_a_session_id_keeps_its_rows_and_replies_join_them(runtime):
    imported(runtime, [row("s", "counterpart", at(0), message_id="p1")])
    (stored,) = sessions_of(runtime, "s")
    imported(runtime, [row("s", "human", at(500), message_id="p2",
                           session_id=stored.session_id),
                       row("s", "counterpart", at(900), message_id="p3", reply_to="p2")])
    assert grouped(runtime) == [("gap", ["p1", "p2", "p3"])]


def test_threading_fields_are_validated_like_the_other_fields(runtime):
    rows = [row("s", "counterpart", at(0), message_id="ok", thread_id=7, reply_to=12),
            row("s", "counterpart", at(1), message_id="long", thread_id="x" * 129),
            row("s", "counterpart", at(2), message_id="nested", reply_to={"id": 1}),
            row("s", "counterpart", at(3), message_id="flag", in_reply_to=True)]
    job = imported(runtime, rows)
    assert job.inserted == 1 and job.invalid == 3
    errors = {e.line: e.error for e in job.errors}
    assert "thread_id" in errors[2] and "128" in errors[2]
    assert errors[3].startswith("reply_to") and errors[4].startswith("in_reply_to")
    assert grouped(runtime) == [("thread", ["ok"])]
    assert sessions_of(runtime, "s")[0].thread_id == "7"


def test_a_re_upload_of_a_threaded_export_changes_nothing(runtime):
    rows = two_threads_interleaved()
    first = imported(runtime, rows)
    again = imported(runtime, rows)
    assert (again.inserted, again.duplicates, again.sessions_created,
            again.sessions_updated) == (0, first.inserted, 0, 0)
    assert message_count(runtime) == 12 and len(sessions_of(runtime, "s")) == 2


def test_the_uploads_session_gap_replaces_the_setting(runtime):
    rows = [row("s", "counterpart", at(0)), row("s", "robot", at(45)),
            row("s", "counterpart", at(200))]
    job = imported(runtime, rows, session_gap=3600)
    assert (job.session_gap, job.grouping, job.review) == (3600, "auto", False)
    assert [len(ids) for _, ids in grouped(runtime)] == [2, 1]
    default = imported(runtime, [dict(r, shop_id="d") for r in rows])
    assert default.session_gap == runtime.settings.session_gap == 1800
    assert len(sessions_of(runtime, "d")) == 3


def test_grouping_options_are_checked_naming_the_option(runtime):
    service = ImportService(runtime)
    for options, name in [({"session_gap": 0}, "session_gap"),
                          ({"grouping": "topics"}, "grouping"),
                          ({"review": True}, "review")]:  # no endpoint configured
        with pytest.raises(ValidationFailed) as caught:
            service.create_job(io.BytesIO(b"{}\n"), **options)
        assert [e["field"] for e in caught.value.extra["errors"]] == [name]


def test_a_thread_longer_than_a_page_stays_one_session(runtime):
    """A chunk too big for one transaction is stored in pages (flat memory); a thread's
    later pages find its session by its thread_id, a chain's by the stored parent."""
    rows = []
    for i in range(60):
        rows.append(row("s", "counterpart" if i % 2 else "human", at(i * 45),
                        message_id=f"t{i}", thread_id="T"))
        rows.append(row("s", "counterpart", at(i * 45 + 1), message_id=f"r{i}",
                        **({"reply_to": f"r{i - 1}"} if i else {})))
    service = ImportService(runtime, page_limits=PageLimits(
        run_rows=25, page_rows=10, hard_rows=20, piece_rows=7, read_rows=13))
    with freeze_time(LATER):
        job = service.create_job(io.BytesIO(as_ndjson(rows)), filename="p.ndjson")
        for pk in service.prepare(job.job_id).chunk_pks:
            service.process_chunk(pk)
        job = service.finish(job.job_id)
    assert (job.inserted, job.invalid) == (120, 0)
    assert sorted((by, len(ids)) for by, ids in grouped(runtime)) == [("reply", 60),
                                                                      ("thread", 60)]


def test_the_pipeline_is_exactly_the_gap_rule_without_threading_fields():
    msgs = [Msg(i, f"m{i}", "a", "s", SenderRole.COUNTERPART, None, "x", "text",
                at(minutes), None, None)
            for i, minutes in enumerate([0, 5, 40, 41, 100, 200, 229, 260])]
    options = GroupingOptions(session_gap=1800)
    segments = segment_slot(msgs, options)
    assert [s.messages for s in segments] == split_at_gaps(msgs, options.gap)
    assert {s.started_by for s in segments} == {"gap"}


def test_started_by_is_shown_by_the_session_api(runtime, admin):
    imported(runtime, two_threads_interleaved())
    for session in sessions_of(runtime, "s"):
        body = admin.get(f"/api/v1/sessions/{session.session_id}").get_json()
        assert body["started_by"] == session.started_by
        assert body["thread_id"] == session.thread_id


@pytest.mark.parametrize("query,name", [
    ("session_gap=soon", "session_gap"), ("session_gap=0", "session_gap"),
    ("session_gap=9999999999", "session_gap"), ("grouping=topics", "grouping"),
    ("review=maybe", "review"), ("review=true", "review")])
def test_bad_upload_options_answer_422_naming_the_parameter(admin, query, name):
    response = admin.http.post(f"/api/v1/imports?{query}", data=as_ndjson([row("s", "robot",
                                                                                  at(0))]),
                               headers=admin.headers({"Content-Type": "application/x-ndjson"}))
    assert response.status_code == 422, response.get_json()
    assert response.mimetype == "application/problem+json"
    assert name in [e["field"] for e in response.get_json()["errors"]]


def test_upload_options_are_recorded_on_the_job_and_shown_with_it(admin, runtime):
    from tasks.celery_app import celery

    if not celery.conf.task_always_eager:
        pytest.skip("runs the pipeline in-process (embedded default)")
    from tasks.imports import wait_eager

    with freeze_time(LATER):
        response = admin.http.post(
            "/api/v1/imports?session_gap=7200&grouping=threads&review=false",
            data=as_ndjson(two_threads_interleaved()),
            headers=admin.headers({"Content-Type": "application/x-ndjson"}))
        assert response.status_code == 202, response.get_json()
        job = response.get_json()
        wait_eager(job["job_id"], 60)
    assert (job["session_gap"], job["grouping"], job["review"]) == (7200, "threads", False)
    done = admin.get(f"/api/v1/imports/{job['job_id']}").get_json()
    assert (done["session_gap"], done["grouping"], done["review"], done["sessions_created"],
            done["boundaries_reviewed"], done["boundaries_merged"]) == (
        7200, "threads", False, 2, 0, 0)


def test_the_cli_takes_the_grouping_flags(runtime, tmp_path):
    from click.testing import CliRunner

    from app.cli import main
    from tasks.celery_app import celery

    export = tmp_path / "threads.ndjson"
    export.write_bytes(as_ndjson(two_threads_interleaved()))
    bad = CliRunner().invoke(main, ["import", str(export), "--grouping", "topics"])
    assert bad.exit_code == 2 and "--grouping" in bad.output
    bad = CliRunner().invoke(main, ["import", str(export), "--session-gap", "0"])
    assert bad.exit_code == 2 and "--session-gap" in bad.output
    refused = CliRunner().invoke(main, ["import", str(export), "--review"])
    assert refused.exit_code == 1 and "review: no review endpoint" in refused.output
    if not celery.conf.task_always_eager:
        return  # the rest runs the pipeline in this process (embedded default)
    with freeze_time(LATER):
        result = CliRunner().invoke(main, ["import", str(export), "--session-gap", "7200",
                                           "--grouping", "gap", "--no-review", "--json"])
    assert result.exit_code == 0, result.output
    job = json.loads(result.output[result.output.index("{"):])
    assert (job["session_gap"], job["grouping"], job["review"], job["sessions_created"]) == (
        7200, "gap", False, 1)


def msg(message_id: str, minutes: float, *, reply_to=None, thread_id=None) -> Msg:
    return Msg(0, message_id, "a", "s", SenderRole.COUNTERPART, None, "x", "text",
               at(minutes), None, None, reply_to, thread_id)


def test_a_reply_into_a_thread_joins_the_thread_and_cycles_end():
    options = GroupingOptions(session_gap=1800)
    segments = segment_slot([
        msg("t1", 0, thread_id="T"), msg("x1", 1, reply_to="x2"),
        msg("x2", 2, reply_to="x1"),  # a cycle: one conversation, no endless walk
        msg("self", 3, reply_to="self"), msg("r", 500, reply_to="t1"),
        msg("late", 600)], options)
    assert [([m.message_id for m in s.messages], s.started_by) for s in segments] == [
        (["t1", "r"], "thread"), (["x1", "x2"], "reply"), (["self"], "gap"),
        (["late"], "gap")]


def test_a_thread_wins_over_the_overlap_with_an_ended_session(runtime):
    imported(runtime, [row("s", "counterpart", at(i * 5), message_id=f"g{i}")
                       for i in range(4)])  # an ended session, 09:00 … 09:15
    job = imported(runtime, [row("s", "counterpart", at(6), message_id="t1", thread_id="T"),
                             row("s", "human", at(7), message_id="t2", thread_id="T"),
                             row("s", "counterpart", at(8), message_id="g9")])
    assert (job.sessions_created, job.sessions_updated) == (1, 1)
    assert grouped(runtime) == [("gap", ["g0", "g1", "g9", "g2", "g3"]),
                                ("thread", ["t1", "t2"])]
