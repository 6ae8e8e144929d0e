"""Sizes, depths, numbers, times and cursors (SPEC §8): each out-of-bounds input is a
4xx naming what is wrong, writes nothing, and never a 500."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from app.runtime import Runtime
from tests.hostile.conftest import Caller, assert_everyone_still_served

HYPOTHESIS = settings(max_examples=25, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
BODY = {"account_id": "acc", "shop_id": "shop", "session_type": "AUTO_BARGAIN"}


def raw_post(caller: Caller, path: str, data: bytes | str) -> Any:
    return caller.http.post(path, data=data, content_type="application/json",
                            headers=caller.headers())


def field_names(response: Any) -> list[str]:
    return [e["field"] for e in response.get_json().get("errors", [])]


# ---- sizes -------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["context", "task_state", "customer_info", "result"])
def test_a_free_form_field_over_64_kib_is_refused_naming_it(
    field: str, bot: Caller, snapshot: Any
) -> None:
    session_id = bot.create("AUTO_BARGAIN")["session_id"]
    big = {"blob": "x" * (64 * 1024)}
    before = snapshot()
    if field == "context":
        answer = bot.post("/api/v1/sessions", {**BODY, "shop_id": "other", field: big})
    elif field == "result":
        answer = bot.post(f"/api/v1/sessions/{session_id}/complete", {field: big})
    else:
        answer = bot.post(f"/api/v1/sessions/{session_id}/transfer",
                          {"reason": "help", field: big})
    assert answer.status_code == 422
    assert field in field_names(answer)
    assert "MAX_JSON_FIELD_BYTES" in json.dumps(answer.get_json())
    assert snapshot() == before


def test_a_free_form_field_just_under_the_limit_is_kept(bot: Caller) -> None:
    context = {"blob": "x" * (64 * 1024 - 20)}
    created = bot.post("/api/v1/sessions", {**BODY, "context": context})
    assert created.status_code == 201
    assert created.get_json()["context"] == context


def test_a_body_over_max_request_bytes_is_413(bot: Caller, snapshot: Any) -> None:
    before = snapshot()
    body = json.dumps({"messages": [{"content": "x" * 60000}] * 40})  # ~2.4 MB
    session_id = bot.create("AUTO_BARGAIN")["session_id"]
    before = snapshot()
    answer = raw_post(bot, f"/api/v1/sessions/{session_id}/messages", body)
    assert answer.status_code == 413
    assert answer.mimetype == "application/problem+json"
    assert snapshot() == before


# ---- depth and JSON oddities -------------------------------------------------------------
@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_a_deeply_nested_body_is_422_not_500(depth: int, bot: Caller, desk: Caller,
                                             admin: Caller, snapshot: Any) -> None:
    before = snapshot()
    for body in ("[" * depth + "]" * depth,
                 '{"account_id": "a", "shop_id": "s", "session_type": "AUTO_BARGAIN", '
                 '"context": ' + '{"a": ' * depth + "1" + "}" * depth + "}"):
        answer = raw_post(bot, "/api/v1/sessions", body)
        assert answer.status_code == 422, answer.get_data(as_text=True)[:300]
        assert set(field_names(answer)) <= {"body", "context"}
    answer = raw_post(bot, "/api/v1/sessions", body)
    assert "deeper" in json.dumps(answer.get_json())
    assert snapshot() == before
    assert_everyone_still_served(bot, desk, admin)


@pytest.mark.parametrize("depth", [33, 200])
def test_context_nested_deeper_than_32_levels_is_refused(depth: int, bot: Caller) -> None:
    nested: Any = 1
    for _ in range(depth):
        nested = {"a": nested}
    answer = bot.post("/api/v1/sessions", {**BODY, "context": nested})
    assert answer.status_code == 422
    assert "context" in field_names(answer)
    assert "deeper" in json.dumps(answer.get_json())


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_numbers_json_cannot_store_are_refused(literal: str, bot: Caller) -> None:
    body = '{"account_id": "a", "shop_id": "s", "session_type": "AUTO_BARGAIN", ' \
           '"context": {"n": ' + literal + "}}"
    answer = raw_post(bot, "/api/v1/sessions", body)
    assert answer.status_code == 422
    assert answer.get_json()["errors"][0]["field"] == "body"


@HYPOTHESIS
@given(number=st.integers(min_value=2**63) | st.integers(max_value=-(2**63) - 1))
def test_integers_past_64_bits_in_free_form_json_are_refused(bot: Caller, number: int) -> None:
    answer = bot.post("/api/v1/sessions", {**BODY, "context": {"n": [number]}})
    assert answer.status_code == 422
    assert "context" in field_names(answer)


@HYPOTHESIS
@given(priority=st.integers(max_value=0) | st.integers(min_value=5)
       | st.floats(allow_nan=True) | st.text(max_size=5))
def test_priority_out_of_range_is_refused(bot: Caller, priority: Any) -> None:
    answer = bot.post("/api/v1/sessions", {**BODY, "priority": priority})
    assert answer.status_code == 422
    assert "priority" in field_names(answer)


# ---- times ---------------------------------------------------------------------------
bad_times = (
    st.floats(min_value=1e13, allow_infinity=False, allow_nan=False)
    | st.floats(max_value=-1.0, allow_infinity=False, allow_nan=False)
    | st.integers(min_value=10**16) | st.integers(max_value=-1)
    | st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00",
                       "1969-12-31T23:59:59Z", "0001-01-01", "2999-01-01T00:00:00Z"])
    | st.builds(lambda y, h: f"{y:04d}-06-01T00:00:00{h:+03d}:00",
                st.integers(1, 1969) | st.integers(2100, 9999), st.integers(-14, 14))
)


@HYPOTHESIS
@given(sent_at=bad_times)
def test_a_live_message_time_out_of_range_is_refused_naming_it(
    bot: Caller, snapshot: Any, sent_at: Any
) -> None:
    if "session" not in bot.__dict__:
        bot.__dict__["session"] = bot.create("AUTO_BARGAIN", shop="times")["session_id"]
    before = snapshot()
    answer = bot.post(f"/api/v1/sessions/{bot.__dict__['session']}/messages",
                      {"messages": [{"content": "hi", "sender_role": "counterpart",
                                     "sent_at": sent_at}]})
    assert answer.status_code == 422, answer.get_data(as_text=True)[:300]
    assert "messages.0.sent_at" in field_names(answer)
    assert snapshot() == before


# ---- cursors and limits on every paginated endpoint ----------------------------------------
def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


CRAFTED_CURSORS = [
    "9223372036854775808", "-1", "abc", "%00", "\u202e", "s" * 64,
    _b64(b"s99999999999999999999999999"), _b64(b"s-5"), _b64(b"s"),
    _b64(json.dumps([10**30, "2026-01-01T00:00:00+00:00", 1]).encode()),
    _b64(json.dumps([1, "0001-01-01T00:00:00+14:00", 1]).encode()),
    _b64(json.dumps([1, "2026-01-01T00:00:00+00:00", 10**30]).encode()),
    _b64(json.dumps([1, "2026-01-01T00:00:00", 1]).encode()),
    _b64(json.dumps({"a": 1}).encode()), _b64(b"[[[[[[[[[["), _b64(b"\xff\xfe"),
]
PAGINATED = [
    ("bot", "/api/v1/sessions"), ("desk", "/api/v1/transfers"), ("admin", "/api/v1/events"),
    ("desk", "/api/v1/agents"),
]


@pytest.mark.parametrize("role,path", PAGINATED)
@pytest.mark.parametrize("cursor", CRAFTED_CURSORS)
def test_a_crafted_cursor_is_a_4xx_naming_after(
    role: str, path: str, cursor: str, bot: Caller, desk: Caller, admin: Caller
) -> None:
    caller = {"bot": bot, "desk": desk, "admin": admin}[role]
    answer = caller.get(path, after=cursor)
    assert answer.status_code < 500, answer.get_data(as_text=True)[:300]
    if answer.status_code >= 400:
        assert answer.status_code == 422
        assert "after" in field_names(answer)


@pytest.mark.parametrize("role,path", PAGINATED)
def test_generated_cursors_and_limits_never_fail_the_server(
    role: str, path: str, bot: Caller, desk: Caller, admin: Caller
) -> None:
    caller = {"bot": bot, "desk": desk, "admin": admin}[role]

    @HYPOTHESIS
    @given(cursor=st.text(max_size=80) | st.integers().map(str),
           limit=st.integers() | st.text(max_size=6))
    def attempt(cursor: str, limit: Any) -> None:
        answer = caller.get(path, after=cursor.replace("\x00", ""), limit=limit)
        assert answer.status_code in (200, 422), answer.get_data(as_text=True)[:300]
        if answer.status_code == 422:
            assert set(field_names(answer)) & {"after", "limit"}

    attempt()


# ---- a value stored by an older release -------------------------------------------------
@pytest.mark.sqlite_only  # MariaDB/MySQL refuse it themselves: JSON_VALID fails on "\ud800"
def test_a_lone_surrogate_already_stored_does_not_break_reads(
    runtime: Runtime, bot: Caller, desk: Caller, admin: Caller
) -> None:
    """Validation now refuses it, but a row written before (JSON text with a `\\ud800`
    escape) must still be served: the answer carries U+FFFD in its place."""
    session_id = bot.create("AUTO_BARGAIN")["session_id"]
    with runtime.database.engine.begin() as conn:
        conn.execute(text("UPDATE sessions SET context = :c WHERE session_id = :s"),
                     {"c": '{"note": "\\ud800"}', "s": session_id})
    answer = bot.get(f"/api/v1/sessions/{session_id}")
    assert answer.status_code == 200
    assert answer.get_json()["context"] == {"note": "\ufffd"}
    assert_everyone_still_served(bot, desk, admin)


@pytest.mark.parametrize("content", ["价" * 21846, "😀" * 16384, "x" * 65536])
def test_a_message_too_long_for_its_column_is_refused_not_truncated(
    bot: Caller, snapshot: Any, content: str
) -> None:
    """TEXT holds 65,535 bytes: 21,846 CJK characters (65,538 bytes) are one too many."""
    session_id = bot.create("AUTO_BARGAIN", shop="long")["session_id"]
    before = snapshot()
    answer = bot.post(f"/api/v1/sessions/{session_id}/messages",
                      {"messages": [{"content": content, "sender_role": "counterpart"}]})
    assert answer.status_code == 422, answer.get_data(as_text=True)[:300]
    assert "messages.0.content" in field_names(answer)
    assert snapshot() == before
    fits = bot.post(f"/api/v1/sessions/{session_id}/messages",
                    {"messages": [{"content": "价" * 21845, "sender_role": "counterpart"}]})
    assert fits.status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12)


@settings(deadline=None)
@given(value=JSON_VALUES, encoding=st.sampled_from(["utf-8", "utf-16", "utf-16-be", "utf-32-le"]),
       mangle=st.sampled_from(["", "cut", "bom", "nan"]))
def test_the_shared_strict_decoder_reads_bodies_as_json_loads_does(
        value: Any, encoding: str, mangle: str) -> None:
    """`parse_json` (one decoder shared by every request) answers what `json.loads` with
    the same strictness answers, for bytes in any JSON encoding and for text, valid or
    not: the same value, or a ValueError (a UnicodeDecodeError is one)."""
    from app.api.http import _finite_float, _refuse_constant, parse_json

    text = json.dumps(value)
    if mangle == "cut":
        text = text[: len(text) // 2]
    elif mangle == "bom":
        text = "\ufeff" + text
    elif mangle == "nan":
        text = f"[{text}, NaN]"
    for body in (text, text.encode(encoding, "surrogatepass")):
        try:
            expected = json.loads(body, parse_constant=_refuse_constant,
                                  parse_float=_finite_float)
        except ValueError:
            with pytest.raises(ValueError):
                parse_json(body)
        else:
            assert parse_json(body) == expected
