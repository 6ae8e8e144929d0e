"""SPEC §4 step 4d: the optional LLM review of ambiguous gap-rule boundaries, against a
real chat-completions server on 127.0.0.1 (no patched client)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from freezegun import freeze_time
from sqlalchemy import select

from app.config import ConfigError, load_settings
from app.imports.models import ImportJob
from app.imports.review import CONTENT_CHARS, CONTEXT_MESSAGES
from tests.imports.helpers import as_ndjson, messages_of, row, run_job, sessions_of
from tests.imports.review_server import ReviewServer

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
LATER = T0 + timedelta(days=10)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def slot_rows(shop: str) -> list[dict]:
    """Three stretches: A, then 45 minutes of silence (reviewed: between 10 minutes and a
    day), B, then two days (past GROUPING_REVIEW_MAX_GAP: never reviewed), C."""
    return ([row(shop, "counterpart", at(i), message_id=f"{shop}-a{i}") for i in range(3)]
            + [row(shop, "robot", at(47 + i), message_id=f"{shop}-b{i}") for i in range(3)]
            + [row(shop, "counterpart", at(3000 + i), message_id=f"{shop}-c{i}")
               for i in range(2)])


@pytest.fixture
def server(runtime) -> Iterator[ReviewServer]:
    with ReviewServer() as srv:
        settings = runtime.settings
        settings.grouping_llm_base_url = srv.base_url
        settings.grouping_llm_model = "grouping-test"
        settings.grouping_llm_api_key = "k-test"
        settings.grouping_llm_timeout = 0.5
        yield srv


def imported(runtime, rows, **options):
    with freeze_time(LATER):
        return run_job(runtime, as_ndjson(rows), filename="r.ndjson", **options)


def shape(runtime, shop="s") -> list[tuple[str | None, int]]:
    return [(s.started_by, s.message_count) for s in sessions_of(runtime, shop)]


def test_a_confident_continues_merges_the_two_segments(runtime, server):
    job = imported(runtime, slot_rows("s"), review=True)
    assert (job.review, job.boundaries_reviewed, job.boundaries_merged) == (True, 1, 1)
    assert shape(runtime) == [("gap", 6), ("gap", 2)]
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer k-test"
    body = request["body"]
    assert body["model"] == "grouping-test"
    assert body["response_format"] == {"type": "json_object"}
    merged = sessions_of(runtime, "s")[0]
    assert [m.message_id for m in messages_of(runtime, merged.id)] == [
        "s-a0", "s-a1", "s-a2", "s-b0", "s-b1", "s-b2"]


def test_a_fenced_verdict_is_read_too(runtime, server):
    server.mode = "fenced"
    job = imported(runtime, slot_rows("s"), review=True)
    assert job.boundaries_merged == 1 and shape(runtime) == [("gap", 6), ("gap", 2)]


def test_a_kept_boundary_records_that_the_review_confirmed_it(runtime, server):
    server.mode = "keep"
    job = imported(runtime, slot_rows("s"), review=True)
    assert (job.boundaries_reviewed, job.boundaries_merged) == (1, 0)
    assert shape(runtime) == [("gap", 3), ("review", 3), ("gap", 2)]


def test_a_verdict_below_the_confidence_threshold_keeps_the_boundary(runtime, server):
    server.mode = "unsure"
    job = imported(runtime, slot_rows("s"), review=True)
    assert (job.boundaries_reviewed, job.boundaries_merged) == (1, 0)
    assert shape(runtime) == [("gap", 3), ("review", 3), ("gap", 2)]
    runtime.settings.grouping_review_confidence = 0.5
    imported(runtime, slot_rows("t"), review=True)
    assert shape(runtime, "t") == [("gap", 6), ("gap", 2)]


@pytest.mark.parametrize("mode", ["garbage", "wrong", "error", "slow"])
def test_any_failure_keeps_the_gap_rules_boundary(runtime, server, mode):
    server.mode = mode
    server.delay = 2.0  # past GROUPING_LLM_TIMEOUT (0.5 s)
    job = imported(runtime, slot_rows("s"), review=True)
    assert (job.status, job.inserted, job.boundaries_reviewed, job.boundaries_merged) == (
        "succeeded", 8, 0, 0)
    assert shape(runtime) == [("gap", 3), ("gap", 3), ("gap", 2)]
    assert len(server.requests) == 1


def test_the_jobs_call_budget_is_never_exceeded(runtime, server):
    runtime.settings.grouping_review_max_calls = 2
    rows = [r for shop in ("s1", "s2", "s3", "s4") for r in slot_rows(shop)]
    job = imported(runtime, rows, review=True)
    assert len(server.requests) == 2
    assert (job.boundaries_reviewed, job.boundaries_merged, job.review_calls) == (2, 2, 2)
    assert job.sessions_created == 4 * 3 - 2
    with runtime.database.read() as db:
        assert db.execute(select(ImportJob.review_calls)
                          .where(ImportJob.job_id == job.job_id)).scalar_one() == 2


def test_review_is_off_by_default_and_costs_no_call(runtime, server):
    job = imported(runtime, slot_rows("s"))
    assert (job.review, job.boundaries_reviewed) == (False, 0)
    imported(runtime, slot_rows("t"), review=False)
    assert server.requests == []
    assert shape(runtime) == [("gap", 3), ("gap", 3), ("gap", 2)]


def test_the_grouping_review_setting_is_the_uploads_default(runtime, server):
    runtime.settings.grouping_review = True
    job = imported(runtime, slot_rows("s"))
    assert (job.review, job.boundaries_merged) == (True, 1)


def test_a_re_upload_asks_nothing(runtime, server):
    imported(runtime, slot_rows("s"), review=True)
    again = imported(runtime, slot_rows("s"), review=True)
    assert (again.inserted, again.boundaries_reviewed) == (0, 0)
    assert len(server.requests) == 1


def test_the_prompt_holds_only_the_messages_near_the_boundary_cut_to_a_bound(runtime, server):
    server.mode = "keep"
    long_text = "退款" * 2000 + "END-OF-A-LONG-MESSAGE"
    rows = ([row("s", "counterpart", at(i), f"early message {i}", message_id=f"a{i}")
             for i in range(20)]
            + [row("s", "counterpart", at(20), long_text, message_id="a20")]
            + [row("s", "robot", at(80 + i), f"later message {i}", message_id=f"b{i}")
               for i in range(20)])
    imported(runtime, rows, review=True)
    (prompt,) = server.prompts()
    shown = [line for line in prompt.splitlines() if line.startswith("[")]
    assert len(shown) == 2 * CONTEXT_MESSAGES
    assert "early message 15" in prompt and "early message 14" not in prompt
    assert "later message 5" in prompt and "later message 6" not in prompt
    assert all(len(line) < CONTENT_CHARS + 40 for line in shown)
    assert "END-OF-A-LONG-MESSAGE" in prompt  # head and tail of a long message
    assert "silence of 1 h 0 min" in prompt


def test_review_settings_are_checked_at_start_up():
    with pytest.raises(ConfigError, match="GROUPING_REVIEW"):
        load_settings(grouping_review=True, llm_base_url=None, grouping_llm_base_url=None)
    with pytest.raises(ConfigError, match="GROUPING_REVIEW_MAX_GAP"):
        load_settings(grouping_review_min_gap=3600, grouping_review_max_gap=60)
    with pytest.raises(ConfigError, match="GROUPING_REVIEW_CONFIDENCE"):
        load_settings(grouping_review_confidence=1.5)
    settings = load_settings(llm_base_url="http://127.0.0.1:9/v1", llm_model="m",
                             llm_timeout=3, grouping_review=True)
    assert settings.grouping_review_endpoint == ("http://127.0.0.1:9/v1", "m", None, 3.0)
