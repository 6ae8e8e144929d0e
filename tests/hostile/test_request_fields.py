"""Generated hostile strings in every field of every request model (SPEC §8 "Bad input").

A string that is not valid Unicode (a lone surrogate, which JSON's `\\ud800` escape
allows) is refused with 422 naming the field, writes nothing, and leaves every other
client served. Strings that are valid but odd — control characters, bidirectional
overrides, zero-width joiners, non-characters — are either stored and read back exactly,
or refused with a 4xx; never a 500, and never a stored value that breaks a later read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile.conftest import Caller, assert_everyone_still_served

HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])

lone_surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
invalid_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=8), lone_surrogate,
                         st.text(max_size=8))
odd_characters = st.characters(categories=["Cc", "Cf", "Co", "Zl", "Zp", "Mn"]) | st.sampled_from(
    ["\u202e", "\u2066", "\u200d", "\ufeff", "\uffff", "\U0010ffff", "\x00", "\x1b"])
odd_text = st.text(odd_characters, min_size=1, max_size=12).map(lambda t: "x" + t)


@dataclass
class Door:
    """One request-model field reachable over HTTP: `prepare` writes what the request
    needs (a session, a transfer), `send` makes the request with `value` in the field."""

    name: str
    field: str  # the field path the 422 must name
    send: Callable[[dict[str, Any], str, Any], Any]  # (world, prepared id, value) -> response
    prepare: Callable[[dict[str, Any]], str] = lambda world: ""


def robot_session(world: dict[str, Any]) -> str:
    """A fresh ACTIVE robot session of the bot, on a slot of its own."""
    world["n"] = world.get("n", 0) + 1
    return str(world["bot"].create("AUTO_BARGAIN", shop=f"shop-{world['n']}")["session_id"])


def pending_transfer(world: dict[str, Any]) -> str:
    answer = world["bot"].post(f"/api/v1/sessions/{robot_session(world)}/transfer",
                               {"reason": "help"})
    assert answer.status_code == 201, answer.get_json()
    return str(answer.get_json()["transfer_id"])


def create_with(field: str, *, nested: bool = False) -> Callable[..., Any]:
    def send(world: dict[str, Any], _: str, value: Any) -> Any:
        world["n"] = world.get("n", 0) + 1
        body: dict[str, Any] = {"account_id": "acc", "shop_id": f"new-{world['n']}",
                                "session_type": "AUTO_BARGAIN"}
        body[field] = {"note": {"deep": [value]}} if nested else value
        return world["bot"].post("/api/v1/sessions", body)
    return send


def transfer_with(field: str, *, nested: bool = False) -> Callable[..., Any]:
    def send(world: dict[str, Any], session_id: str, value: Any) -> Any:
        body: dict[str, Any] = {"reason": "help"}
        body[field] = {"k": value} if nested else value
        return world["bot"].post(f"/api/v1/sessions/{session_id}/transfer", body)
    return send


def message_with(field: str) -> Callable[..., Any]:
    def send(world: dict[str, Any], session_id: str, value: Any) -> Any:
        row: dict[str, Any] = {"content": "hello", "sender_role": "counterpart"}
        row[field] = value
        return world["bot"].post(f"/api/v1/sessions/{session_id}/messages",
                                 {"messages": [row]})
    return send


def complete_with(field: str, *, nested: bool = False) -> Callable[..., Any]:
    def send(world: dict[str, Any], session_id: str, value: Any) -> Any:
        body = {field: {"outcome": [value]} if nested else value}
        return world["bot"].post(f"/api/v1/sessions/{session_id}/complete", body)
    return send


def agent_with(field: str) -> Callable[..., Any]:
    def send(world: dict[str, Any], _: str, value: Any) -> Any:
        body: dict[str, Any] = {"presence": "online"}
        body[field] = [value] if field == "skills" else value
        return world["desk"].put("/api/v1/agents/agent-1", body)
    return send


def accept_as(world: dict[str, Any], transfer_id: str, value: Any) -> Any:
    return world["desk"].post(f"/api/v1/transfers/{transfer_id}/accept", {"agent_id": value})


def transferred_session(world: dict[str, Any]) -> str:
    """A robot session of the bot, handed to the desk (TRANSFERRED, offer pending)."""
    session_id = robot_session(world)
    answer = world["bot"].post(f"/api/v1/sessions/{session_id}/transfer", {"reason": "help"})
    assert answer.status_code == 201, answer.get_json()
    return session_id


def hand_back_with(field: str, *, nested: bool = False) -> Callable[..., Any]:
    def send(world: dict[str, Any], session_id: str, value: Any) -> Any:
        body: dict[str, Any] = {"summary": "done", "outcome": "needs_robot"}
        body[field] = {"k": [value]} if nested else value
        return world["desk"].post(f"/api/v1/sessions/{session_id}/hand-back", body)
    return send


def reassign_with(field: str) -> Callable[..., Any]:
    def send(world: dict[str, Any], transfer_id: str, value: Any) -> Any:
        body: dict[str, Any] = {"agent_id": "agent-2"}
        body[field] = value
        return world["desk"].post(f"/api/v1/transfers/{transfer_id}/reassign", body)
    return send


def desk_message_as(world: dict[str, Any], session_id: str, value: Any) -> Any:
    return world["desk"].post(f"/api/v1/sessions/{session_id}/messages", {
        "messages": [{"content": "hello", "sender_role": "human"}], "agent_id": value})


DOORS = [
    Door("create.account_id", "account_id", create_with("account_id")),
    Door("create.shop_id", "shop_id", create_with("shop_id")),
    Door("create.owner_id", "owner_id", create_with("owner_id")),
    Door("create.reason", "reason", create_with("reason")),
    Door("create.context", "context", create_with("context", nested=True)),
    Door("transfer.reason", "reason", transfer_with("reason"), robot_session),
    Door("transfer.suggestion", "suggestion", transfer_with("suggestion"), robot_session),
    Door("transfer.agent_id", "agent_id", transfer_with("agent_id"), robot_session),
    Door("transfer.task_state", "task_state", transfer_with("task_state", nested=True),
         robot_session),
    Door("transfer.customer_info", "customer_info",
         transfer_with("customer_info", nested=True), robot_session),
    Door("messages.content", "messages.0.content", message_with("content"), robot_session),
    Door("messages.sender_id", "messages.0.sender_id", message_with("sender_id"),
         robot_session),
    Door("messages.message_id", "messages.0.message_id", message_with("message_id"),
         robot_session),
    Door("messages.message_type", "messages.0.message_type", message_with("message_type"),
         robot_session),
    Door("complete.reason", "reason", complete_with("reason"), robot_session),
    Door("complete.result", "result", complete_with("result", nested=True), robot_session),
    Door("agent.name", "name", agent_with("name")),
    Door("agent.skills", "skills", agent_with("skills")),
    Door("accept.agent_id", "agent_id", accept_as, pending_transfer),
    Door("hand_back.summary", "summary", hand_back_with("summary"), transferred_session),
    Door("hand_back.next_action", "next_action", hand_back_with("next_action"),
         transferred_session),
    Door("hand_back.agent_id", "agent_id", hand_back_with("agent_id"), transferred_session),
    Door("hand_back.context", "context", hand_back_with("context", nested=True),
         transferred_session),
    Door("reassign.agent_id", "agent_id", reassign_with("agent_id"), pending_transfer),
    Door("reassign.reason", "reason", reassign_with("reason"), pending_transfer),
    Door("messages.agent_id", "agent_id", desk_message_as, transferred_session),
]


@pytest.fixture
def world(bot: Caller, desk: Caller, admin: Caller) -> dict[str, Any]:
    return {"bot": bot, "desk": desk, "admin": admin}


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.name)
def test_a_lone_surrogate_is_refused_naming_the_field_and_writes_nothing(
    door: Door, world: dict[str, Any], snapshot: Any
) -> None:
    @HYPOTHESIS
    @given(text=invalid_text)
    def attempt(text: str) -> None:
        prepared = door.prepare(world)
        before = snapshot()
        refused = door.send(world, prepared, text)
        assert refused.status_code == 422, refused.get_data(as_text=True)[:400]
        problem = refused.get_json()
        assert problem["type"] == "/problems/validation"
        fields = [e["field"] for e in problem["errors"]]
        assert any(f == door.field or f.startswith(door.field + ".") for f in fields), fields
        assert any("unicode" in e["message"].lower() for e in problem["errors"]), problem["errors"]
        assert snapshot() == before
        assert_everyone_still_served(world["bot"], world["desk"], world["admin"])

    attempt()


@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.name)
def test_odd_but_valid_text_is_stored_exactly_or_refused_never_a_500(
    door: Door, world: dict[str, Any]
) -> None:
    @HYPOTHESIS
    @given(text=odd_text)
    def attempt(text: str) -> None:
        answer = door.send(world, door.prepare(world), text)
        assert answer.status_code < 500, answer.get_data(as_text=True)[:400]
        if answer.status_code >= 400:
            assert answer.mimetype == "application/problem+json"
            assert answer.get_json()["detail"]
        assert_everyone_still_served(world["bot"], world["desk"], world["admin"])

    attempt()


@HYPOTHESIS
@given(text=odd_text)
def test_odd_text_round_trips_through_storage(world: dict[str, Any], text: str) -> None:
    """What is accepted is what is read back, character for character."""
    world["n"] = world.get("n", 0) + 1
    created = world["bot"].post("/api/v1/sessions", {
        "account_id": "acc", "shop_id": f"rt-{world['n']}", "session_type": "AUTO_BARGAIN",
        "reason": text, "context": {text: [text]}})
    assert created.status_code == 201, created.get_json()
    session_id = created.get_json()["session_id"]
    posted = world["bot"].post(f"/api/v1/sessions/{session_id}/messages",
                               {"messages": [{"content": text, "sender_role": "counterpart"}]})
    assert posted.status_code == 200, posted.get_json()
    read = world["bot"].get(f"/api/v1/sessions/{session_id}").get_json()
    assert read["reason"] == text
    assert read["context"] == {text: [text]}
    messages = world["admin"].get(f"/admin/api/sessions/{session_id}").get_json()
    assert text in [m["content"] for m in messages["messages"]]
