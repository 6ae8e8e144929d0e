"""The same validation behind every door that is not HTTP: `AutoSessionManager` (the
seed's Python API) refuses what the API refuses, naming the field, and stores nothing."""

from __future__ import annotations

from typing import Any

import pytest

from app.errors import ValidationFailed
from app.manager import AutoSessionManager
from app.runtime import Runtime
from tests.hostile.conftest import stored_state

BAD = "a\ud800b"


@pytest.fixture
def manager(runtime: Runtime) -> AutoSessionManager:
    return AutoSessionManager(runtime)


def fields_of(caught: pytest.ExceptionInfo[ValidationFailed]) -> set[str]:
    return {e["field"] for e in caught.value.extra["errors"]}


@pytest.mark.parametrize("call,field", [
    (lambda m, sid: m.create_robot_session(shop_id=1, user_id=BAD), "account_id"),
    (lambda m, sid: m.create_robot_session(shop_id=2, user_id="u", context={"k": BAD}),
     "context"),
    (lambda m, sid: m.create_robot_session(shop_id=3, user_id="u",
                                           context={"k": "x" * 70_000}), "context"),
    (lambda m, sid: m.transfer_to_human(sid, reason=BAD), "reason"),
    (lambda m, sid: m.transfer_to_human(sid, task_state={"deep": [BAD]}), "task_state"),
    (lambda m, sid: m.complete_session(sid, result={"r": float("inf")}), "result"),
    (lambda m, sid: m.pause_session(sid, reason=BAD), "reason"),
    (lambda m, sid: m.cancel_session(sid, reason=BAD), "reason"),
    (lambda m, sid: m.hand_back(sid, summary=BAD), "summary"),
    (lambda m, sid: m.hand_back(sid, "ok", "needs_robot", context={"deep": [BAD]}), "context"),
    (lambda m, sid: m.hand_back(sid, "ok", "needs_robot", context={"k": "x" * 70_000}),
     "context"),
    (lambda m, sid: m.reassign_transfer("trf_x", agent_id=BAD), "agent_id"),
])
def test_the_python_api_refuses_what_http_refuses(
    manager: AutoSessionManager, runtime: Runtime, call: Any, field: str
) -> None:
    session_id = manager.create_robot_session(shop_id="s", user_id="u").session_id
    before = stored_state(runtime)
    with pytest.raises(ValidationFailed) as caught:
        call(manager, session_id)
    assert field in fields_of(caught)
    assert all({"field", "message"} <= set(e) for e in caught.value.extra["errors"])
    assert stored_state(runtime) == before


def test_process_chat_messages_reports_bad_rows_and_keeps_the_rest(
    manager: AutoSessionManager
) -> None:
    rows = [
        {"user_id": "u", "shop_id": "s1", "content": "fine", "sender_role": "counterpart",
         "timestamp": "2026-01-01T10:00:00"},
        {"user_id": "u", "shop_id": "s1", "content": BAD, "sender_role": "counterpart",
         "timestamp": "2026-01-01T10:01:00"},
        {"user_id": "u", "shop_id": "s1", "content": "late", "sender_role": "counterpart",
         "timestamp": 1e300},
        {"user_id": "u", "shop_id": "s1", "content": "also fine", "sender_role": "robot",
         "timestamp": "2026-01-01T10:02:00"},
    ]
    result = manager.process_chat_messages(rows)
    assert result.inserted == 2
    assert result.invalid == 2
    assert [e.line for e in result.errors] == [2, 3]
    assert "content" in result.errors[0].error and "timestamp" in result.errors[1].error
